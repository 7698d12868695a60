"""Give a freshly built network the layer widths of a channel-pruned checkpoint.

Channel pruning (:mod:`compress.channels`) removes whole filters, so the pruned network's
tensors are smaller than those its constructor builds. A checkpoint of it records
``meta["channels"]`` (and its artifact the manifest's ``channels``); :func:`resize_to` then
shrinks every Conv2d, Linear and BatchNorm of the fresh network to the checkpoint's shapes (a
depthwise conv stays depthwise), after which its ``state_dict`` loads as usual.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _resize_conv(m: nn.Conv2d, weight: torch.Size) -> None:
    out_channels, per_group = int(weight[0]), int(weight[1])
    depthwise = m.groups > 1 and m.groups == m.in_channels
    groups = out_channels if depthwise else m.groups
    m.out_channels, m.in_channels, m.groups = out_channels, per_group * groups, groups
    m.weight = nn.Parameter(torch.empty(weight))
    if m.bias is not None:
        m.bias = nn.Parameter(torch.empty(out_channels))


def _resize_linear(m: nn.Linear, weight: torch.Size) -> None:
    m.out_features, m.in_features = int(weight[0]), int(weight[1])
    m.weight = nn.Parameter(torch.empty(weight))
    if m.bias is not None:
        m.bias = nn.Parameter(torch.empty(m.out_features))


def _resize_norm(m: nn.Module, n: int) -> None:
    m.num_features = n
    if m.affine:
        m.weight, m.bias = nn.Parameter(torch.empty(n)), nn.Parameter(torch.empty(n))
    if m.track_running_stats:
        m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)


def resize_to(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Shrink (or grow) ``model``'s Conv2d, Linear and BatchNorm layers in place to the weight
    shapes of ``state_dict``; returns the names of the layers it changed."""
    changed = []
    for name, m in model.named_modules():
        w = state_dict.get(f"{name}.weight" if name else "weight")
        if w is None or (isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.shape == w.shape):
            continue
        if isinstance(m, nn.Conv2d):
            _resize_conv(m, w.shape)
        elif isinstance(m, nn.Linear):
            _resize_linear(m, w.shape)
        elif isinstance(m, NORMS):
            _resize_norm(m, int(w.shape[0]))
        else:
            continue
        changed.append(name)
    return changed
