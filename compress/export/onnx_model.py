"""The compressed network as an ONNX file, and its check against PyTorch with onnxruntime.

A CIFAR ResNet's graph is built by hand from the baked checkpoint (no tracing), so what it
holds is exactly the saved weights, zeros included, and no BatchNorm is folded into a quantized
convolution. Any other network (:func:`module_to_onnx`) is exported by torch's TorchScript
exporter (``dynamo=False``: it needs no extra package and, without constant folding, keeps
every parameter as an initializer of its state-dict name, BatchNorm unfolded), then each
quantized weight's initializer is replaced by the same nodes as below (the readers of the
float32 tensor read them instead), after checking it holds the baked values unchanged.
In both:

- A quantized weight (a ResNet's block convs; in another network, each weight its recorded
  grids name, conv or linear) is stored as its integer codes (INT4/UINT4 for nbits <= 4, else
  INT8/UINT8) and a float32 scale, per tensor or (``granularity=channel``) per output channel
  (a C x 1 x 1 x 1 tensor), turned into weights by ``Cast`` and ``Mul`` (``code * scale``, the
  first rounding of ``compress.quant``). ``sym`` levels are exactly that, pruned zeros being
  code 0. ``asym`` levels ``code * scale + min`` need an ``Add`` of ``min`` (the second
  rounding, as in ``compress.quant``), and where some weights are exact zeros off the grid
  (pruned ``asym`` weights) a ``Where`` keeps them zero, its mask stored as one bit per weight.
  All of it is float arithmetic on constants, which onnxruntime folds into float32 weights
  when it loads the file, so the graph runs at the dense graph's speed in a default session.
  Every weight comes back bit for bit (emulated in float32 before writing,
  :meth:`CodedWeight.values`; a mismatch is an export bug and raises).
- Everything else (stem conv, classifier, BatchNorm, unquantized layers and models) is plain float32.
- Fake-quantized activations (``quant.abits``, CIFAR ResNets) are ``Div``, ``Clip``, ``Round``,
  ``Mul`` by their float32 step, the operations ``compress.actquant`` computes (both round half to even).

Opset 21 (INT4 tensors; torch's exporter writes opset 20, converted by
``onnx.version_converter``). The dependencies are the ``onnx`` extra
(``pip install -e .[onnx]``).
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter

from torch import nn

from compress.actquant import ActFakeQuant, activation_quantizers
from compress.checkpoint import Checkpoint
from compress.export.artifact import quant_meta, reference
from compress.export.grid import QuantSpec, grid_codes
from compress.layers import quantizable_layers
from compress.models import ARCHS, arch_of
from compress.quant import code_range

OPSET = 21
TORCH_OPSET = 20  # the newest opset torch's TorchScript exporter writes; converted to OPSET after
DEFAULT_IMAGE_SIZE = 32
MAX_LOGIT_DIFF = 1e-4  # the check: max |onnxruntime - PyTorch| over all logits, per unit of the largest |logit| (>= 1) ...
MIN_ARGMAX_AGREEMENT = 0.999  # ... and the fraction of images with the same predicted class
# With quantized activations, less per activation quantizer: each can move some activations a level
# (measured 0.003% of images per quantizer: W8A8 ResNet-20, 18 of them, 99.94%; ResNet-56, 54, 99.84%).
FLIP_ALLOWANCE = 1e-4
# storage type of the codes: (signed, nbits <= 4) -> (numpy dtype, ONNX type name)
CODE_TYPES = {(True, True): (ml_dtypes.int4, "INT4"), (False, True): (ml_dtypes.uint4, "UINT4"),
              (True, False): (np.int8, "INT8"), (False, False): (np.uint8, "UINT8")}


@dataclass
class CodedWeight:
    """A quantized weight as the graph computes it: ``Cast(codes) * scale`` (per output
    channel where ``scale`` has one entry per channel), then
    ``Add`` of the grid's ``offset`` where it has one (asym: its minimum), then
    ``Where(on_grid, ., 0)`` where some weights are zeros off the grid (pruned asym).
    ``scale`` and ``offset`` are float32, 0-d per tensor, shaped ``C x 1 x 1 x 1`` per channel."""

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    on_grid: np.ndarray | None
    onnx_type: str

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim > 0

    @property
    def ops(self) -> str:
        """The nodes that make the weight, e.g. ``Cast+Mul+Add``."""
        dequantize = "Cast+Mul(axis=0)" if self.per_channel else "Cast+Mul"
        return "+".join([dequantize, *["Add"] * bool(self.offset.any()), *["Where(bits)"] * (self.on_grid is not None)])

    def values(self) -> np.ndarray:
        """What onnxruntime computes, in float32 as it does (``compress.quant``'s two roundings)."""
        out = self.codes.astype(np.float32) * self.scale
        if self.offset.any():
            out = out + self.offset
        return out if self.on_grid is None else np.where(self.on_grid, out, np.float32(0))


def coded_weight(name: str, w: torch.Tensor, spec: QuantSpec) -> CodedWeight:
    """The integer codes of a baked quantized weight, from which the graph gives back every
    value of ``w`` bit for bit (``ValueError`` if ``w`` is off its grid)."""
    grid = grid_codes(name, w, spec)
    dtype, onnx_type = CODE_TYPES[(code_range(spec.mode, spec.nbits)[0] < 0, spec.nbits <= 4)]
    shape = tuple(w.shape)
    grid_shape = (-1, *[1] * (len(shape) - 1)) if spec.channel else ()
    scale, offset = (a.astype(np.float32).reshape(grid_shape) for a in (grid.scales, grid.offsets))
    on_grid = None if grid.on_grid.all() else grid.on_grid.reshape(shape)
    coded = CodedWeight(grid.levels.astype(dtype).reshape(shape), scale, offset, on_grid, onnx_type)
    if not np.array_equal(coded.values(), w.detach().cpu().numpy()):
        raise RuntimeError(f"export bug: {name} does not come back exactly from its ONNX codes")
    return coded


@dataclass
class OnnxModel:
    """The ONNX graph of a checkpoint and the codes of its quantized weights (``weights``: the
    graph value each of them is, what its layer reads; ``what``/``rest``: how :meth:`describe`
    names the quantized weights and the others)."""

    proto: onnx.ModelProto
    coded: dict[str, CodedWeight] = field(default_factory=dict)  # weight name -> its codes
    weights: dict[str, str] = field(default_factory=dict)  # weight name -> graph value of it
    what: str = "block convs"
    rest: str = "stem, classifier and BatchNorm float32"

    def describe(self) -> str:
        """One line: how the quantized weights are stored."""
        if not self.coded:
            return "every weight float32 (no quantized weights)"
        kinds = Counter(f"{c.onnx_type} codes + {c.ops}" for c in self.coded.values())
        return "; ".join([*(f"{n} {self.what} as {kind}" for kind, n in sorted(kinds.items())), self.rest])


class _Graph:
    """Nodes and initializers, with fresh value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def dequantized(self, key: str, coded: CodedWeight) -> str:
        """The nodes that compute the weight ``key`` from its codes (:class:`CodedWeight`:
        ``Cast`` and ``Mul``, then ``Add`` and ``Where`` where needed); returns their output.
        Plain float ops on constants: onnxruntime folds them into float32 weights as it loads
        the file, in any session. (``DequantizeLinear`` would stay unfolded in a default
        session, kept for a quantized activation this graph does not have: every inference
        would recompute the weights, at about half the dense model's speed.)"""
        codes = self.op("Cast", [self.const(f"{key}.codes", coded.codes)], f"{key}.float", to=TensorProto.FLOAT)
        y = self.op("Mul", [codes, self.const(f"{key}.scale", coded.scale)], f"{key}.dequantized")
        if coded.offset.any():
            y = self.op("Add", [y, self.const(f"{key}.offset", coded.offset)], f"{key}.shifted")
        if coded.on_grid is not None:
            y = self.op("Where", [self.unpacked(key, coded.on_grid), y,
                                  self.const(f"{key}.zero", np.array(0, np.float32))], f"{key}.masked")
        return y

    def unpacked(self, key: str, mask: np.ndarray) -> str:
        """The boolean ``mask`` stored as one bit per weight (``np.packbits``, first bit the
        highest), unpacked by ``BitShift``, ``BitwiseAnd``, ``Slice`` and ``Cast`` (folded at load)."""
        bits = self.const(f"{key}.on_grid.bits", np.packbits(mask.reshape(-1)).reshape(-1, 1))
        shifts = self.const(f"{key}.on_grid.shifts", np.arange(7, -1, -1, dtype=np.uint8))
        each = self.op("BitwiseAnd", [self.op("BitShift", [bits, shifts], f"{key}.on_grid.shifted", direction="RIGHT"),
                                      self.const(f"{key}.on_grid.one", np.array(1, np.uint8))], f"{key}.on_grid.each")
        flat = self.op("Reshape", [each, self.const(f"{key}.on_grid.flat", np.array([-1]))], f"{key}.on_grid.flat_bits")
        ends = [self.const(f"{key}.on_grid.{k}", np.array([v])) for k, v in (("start", 0), ("end", mask.size))]
        shape = self.const(f"{key}.on_grid.shape", np.array(mask.shape))
        shaped = self.op("Reshape", [self.op("Slice", [flat, *ends], f"{key}.on_grid.sliced"), shape], f"{key}.on_grid.shaped")
        return self.op("Cast", [shaped], f"{key}.on_grid", to=TensorProto.BOOL)


def to_onnx(ckpt: Checkpoint, codes: bool = True) -> OnnxModel:
    """The ONNX model of a baked checkpoint (input ``images`` N x C x H x W, normalized as for
    training; output ``logits`` N x classes): a CIFAR ResNet's graph written by hand
    (:func:`resnet_to_onnx`), any other network's exported by torch (:func:`module_to_onnx`).
    Quantized weights are stored as their codes, or with ``codes=False`` as float32 (the
    values are the same). ``ValueError`` if the network cannot be rebuilt or its quantized
    tensors are off their grid."""
    if arch_of(ckpt.state_dict) in ARCHS:
        return resnet_to_onnx(ckpt, codes)
    quant = quant_meta(ckpt) if codes else None
    quantized = set(quant.grids) if quant else set()
    if quant and not quantized:
        raise ValueError("checkpoint meta: quantized, but no grids recorded (meta['quant']['grids']): "
                         "cannot tell which weights to store as codes")
    return module_to_onnx(reference(ckpt), ckpt.state_dict, quant, quantized, image_shape(ckpt), _net_name(ckpt))


def image_shape(ckpt: Checkpoint) -> tuple[int, int, int]:
    """``C x H x W`` of the network's input: 3 channels (``meta["data"]["channels"]`` if given)
    and ``image_size`` from ``meta["data"]`` (an int, or ``[H, W]``), 32 if it has none."""
    data = (ckpt.meta or {}).get("data") or {}
    size = data.get("image_size") or DEFAULT_IMAGE_SIZE
    h, w = (size, size) if isinstance(size, int) else size
    return int(data.get("channels") or 3), int(h), int(w)


def _net_name(ckpt: Checkpoint) -> str:
    """The graph's name: the last part of ``meta["net"]["_target_"]``, else ``model``."""
    target = str(((ckpt.meta or {}).get("net") or {}).get("_target_") or "model")
    return target.rpartition(".")[2]


def resnet_to_onnx(ckpt: Checkpoint, codes: bool = True) -> OnnxModel:
    """The hand-written graph of a CIFAR ResNet checkpoint (input N x 3 x 32 x 32): see the
    module docstring. The quantized weights are those with recorded grids (older checkpoints:
    the block convs), stored as codes unless ``codes=False``. ``ValueError`` if it is not one
    or its quantized tensors are off their grid."""
    model = reference(ckpt)
    sd = {k: v.detach().cpu() for k, v in ckpt.state_dict.items()}
    quant = quant_meta(ckpt) if codes else None
    blocks = {f"{n}.weight" for n in quantizable_layers(model)}
    quantized = (set(quant.grids) or blocks) if quant else set()  # checkpoints from before grids: the blocks
    g, out = _Graph(), OnnxModel(onnx.ModelProto())
    if quantized and quantized != blocks:  # a layer selection of its own
        out.what, out.rest = "quantized weights", "the rest float32"

    def weight(key: str) -> str:
        if key not in quantized:
            return g.const(key, sd[key].numpy())
        coded = out.coded[key] = coded_weight(key, sd[key], quant.for_tensor(key))
        out.weights[key] = g.dequantized(key, coded)
        return out.weights[key]

    def conv_bn(x: str, conv: str, bn: str, stride: int) -> str:
        y = g.op("Conv", [x, weight(f"{conv}.weight")], f"{conv}.out", strides=[stride, stride], pads=[1, 1, 1, 1])
        eps = model.get_submodule(bn).eps
        params = [g.const(f"{bn}.{p}", sd[f"{bn}.{p}"].numpy()) for p in ("weight", "bias", "running_mean", "running_var")]
        return g.op("BatchNormalization", [y, *params], f"{bn}.out", epsilon=eps)

    def activation(x: str, slot: nn.Module, name: str) -> str:
        """``x`` fake-quantized as :class:`ActFakeQuant` does: ``round(clip(x / s, 0, top)) * s``."""
        if not isinstance(slot, ActFakeQuant):
            return x
        step = g.const(f"{name}.step", slot.step().numpy())
        bounds = [g.const(f"{name}.{k}", np.array(v, np.float32)) for k, v in (("lo", 0), ("hi", slot.top))]
        codes = g.op("Round", [g.op("Clip", [g.op("Div", [x, step], f"{name}.scaled"), *bounds], f"{name}.clipped")],
                     f"{name}.codes")
        return g.op("Mul", [codes, step], name)

    model.load_state_dict(sd)  # activation ranges, if any
    x = g.op("Relu", [conv_bn("images", "conv1", "bn1", 1)], "stem.out")
    for stage in ("layer1", "layer2", "layer3"):
        for i, block in enumerate(model.get_submodule(stage)):
            p = f"{stage}.{i}"
            x = activation(x, block.act_in, f"{p}.act_in")
            y = g.op("Relu", [conv_bn(x, f"{p}.conv1", f"{p}.bn1", block.stride)], f"{p}.relu1")
            y = conv_bn(activation(y, block.act_mid, f"{p}.act_mid"), f"{p}.conv2", f"{p}.bn2", 1)
            x = g.op("Relu", [g.op("Add", [y, _shortcut(g, x, p, block.stride, block.pad)], f"{p}.add")], f"{p}.out")
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x], "pool")], "features", axis=1)
    g.op("Gemm", [pooled, weight("linear.weight"),
                  g.const("linear.bias", sd["linear.bias"].numpy())], "logits", transB=1)

    if quantized - out.coded.keys():
        raise ValueError(f"checkpoint meta: grids recorded for {sorted(quantized - out.coded.keys())[:3]}, "
                         f"which are no conv or linear weights of {model.arch}")
    classes = model.linear.out_features
    graph = helper.make_graph(
        g.nodes, model.arch, [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], g.initializers)
    out.proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="compress")
    onnx.checker.check_model(out.proto)
    return out


def _shortcut(g: _Graph, x: str, prefix: str, stride: int, pad: int) -> str:
    """Option-A shortcut: subsample by ``stride`` and zero-pad ``pad`` channels (half before)."""
    if stride == 1 and pad == 0:
        return x
    big = np.iinfo(np.int64).max
    args = {"starts": [0, 0], "ends": [big, big], "axes": [2, 3], "steps": [stride, stride]}  # H and W
    sliced = g.op("Slice", [x, *(g.const(f"{prefix}.sc.{k}", np.array(v)) for k, v in args.items())], f"{prefix}.sc.slice")
    pads = np.array([0, pad // 2, 0, 0, 0, pad - pad // 2, 0, 0])  # N, C, H, W begins, then ends
    return g.op("Pad", [sliced, g.const(f"{prefix}.sc.pads", pads)], f"{prefix}.sc.pad", mode="constant")


def module_to_onnx(model: nn.Module, state_dict: Mapping[str, torch.Tensor], quant: QuantSpec | None,
                   quantized: Iterable[str], input_shape: tuple[int, int, int] = (3, 32, 32),
                   name: str = "model") -> OnnxModel:
    """The ONNX model of any network (``model``, loaded here with the baked ``state_dict``),
    exported by torch (:func:`traced`) with every weight named in ``quantized`` stored as its
    codes under ``quant`` (:func:`coded_weight`; the nodes of :meth:`_Graph.dequantized`)
    instead of float32. Input ``images`` N x ``input_shape``, output ``logits``. ``ValueError``
    for a quantized name the state dict lacks or a weight off its grid; ``RuntimeError`` if
    the exported graph does not hold a quantized weight unchanged (an export bug)."""
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    keys = sorted(quantized)
    missing = [k for k in keys if k not in sd]
    if missing or (keys and quant is None):
        raise ValueError(f"quantized weights {missing[:3] or keys[:3]} are not in the state dict or have no quant spec")
    model.load_state_dict(state_dict)  # as given: its _metadata, if any, is some modules' format version
    out = OnnxModel(traced(model.cpu().eval(), input_shape, name), what="quantized weights", rest="the rest float32")
    g = _Graph()
    for key in keys:
        init = _initializer_of(out.proto.graph, key, sd[key])
        out.coded[key] = coded_weight(key, sd[key], quant.for_tensor(key))
        out.weights[key] = g.dequantized(key, out.coded[key])
        _rewire(out.proto.graph, init, out.weights[key])
    out.proto.graph.initializer.extend(g.initializers)
    nodes = [*g.nodes, *out.proto.graph.node]  # the weights first: topological order
    del out.proto.graph.node[:]
    out.proto.graph.node.extend(nodes)
    onnx.checker.check_model(out.proto, full_check=True)
    return out


def traced(model: nn.Module, input_shape: tuple[int, int, int], name: str = "model") -> onnx.ModelProto:
    """``model`` (eval) as exported by torch's TorchScript exporter at opset :data:`TORCH_OPSET`,
    converted to :data:`OPSET`: input ``images`` (dynamic batch), output ``logits``. Without
    constant folding, which in eval mode would also fold BatchNorm into the convolutions
    before it (changing their weights), and with every parameter its own initializer named as
    in the state dict (as graph inputs, which turns off the merging of equal initializers;
    they are taken out of the inputs here)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the exporter's deprecation notices
        torch.onnx.export(model, (torch.zeros(2, *input_shape),), buffer, dynamo=False, opset_version=TORCH_OPSET,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=False, keep_initializers_as_inputs=True)
    proto = onnx.load_from_string(buffer.getvalue())
    params = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in params]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    proto = version_converter.convert_version(proto, OPSET)
    proto.ir_version, proto.producer_name, proto.graph.name = onnx.IR_VERSION, "compress", name
    return proto


def _initializer_of(graph: onnx.GraphProto, key: str, w: torch.Tensor) -> str:
    """The initializer of ``graph`` that holds the weight ``key``: the one of that name, else
    the only one with exactly its values; ``RuntimeError`` if none does unchanged."""
    want = w.numpy()

    def holds(t: onnx.TensorProto) -> bool:
        return tuple(t.dims) == want.shape and t.data_type == TensorProto.FLOAT \
            and np.array_equal(numpy_helper.to_array(t), want)

    named = [t for t in graph.initializer if t.name == key]
    found = [t.name for t in named if holds(t)] if named else [t.name for t in graph.initializer if holds(t)]
    if len(found) != 1:
        raise RuntimeError(f"export bug: {key} is not held unchanged by one initializer of the exported graph "
                           f"({'changed by the exporter' if named else f'{len(found)} found'})")
    return found[0]


def _rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Feed every reader of the initializer ``old`` the value ``new`` instead; drop ``old``."""
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new
    kept = [t for t in graph.initializer if t.name != old]
    del graph.initializer[:]
    graph.initializer.extend(kept)


@dataclass
class Agreement:
    """onnxruntime vs PyTorch logits on ``images`` inputs."""

    images: int
    max_abs_diff: float
    argmax_agreement: float
    # With fake-quantized activations a last-bit difference between two runtimes' convolutions
    # can move an activation across a rounding boundary, to the next level: the logits then
    # differ by a whole step's effect, so only the predicted classes are held to the check, and
    # each quantizer may change a few more of them (:data:`FLIP_ALLOWANCE`).
    activation_quantizers: int = 0
    largest_logit: float = 0.0  # max |PyTorch logit|: float32 rounding differences grow with it

    @property
    def quantized_activations(self) -> bool:
        return self.activation_quantizers > 0

    @property
    def allowed_diff(self) -> float:
        """:data:`MAX_LOGIT_DIFF` per unit of the largest logit (at least 1)."""
        return MAX_LOGIT_DIFF * max(1.0, self.largest_logit)

    @property
    def min_agreement(self) -> float:
        """:data:`MIN_ARGMAX_AGREEMENT`, less :data:`FLIP_ALLOWANCE` per activation quantizer."""
        return MIN_ARGMAX_AGREEMENT - FLIP_ALLOWANCE * self.activation_quantizers

    @property
    def ok(self) -> bool:
        close = self.quantized_activations or self.max_abs_diff <= self.allowed_diff
        return close and self.argmax_agreement >= self.min_agreement

    def describe(self) -> str:
        allowed = f"{'' if self.quantized_activations else f'<= {self.allowed_diff:.2g}, '}>= {self.min_agreement:.2%}"
        verdict = "ok" if self.ok else f"FAILED (allowed: {allowed})"
        note = f" ({self.activation_quantizers} activation quantizers: logits may differ by a level's step, argmax checked)" \
            if self.quantized_activations else ""
        return (f"onnxruntime vs PyTorch on {self.images} images: max |logit diff| {self.max_abs_diff:.2e}, "
                f"same argmax {self.argmax_agreement:.2%}{note}: {verdict}")


def session(source: onnx.ModelProto | str | Path, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session of a model or ``.onnx`` file (``threads`` 0: its default), with
    default options, as a user would load it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def compare(source: onnx.ModelProto | str | Path, model: nn.Module, images: torch.Tensor, batch: int = 500) -> Agreement:
    """Run ``source`` with onnxruntime and ``model`` (eval, float32) with PyTorch on ``images``."""
    sess, model = session(source), model.eval().float()
    worst, same, largest = 0.0, 0, 0.0
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float()
        ours = model(x)
        theirs = torch.from_numpy(sess.run(["logits"], {"images": x.numpy()})[0])
        worst = max(worst, float((ours - theirs).abs().max()))
        largest = max(largest, float(ours.abs().max()))
        same += int((ours.argmax(1) == theirs.argmax(1)).sum())
    return Agreement(len(images), worst, same / max(len(images), 1), len(activation_quantizers(model)), largest)
