"""Real compression: pack a baked checkpoint into a sparse + n-bit artifact, reload it, and
write it as ONNX.

``python -m compress.export RUN_DIR [-o FILE] [--fp16] [--onnx FILE]`` turns
``RUN_DIR/model.pt`` into ``RUN_DIR/model.cpk`` and prints its size report (see ``cli``). The
artifact reproduces the checkpoint's weights exactly (fp32 mode): :func:`load` rebuilds the
plain network it records (a CIFAR ResNet, or any network from the ``_target_`` config the run
recorded) computing the same logits as the baked model.

Modules, by concern:

- ``bits``: bit packing and the delta-coded sparse index;
- ``grid``: the exact ``(scale, offset)`` and integer codes of a quantized tensor (or of each
  output channel of one);
- ``records``: one tensor as a record (kind, dense/bitmask/delta layout, values);
- ``artifact``: the file (header, manifest, records), :func:`export`, :func:`save`,
  :func:`load`, :func:`size_report`;
- ``onnx_model``: the network as ONNX and its onnxruntime check (the ``onnx`` extra; imported
  only when used);
- ``cli``: the command line.

What goes where in the artifact:

- *Quantized* tensors are the weights with a recorded grid (``meta["quant"]["grids"]``: the
  layers ``quant.layers`` selected; checkpoints from before grids were recorded: the CIFAR
  ResNets' residual-block convs). Each
  stored entry is an integer code ``c`` with ``value = (c - shift) * scale + offset`` in
  float32, exactly as :func:`compress.quant.quantize` computes it (``shift`` is 0 for
  ``asym``, ``2^(n-1) - 1`` for ``sym`` so the codes fit in n unsigned bits), with one
  ``(scale, offset)`` per tensor, or per output channel (``meta["quant"]["granularity"]``).
  They are the ones recorded when the weights were baked (``meta["quant"]["grids"]``), which
  learned ranges need; for checkpoints without them, the baked tensor's min/max need not give
  back the latent tensor's ``scale`` bit for bit, so :func:`fit_grid` searches the few float32
  neighbours of the estimate for a ``(scale, offset)`` that reproduces every value. Either way
  export fails with ``ValueError`` unless every value comes back exactly.
- *Sparse* layouts store only the nonzero entries; zeros come back as zeros. The layout
  (dense / bitmask / delta, and the delta width) is picked per tensor as the smallest, so
  pruned tensors (zeros outside their mask) go sparse and the rest stay dense. Dense is only
  allowed for a quantized tensor if its zeros are grid values (``sym`` code 0); an ``asym``
  tensor with zeros off the grid (kept by the zero-preservation rule) must go sparse.
  (A pruned weight baked as ``-0.0`` comes back as ``+0.0``: equal, and the same logits.)
- Everything else (stem conv, classifier, BatchNorm parameters and buffers) is float32 or,
  with ``fp_dtype="float16"``, float16 (a tensor that would overflow fp16 stays fp32);
  ``num_batches_tracked`` and other integer buffers use the fewest bytes that hold them.
"""

from compress.export.artifact import (HEADER, MAGIC, SUFFIX, VERSION, VERSIONS, export, load, read_manifest, save,
                                      size_report)
from compress.export.bits import delta_bits, delta_decode, delta_encode, pack_bits, packed_size, unpack_bits
from compress.export.cli import main
from compress.export.grid import QuantSpec, dequantize, fit_grid
from compress.export.records import FP_DTYPES

__all__ = [
    "FP_DTYPES", "HEADER", "MAGIC", "QuantSpec", "SUFFIX", "VERSION", "VERSIONS", "delta_bits", "delta_decode",
    "delta_encode", "dequantize", "export", "fit_grid", "load", "main", "pack_bits", "packed_size", "read_manifest", "save",
    "size_report", "unpack_bits",
]
