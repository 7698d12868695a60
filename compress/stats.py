"""What a (baked, plain) compressed model verifiably is: sparsity and distinct values per layer
(and per output channel)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.layers import prunable_layers, quantizable_layers, quantized_layers


def sparsity(model: nn.Module) -> dict[str, Any]:
    """Fraction of exactly-zero weights per conv/linear layer and over all of them."""
    layers = {n: m.weight.detach() for n, m in prunable_layers(model).items()}
    zeros = {n: int((w == 0).sum()) for n, w in layers.items()}
    total = sum(w.numel() for w in layers.values())
    return {
        "overall": sum(zeros.values()) / total,
        "layers": {n: zeros[n] / w.numel() for n, w in layers.items()},
    }


def counted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose distinct values count: the quantized ones (baked in this process), else
    (a model loaded from a file) the model's default quantized layers."""
    return quantized_layers(model) or quantizable_layers(model)


def distinct_values(model: nn.Module) -> dict[str, int]:
    """Number of distinct nonzero weight values in each quantized layer (see :func:`counted_layers`)."""
    out = {}
    for name, m in counted_layers(model).items():
        w = m.weight.detach()
        out[name] = int(torch.unique(w[w != 0]).numel())
    return out


def distinct_values_per_channel(model: nn.Module) -> dict[str, int]:
    """The most distinct nonzero weight values of any output channel, per quantized layer (see
    :func:`counted_layers`; at most ``2^nbits`` for per-channel as for per-tensor quantization)."""
    out = {}
    for name, m in counted_layers(model).items():
        w = m.weight.detach()
        out[name] = max(int(torch.unique(c[c != 0]).numel()) for c in w)
    return out
