"""Compression in a plain PyTorch loop or a Lightning Trainer of one's own.

The Hydra app (``python -m compress.train``) is one user of these; a script is another::

    from compress import apply_pruning, apply_quantization, save, load

    pruning = apply_pruning(model, sparsity=0.8)             # masks on every conv/linear weight
    quant = apply_quantization(model, "asym", nbits=4)       # fake-quantized weights (after the masks)
    ...                                                       # train as usual: zeros stay zero
    report = save(model, "model.cpk", quant=quant, net={"_target_": "torchvision.models.mobilenet_v2"})
    small = load("model.cpk")                                 # the plain network, baked weights

In a Lightning ``Trainer`` pass the callbacks instead (``PruningCallback``,
``QuantizationCallback``, ``DistillationCallback``): they install themselves in ``setup``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from compress.checkpoint import Checkpoint
from compress.export import save as save_artifact
from compress.layers import bake
from compress.prune import PruningCallback, current_masks
from compress.quant import QuantizationCallback


def apply_pruning(model: nn.Module, sparsity: float = 0.8, scope: str = "global", *, layers: Mapping[str, Any] | None = None,
          layer_sparsity: Mapping[str, float] | None = None, min_density: float = 0.001) -> PruningCallback:
    """Magnitude-prune ``model``'s selected weights to ``sparsity`` now (``scope``: ``layer`` or
    ``global``), keeping the masks on as parametrizations so later training keeps the zeros.
    ``layers`` selects the layers (see :mod:`compress.selection`; default: every conv/linear
    weight). Returns the callback, whose :meth:`~PruningCallback.prune` re-prunes to a new target."""
    method = PruningCallback(sparsity, scope, 0, layer_sparsity=layer_sparsity, layers=layers, min_density=min_density)
    method.install(model)
    return method


def apply_quantization(model: nn.Module, mode: str = "asym", nbits: int = 4, *, granularity: str = "tensor", clip: str = "minmax",
             layers: Mapping[str, Any] | None = None, layer_nbits: Mapping[str, int] | None = None) -> QuantizationCallback:
    """Fake-quantize ``model``'s selected weights (``mode`` ``sym``/``asym``, ``nbits`` 2..8, per
    tensor or ``channel``) as parametrizations: the forward sees ``code * scale + offset``, the
    gradient passes straight through. Default layers: the model's own choice (CIFAR ResNets: the
    block convs), else every conv/linear but the first and the last. Prune first, if at all."""
    method = QuantizationCallback(mode, nbits, clip, granularity, layer_nbits=layer_nbits, layers=layers)
    method.install(model)
    return method


def save(model: nn.Module, path: str | os.PathLike, *, quant: QuantizationCallback | None = None,
         net: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None,
         fp_dtype: str = "float32") -> dict[str, Any]:
    """Bake ``model`` (its masks and quantizers become plain weights, in place) and write it as a
    packed ``model.cpk``; returns the size report. ``quant``: the :func:`apply_quantization` it was
    quantized with (its codes are stored at ``nbits``); ``net``: the ``_target_`` config that
    builds the network (not needed for the CIFAR ResNets), so :func:`compress.export.load`
    can rebuild it; ``data``: what its inputs are (``num_classes``, ``mean``, ``std``, ``image_size``)."""
    masks = {n: m.clone() for n, m in current_masks(model).items()}
    bake(model)
    meta = {"quant": quant.record(model) if quant else None, "net": dict(net) if net else None,
            "data": dict(data) if data else None}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_artifact(Checkpoint(state, {k: v.cpu() for k, v in masks.items()}, meta), path, fp_dtype)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Any, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` (eval mode) over ``(images, labels)`` batches."""
    model.eval().to(device)
    right = total = 0
    for x, y in batches:
        right += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        total += len(y)
    return right / max(total, 1)
