"""Per-tensor fixed-point fake quantization of weights, installed by a Lightning callback.

The quantizers follow the seed report's semantics:

- ``asym``: ``scale = (max - min) / (2^n - 1)``, ``w_q = round((w - min) / scale) * scale + min``
  (``2^n`` levels spanning ``[min, max]``);
- ``sym``: ``scale = max|w| / (2^(n-1) - 1)``, ``w_q = round(w / scale) * scale``
  (``2^n - 1`` levels symmetric around zero).

``clip="mse"`` (a stronger recipe, not the seed's) shrinks that range per tensor to
``clip * [min, max]`` (``clip * max|w|``), weights beyond it rounding to the end levels, with
``clip`` the factor that minimizes the quantization error of the tensor's nonzero weights; it is
chosen once, when the quantizer is installed, and kept while fine-tuning moves the weights.

Weights that are exactly zero stay exactly zero, so pruned weights stay pruned. The backward
pass is the straight-through estimator: the gradient w.r.t. the latent weight is the identity
(pruned weights get no gradient from the pruning mask that comes before the quantizer).

The fake quantization is a ``torch.nn.utils.parametrize`` parametrization, so the model stays
a plain ``ResNet`` whose ``conv.weight`` reads as the quantized tensor while the optimizer
updates ``conv.parametrizations.weight.original``. Removing it bakes the quantized values in.
"""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.layers import bake, block_convs, network, with_parametrization

Mode = Literal["sym", "asym"]
MODES: tuple[str, ...] = ("sym", "asym")
NBITS_RANGE: tuple[int, int] = (2, 8)
CLIPS: tuple[str, ...] = ("minmax", "mse")
CLIP_GRID = torch.linspace(0.2, 1.0, 41).tolist()  # range factors the mse search tries


def check_nbits(nbits: object) -> int:
    """Return ``nbits`` as an int, or raise ``ValueError`` naming it and the allowed range."""
    lo, hi = NBITS_RANGE
    if isinstance(nbits, bool) or not isinstance(nbits, int) or not lo <= nbits <= hi:
        raise ValueError(f"nbits={nbits!r} is not allowed: nbits must be an integer in {lo}..{hi}")
    return nbits


def check_mode(mode: object) -> str:
    """Return ``mode`` if it is a known quantizer, else raise ``ValueError`` listing them."""
    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r} is not allowed: use one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def check_clip(clip: object) -> str:
    """Return ``clip`` or raise ``ValueError`` naming it and the allowed values."""
    if clip not in CLIPS:
        raise ValueError(f"quant.clip={clip!r} is not allowed: use one of {', '.join(CLIPS)}")
    return clip


def quant_params(w: torch.Tensor, mode: Mode, nbits: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(scale, offset)`` so that ``w_q = code * scale + offset``, for the range
    ``clip * [min, max]`` (asym) or ``clip * max|w|`` (sym)."""
    if mode == "asym":
        lo, hi = w.min() * clip, w.max() * clip
        scale, offset = (hi - lo) / (2**nbits - 1), lo
    else:
        scale, offset = w.abs().max() * clip / (2 ** (nbits - 1) - 1), torch.zeros_like(w.flatten()[0])
    return scale.clamp_min(torch.finfo(w.dtype).tiny), offset


def code_range(mode: Mode, nbits: int) -> tuple[int, int]:
    """Smallest and largest integer code: ``0..2^n-1`` (asym), ``-(2^(n-1)-1)..2^(n-1)-1`` (sym)."""
    return (0, 2**nbits - 1) if mode == "asym" else (-(2 ** (nbits - 1) - 1), 2 ** (nbits - 1) - 1)


def quantize_codes(
    w: torch.Tensor, mode: Mode, nbits: int, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes of ``w`` (in :func:`code_range`) and its ``(scale, offset)``."""
    scale, offset = quant_params(w, mode, nbits, clip)
    return torch.round((w - offset) / scale).clamp(*code_range(mode, nbits)), scale, offset


def quantize(w: torch.Tensor, mode: Mode, nbits: int, clip: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize ``w`` (no gradient tricks); exact zeros stay zero."""
    codes, scale, offset = quantize_codes(w, mode, nbits, clip)
    return torch.where(w == 0, torch.zeros_like(w), codes * scale + offset)


@torch.no_grad()
def mse_clip(w: torch.Tensor, mode: Mode, nbits: int) -> float:
    """The factor of :data:`CLIP_GRID` whose clipped range quantizes ``w``'s nonzero weights
    with the least squared error."""
    errors = [float(((quantize(w, mode, nbits, c) - w)[w != 0] ** 2).sum()) for c in CLIP_GRID]
    return CLIP_GRID[errors.index(min(errors))]


class _StraightThrough(torch.autograd.Function):
    """``quantize`` forward (bit-exact levels), identity backward."""

    @staticmethod
    def forward(ctx: object, w: torch.Tensor, mode: Mode, nbits: int, clip: float) -> torch.Tensor:
        return quantize(w, mode, nbits, clip)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad, None, None, None


class FakeQuant(nn.Module):
    """Parametrization: forward is ``quantize(w, clip=clip)``, backward is straight-through."""

    def __init__(self, mode: Mode, nbits: int, clip: float = 1.0) -> None:
        super().__init__()
        self.mode, self.nbits, self.clip = check_mode(mode), check_nbits(nbits), clip

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(w, self.mode, self.nbits, self.clip)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, nbits={self.nbits}, clip={self.clip:g}"


class QuantizationCallback(pl.Callback):
    """Fake-quantize the weights of the residual-block convolutions while training and testing.

    Installs a :class:`FakeQuant` parametrization on every selected layer in ``setup`` (once;
    later ``setup`` calls of the same trainer are no-ops) and bakes the quantized values into
    plain weights in :meth:`remove`. Register it *after* a pruning callback so the quantizer
    sees the masked weights.

    Args:
        mode: ``"sym"`` or ``"asym"`` (see the module docstring for the formulas).
        nbits: bit width, 2..8.
        clip: ``"minmax"`` (the seed's full range) or ``"mse"`` (per tensor, the range factor
            that minimizes the quantization error, found at install).
    """

    def __init__(self, mode: Mode, nbits: int, clip: str = "minmax") -> None:
        self.mode, self.nbits, self.clip = check_mode(mode), check_nbits(nbits), check_clip(clip)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.install(network(pl_module))

    def check(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers this callback would quantize; ``ValueError`` if there are none."""
        layers = block_convs(model)
        if not layers:
            raise ValueError(
                f"quant={self.mode} found nothing to quantize: {type(model).__name__} has no "
                "convolutions inside residual blocks"
            )
        return layers

    def install(self, model: nn.Module) -> None:
        """Parametrize the block convolutions of ``model`` (no-op if already done)."""
        if with_parametrization(model, FakeQuant):
            return
        for m in self.check(model).values():
            factor = mse_clip(m.weight, self.mode, self.nbits) if self.clip == "mse" else 1.0
            parametrize.register_parametrization(m, "weight", FakeQuant(self.mode, self.nbits, factor))

    @staticmethod
    def remove(model: nn.Module) -> None:
        """Bake the quantized (and masked) weights into plain parameters."""
        bake(model)
