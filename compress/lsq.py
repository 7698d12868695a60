"""Learned quantizer ranges: LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020).

The scale (and, for ``asym``, the offset: LSQ+, Bhalgat et al. 2020) of a weight's grid are
trainable parameters instead of following the weights' range::

    code = round(clamp((w - offset) / scale, lo, hi)),   w_q = code * scale + offset

with straight-through rounding (so ``w`` gets gradient 1 inside the range, 0 beyond it) and
the scale's and offset's gradients multiplied by ``g = 1 / sqrt(N * Q_p)``, ``N`` the number of
weights each scale covers (the tensor's, or one output channel's) and ``Q_p = hi`` the largest
code. The forward value is exactly ``code * scale + offset`` in float32 (the gradient tricks
are custom autograd functions, not ``x - x.detach()`` arithmetic), and exact zeros (pruned
weights) stay exactly zero, so a baked tensor has at most ``hi - lo + 1`` values per grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compress.layers import Quantizer


class _GradScale(torch.autograd.Function):
    """Forward ``x`` unchanged, backward the gradient times ``g``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g  # type: ignore[attr-defined]
        return x.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.g, None  # type: ignore[attr-defined]


class _RoundStraightThrough(torch.autograd.Function):
    """Forward ``round(x)``, backward identity."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad


class LearnedFakeQuant(Quantizer):
    """Parametrization with a trainable grid: ``scale`` (and ``offset`` if ``learn_offset``,
    else a fixed buffer) start at the given values, scalars or per output channel
    (``C x 1 x ...``); ``codes = (lo, hi)`` is the integer code range."""

    def __init__(self, scale: torch.Tensor, offset: torch.Tensor, codes: tuple[int, int],
                 learn_offset: bool) -> None:
        super().__init__()
        self.lo, self.hi = codes
        self.scale = nn.Parameter(scale.detach().clone())
        if learn_offset:
            self.offset = nn.Parameter(offset.detach().clone())
        else:
            self.register_buffer("offset", offset.detach().clone())

    def gradient_scale(self, w: torch.Tensor) -> float:
        """LSQ's ``1 / sqrt(N * Q_p)`` for ``w``, ``N`` its weights per scale."""
        return 1.0 / math.sqrt(w.numel() / self.scale.numel() * self.hi)

    def grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale.detach().clamp_min(torch.finfo(self.scale.dtype).tiny), self.offset.detach()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g = self.gradient_scale(w)
        scale = _GradScale.apply(self.scale.clamp_min(torch.finfo(self.scale.dtype).tiny), g)
        offset = _GradScale.apply(self.offset, g)
        codes = _RoundStraightThrough.apply(((w - offset) / scale).clamp(self.lo, self.hi))
        return torch.where(w == 0, torch.zeros_like(w), codes * scale + offset)

    def extra_repr(self) -> str:
        learned = "scale and offset" if isinstance(self.offset, nn.Parameter) else "scale"
        return f"codes={self.lo}..{self.hi}, grids={self.scale.numel()}, learned {learned}"
