"""Fixed-point fake quantization of weights, installed by a Lightning callback.

The quantizers follow the seed report's semantics:

- ``asym``: ``scale = (max - min) / (2^n - 1)``, ``w_q = round((w - min) / scale) * scale + min``
  (``2^n`` levels spanning ``[min, max]``);
- ``sym``: ``scale = max|w| / (2^(n-1) - 1)``, ``w_q = round(w / scale) * scale``
  (``2^n - 1`` levels symmetric around zero).

``clip="mse"`` (a stronger recipe, not the seed's) shrinks that range per tensor to
``clip * [min, max]`` (``clip * max|w|``), weights beyond it rounding to the end levels, with
``clip`` the factor that minimizes the quantization error of the tensor's nonzero weights; it is
chosen once, when the quantizer is installed, and kept while fine-tuning moves the weights.

``granularity="channel"`` (beyond the seed) gives every output channel (dim 0) its own range,
so its own ``(scale, offset)`` and, with ``clip="mse"``, its own clip factor; ``"tensor"`` (the
seed's) one for the whole tensor. ``learn_range=True`` makes the scale (and the ``asym`` offset)
trainable instead of following the weights' range (LSQ, see :mod:`compress.lsq`).

``layer_nbits`` (``quant.layer_nbits``: block conv name -> bit width) gives the layers it names
their own bit width; the others take ``nbits``.

Weights that are exactly zero stay exactly zero, so pruned weights stay pruned. The backward
pass is the straight-through estimator: the gradient w.r.t. the latent weight is the identity
(pruned weights get no gradient from the pruning mask that comes before the quantizer).

The fake quantization is a ``torch.nn.utils.parametrize`` parametrization, so the model stays
a plain ``ResNet`` whose ``conv.weight`` reads as the quantized tensor while the optimizer
updates ``conv.parametrizations.weight.original``. Removing it bakes the quantized values in.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Mapping

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.actquant import ActivationQuantCallback, check_abits, has_activation_slots
from compress.batchnorm import BatchNormRecalibration
from compress.layers import Quantizer, bake, baked_grid, check_layer_map, network, quantized_layers, with_parametrization
from compress.lsq import LearnedFakeQuant
from compress.methods import Method, check_count
from compress.prune import KeepMasks

Mode = Literal["sym", "asym"]
MODES: tuple[str, ...] = ("sym", "asym")
NBITS_RANGE: tuple[int, int] = (2, 8)
CLIPS: tuple[str, ...] = ("minmax", "mse")
CLIP_GRID = torch.linspace(0.2, 1.0, 41).tolist()  # range factors the mse search tries
GRANULARITIES: tuple[str, ...] = ("tensor", "channel")


def check_nbits(nbits: object, key: str = "nbits") -> int:
    """Return ``nbits`` as an int, or raise ``ValueError`` naming it (as ``key``) and the allowed range."""
    lo, hi = NBITS_RANGE
    if isinstance(nbits, bool) or not isinstance(nbits, int) or not lo <= nbits <= hi:
        raise ValueError(f"{key}={nbits!r} is not allowed: nbits must be an integer in {lo}..{hi}")
    return nbits


def check_layer_nbits(layer_nbits: object, layers: Iterable[str]) -> dict[str, int]:
    """``quant.layer_nbits`` as ``{layer: nbits}``; ``ValueError`` naming a layer or pattern
    that is not one of ``layers`` (the quantized ones, listed) or a bit width outside 2..8."""
    return check_layer_map("quant.layer_nbits", layer_nbits, layers, check_nbits)


def layer_widths(layers: Iterable[str], nbits: int, layer_nbits: Mapping[str, int] | None = None) -> dict[str, int]:
    """The bit width of every quantized layer: its own from ``layer_nbits``, else ``nbits``."""
    names = list(layers)
    own = check_layer_nbits(layer_nbits, names)
    return {n: own.get(n, nbits) for n in names}


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


def check_granularity(granularity: object) -> str:
    """Return ``granularity`` or raise ``ValueError`` naming it and the allowed values."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"quant.granularity={granularity!r} is not allowed: use one of {', '.join(GRANULARITIES)}")
    return granularity  # type: ignore[return-value]


def check_learn_range(learn_range: object) -> bool:
    """Return ``learn_range`` or raise ``ValueError`` naming it and the allowed values."""
    if not isinstance(learn_range, bool):
        raise ValueError(f"quant.learn_range={learn_range!r} is not allowed: use true or false")
    return learn_range


Clip = float | torch.Tensor  # one factor, or one per output channel (shaped like a per-channel scale)


def _extreme(w: torch.Tensor, op: str, channel: bool) -> torch.Tensor:
    """``w.amin()``/``w.amax()`` (``op``) over the whole tensor, or per output channel shaped
    ``C x 1 x ...`` so that it broadcasts against ``w``."""
    if not channel:
        return getattr(w, op)()
    return getattr(w.reshape(w.shape[0], -1), op)(1).reshape(-1, *[1] * (w.dim() - 1))


def quant_params(
    w: torch.Tensor, mode: Mode, nbits: int, clip: Clip = 1.0, channel: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` so that ``w_q = code * scale + offset``, for the range
    ``clip * [min, max]`` (asym) or ``clip * max|w|`` (sym): scalars, or per output channel
    (``channel``) shaped ``C x 1 x ...``."""
    if mode == "asym":
        lo, hi = _extreme(w, "amin", channel) * clip, _extreme(w, "amax", channel) * clip
        scale, offset = (hi - lo) / (2**nbits - 1), lo
    else:
        scale = _extreme(w.abs(), "amax", channel) * clip / (2 ** (nbits - 1) - 1)
        offset = torch.zeros_like(scale)
    return scale.clamp_min(torch.finfo(w.dtype).tiny), offset


def code_range(mode: Mode, nbits: int) -> tuple[int, int]:
    """Smallest and largest integer code: ``0..2^n-1`` (asym), ``-(2^(n-1)-1)..2^(n-1)-1`` (sym)."""
    return (0, 2**nbits - 1) if mode == "asym" else (-(2 ** (nbits - 1) - 1), 2 ** (nbits - 1) - 1)


def quantize_codes(
    w: torch.Tensor, mode: Mode, nbits: int, clip: Clip = 1.0, channel: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes of ``w`` (in :func:`code_range`) and its ``(scale, offset)``."""
    scale, offset = quant_params(w, mode, nbits, clip, channel)
    return torch.round((w - offset) / scale).clamp(*code_range(mode, nbits)), scale, offset


def quantize(w: torch.Tensor, mode: Mode, nbits: int, clip: Clip = 1.0, channel: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``w`` (no gradient tricks), per tensor or per output channel
    (``channel``); exact zeros stay zero."""
    codes, scale, offset = quantize_codes(w, mode, nbits, clip, channel)
    return torch.where(w == 0, torch.zeros_like(w), codes * scale + offset)


def _squared_error(w: torch.Tensor, q: torch.Tensor, channel: bool) -> torch.Tensor:
    """Squared error of ``q`` on ``w``'s nonzero weights: in all, or per output channel."""
    if not channel:
        return ((q - w)[w != 0] ** 2).sum()
    return (((q - w) * (w != 0)) ** 2).reshape(w.shape[0], -1).sum(1)


@torch.no_grad()
def mse_clip(w: torch.Tensor, mode: Mode, nbits: int, channel: bool = False) -> Clip:
    """The factor of :data:`CLIP_GRID` whose clipped range quantizes ``w``'s nonzero weights
    with the least squared error (the first such): one, or per output channel (``channel``)
    a tensor of them shaped ``C x 1 x ...``."""
    errors = torch.stack([_squared_error(w, quantize(w, mode, nbits, c, channel), channel) for c in CLIP_GRID])
    best = errors.argmin(0)
    if not channel:
        return CLIP_GRID[int(best)]
    return torch.tensor(CLIP_GRID, dtype=w.dtype, device=w.device)[best].reshape(-1, *[1] * (w.dim() - 1))


class _StraightThrough(torch.autograd.Function):
    """``quantize`` forward (bit-exact levels), identity backward."""

    @staticmethod
    def forward(ctx: object, w: torch.Tensor, mode: Mode, nbits: int, clip: torch.Tensor,
                channel: bool) -> torch.Tensor:
        return quantize(w, mode, nbits, clip, channel)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        return grad, None, None, None, None


class FakeQuant(Quantizer):
    """Parametrization: forward is ``quantize(w, clip=clip, channel=channel)``, backward is
    straight-through. ``clip`` is kept as a (non-persistent) buffer, so it moves with the model."""

    clip: torch.Tensor

    def __init__(self, mode: Mode, nbits: int, clip: Clip = 1.0, channel: bool = False) -> None:
        super().__init__()
        self.mode, self.nbits, self.channel = check_mode(mode), check_nbits(nbits), channel
        self.register_buffer("clip", torch.as_tensor(clip, dtype=torch.float32), persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(w, self.mode, self.nbits, self.clip, self.channel)

    def grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quant_params(w, self.mode, self.nbits, self.clip, self.channel)

    def extra_repr(self) -> str:
        clip = f"{float(self.clip):g}" if self.clip.dim() == 0 else f"{self.clip.numel()} per-channel factors"
        granularity = "channel" if self.channel else "tensor"
        return f"mode={self.mode}, nbits={self.nbits}, clip={clip}, granularity={granularity}"


class QuantizationCallback(Method):
    """Fake-quantize the weights of the selected layers while training and testing.

    Installs a quantizer parametrization (:class:`FakeQuant`, or with ``learn_range`` a
    :class:`compress.lsq.LearnedFakeQuant`) on every selected layer in ``setup`` (once; later
    ``setup`` calls of the same trainer are no-ops) and bakes the quantized values into plain
    weights in :meth:`remove`. Its stage keeps earlier pruning masks first (so the quantizer sees
    the masked weights) and adds activation quantization and BatchNorm re-estimation after it.

    Args:
        mode: ``"sym"`` or ``"asym"`` (see the module docstring for the formulas).
        nbits: bit width, 2..8.
        clip: ``"minmax"`` (the seed's full range) or ``"mse"`` (per tensor or channel, the
            range factor that minimizes the quantization error, found at install).
        granularity: ``"tensor"`` (one range per tensor) or ``"channel"`` (one per output channel).
        learn_range: train the scale (and ``asym`` offset), initialized from the range above.
        layer_nbits: bit widths of single layers (name or ``re:`` pattern -> nbits); the others take ``nbits``.
        abits: activation bits after the ReLUs feeding the CIFAR ResNets' block convs (None: weights only).
        bn_recalibration: > 0: re-estimate BatchNorm statistics on this many training images once quantized.
        epochs: fine-tuning epochs of the stage.
        layers: which layers it quantizes (see :mod:`compress.selection`); null entries: the
            model's default (the CIFAR ResNets: the block convs; other models: every conv/linear
            but the first and the last).
    """

    stage, verb = "quant", "quantize"

    def __init__(self, mode: Mode, nbits: int, clip: str = "minmax", granularity: str = "tensor",
                 learn_range: bool = False, layer_nbits: Mapping[str, int] | None = None, abits: int | None = None,
                 bn_recalibration: int = 0, epochs: int = 0, layers: Mapping[str, Any] | None = None) -> None:
        super().__init__(epochs, layers)
        self.mode, self.nbits, self.clip = check_mode(mode), check_nbits(nbits), check_clip(clip)
        self.channel = check_granularity(granularity) == "channel"
        self.learn_range = check_learn_range(learn_range)
        if layer_nbits is not None and not isinstance(layer_nbits, Mapping):
            raise ValueError(f"quant.layer_nbits={layer_nbits!r} is not allowed: use a map of layer name (or re: "
                             "pattern) to bit width")
        self.layer_patterns = {str(n): check_nbits(b, f"quant.layer_nbits.{n}") for n, b in (layer_nbits or {}).items()}
        self.abits = check_abits(abits)
        self.bn_recalibration = check_count("quant.bn_recalibration", bn_recalibration)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.install(network(pl_module))

    def prepare(self, model: nn.Module) -> None:
        layers = self.selected(model)
        check_layer_nbits(self.layer_patterns, layers)
        if self.abits is not None and not has_activation_slots(model):
            raise ValueError(f"quant.abits={self.abits} needs the activation slots of the CIFAR ResNets' blocks, "
                             f"which {type(model).__name__} does not have: use quant.abits=null")

    def widths(self, model: nn.Module) -> dict[str, int]:
        """The bit width of every layer it quantizes in ``model``."""
        return layer_widths(self.selected(model), self.nbits, self.layer_patterns)

    def callbacks(self, masks: Mapping[str, torch.Tensor]) -> list[pl.Callback]:
        """Masks kept, weight (and activation) fake quantization, then BatchNorm re-estimation if asked for."""
        keep = [KeepMasks(masks)] if masks else []
        activations = [ActivationQuantCallback(self.abits, self.learn_range)] if self.abits else []
        recalibrate = [BatchNormRecalibration(self.bn_recalibration)] if self.bn_recalibration else []
        return [*keep, self, *activations, *recalibrate]

    def choices(self) -> dict[str, Any]:
        return {"quant": self.mode, "nbits": self.nbits, "abits": self.abits,
                "granularity": "channel" if self.channel else "tensor"}

    def record(self, model: nn.Module) -> dict[str, Any]:
        """What ``model.pt``'s meta and ``model.cpk`` need: mode, bit widths, grids of the baked layers."""
        widths = check_layer_nbits(self.layer_patterns, self.selected(model))  # patterns resolved to layer names
        own = {"layer_nbits": widths} if widths else {}
        abits = {"abits": self.abits} if self.abits else {}
        return {"mode": self.mode, "nbits": self.nbits, "granularity": "channel" if self.channel else "tensor",
                "grids": baked_grids(model), **own, **abits}

    def install(self, model: nn.Module) -> None:
        """Parametrize the selected layers of ``model`` (no-op if already done)."""
        if with_parametrization(model, Quantizer):
            return
        layers = self.selected(model)
        widths = layer_widths(layers, self.nbits, self.layer_patterns)
        for name, m in layers.items():
            parametrize.register_parametrization(m, "weight", self.quantizer(m.weight.detach(), widths[name]))

    def quantizer(self, w: torch.Tensor, nbits: int | None = None) -> Quantizer:
        """The parametrization for the (masked) weight ``w``, at ``nbits`` (default: the callback's)."""
        nbits = self.nbits if nbits is None else nbits
        factor = mse_clip(w, self.mode, nbits, self.channel) if self.clip == "mse" else 1.0
        if not self.learn_range:
            return FakeQuant(self.mode, nbits, factor, self.channel)
        scale, offset = quant_params(w, self.mode, nbits, factor, self.channel)
        return LearnedFakeQuant(scale, offset, code_range(self.mode, nbits), learn_offset=self.mode == "asym")

    @staticmethod
    def remove(model: nn.Module) -> None:
        """Bake the quantized (and masked) weights into plain parameters."""
        bake(model)


def baked_grids(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """The ``(scale, offset)`` every baked quantized layer was quantized with (one each, or one
    per output channel), by weight name: what ``compress.export`` stores the codes with."""
    grids = {f"{n}.weight": baked_grid(m) for n, m in quantized_layers(model).items()}
    return {n: {"scale": g[0].flatten().tolist(), "offset": g[1].flatten().tolist()}
            for n, g in grids.items() if g is not None}
