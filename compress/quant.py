"""Per-tensor fixed-point fake quantization of weights, installed by a Lightning callback.

The quantizers follow the seed report's semantics:

- ``asym``: ``scale = (max - min) / (2^n - 1)``, ``w_q = round((w - min) / scale) * scale + min``
  (``2^n`` levels spanning ``[min, max]``);
- ``sym``: ``scale = max|w| / (2^(n-1) - 1)``, ``w_q = round(w / scale) * scale``
  (``2^n - 1`` levels symmetric around zero).

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


def quant_params(w: torch.Tensor, mode: Mode, nbits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(scale, offset)`` so that ``w_q = code * scale + offset``."""
    if mode == "asym":
        lo, hi = w.min(), w.max()
        scale, offset = (hi - lo) / (2**nbits - 1), lo
    else:
        scale, offset = w.abs().max() / (2 ** (nbits - 1) - 1), torch.zeros_like(w.flatten()[0])
    return scale.clamp_min(torch.finfo(w.dtype).tiny), offset


def quantize_codes(w: torch.Tensor, mode: Mode, nbits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes of ``w`` and its ``(scale, offset)``: ``asym`` codes are in ``0..2^n-1``,
    ``sym`` codes in ``-(2^(n-1)-1)..2^(n-1)-1``."""
    scale, offset = quant_params(w, mode, nbits)
    return torch.round((w - offset) / scale), scale, offset


def quantize(w: torch.Tensor, mode: Mode, nbits: int) -> torch.Tensor:
    """Quantize-dequantize ``w`` (no gradient tricks); exact zeros stay zero."""
    codes, scale, offset = quantize_codes(w, mode, nbits)
    return torch.where(w == 0, torch.zeros_like(w), codes * scale + offset)


class _StraightThrough(torch.autograd.Function):
    """``quantize`` forward (bit-exact levels), identity backward."""

    @staticmethod
    def forward(ctx: object, w: torch.Tensor, mode: Mode, nbits: int) -> torch.Tensor:
        return quantize(w, mode, nbits)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class FakeQuant(nn.Module):
    """Parametrization: forward is ``quantize(w)``, backward is straight-through."""

    def __init__(self, mode: Mode, nbits: int) -> None:
        super().__init__()
        self.mode, self.nbits = check_mode(mode), check_nbits(nbits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(w, self.mode, self.nbits)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, nbits={self.nbits}"


class QuantizationCallback(pl.Callback):
    """Fake-quantize the weights of the residual-block convolutions while training and testing.

    Installs a :class:`FakeQuant` parametrization on every selected layer in ``setup`` (once;
    later ``setup`` calls of the same trainer are no-ops) and bakes the quantized values into
    plain weights in :meth:`remove`. Register it *after* a pruning callback so the quantizer
    sees the masked weights.

    Args:
        mode: ``"sym"`` or ``"asym"`` (see the module docstring for the formulas).
        nbits: bit width, 2..8.
    """

    def __init__(self, mode: Mode, nbits: int) -> None:
        self.mode, self.nbits = check_mode(mode), check_nbits(nbits)

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
            parametrize.register_parametrization(m, "weight", FakeQuant(self.mode, self.nbits))

    @staticmethod
    def remove(model: nn.Module) -> None:
        """Bake the quantized (and masked) weights into plain parameters."""
        bake(model)
