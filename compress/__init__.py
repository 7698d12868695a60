"""compress: prune and quantize small vision models, swept with Hydra.

The public API, for a Lightning ``Trainer`` or a plain PyTorch loop of one's own (see
docs/library.md):

- callbacks: :class:`PruningCallback`, :class:`QuantizationCallback`,
  :class:`DistillationCallback` (each a method of the Hydra app's ``prune=``/``quant=``/``distill=``);
- functions: :func:`apply_pruning`, :func:`apply_quantization`, :func:`bake`, :func:`save` (a packed
  ``.cpk``), :func:`load` (its plain network), :func:`read_manifest`, :func:`accuracy`;
- statistics: :func:`sparsity`, :func:`distinct_values`, :func:`distinct_values_per_channel`;
- layer choice: :class:`LayerSelection`, :func:`select_layers`.
"""

from compress.api import accuracy, apply_pruning, apply_quantization, save
from compress.distill import DistillationCallback
from compress.export import load, read_manifest
from compress.layers import bake
from compress.prune import PruningCallback
from compress.quant import QuantizationCallback
from compress.selection import LayerSelection, select_layers
from compress.stats import distinct_values, distinct_values_per_channel, sparsity

__version__ = "0.1.0"
__all__ = [
    "DistillationCallback", "LayerSelection", "PruningCallback", "QuantizationCallback", "accuracy", "apply_pruning",
    "apply_quantization", "bake", "distinct_values", "distinct_values_per_channel", "load", "read_manifest", "save",
    "select_layers", "sparsity",
]
