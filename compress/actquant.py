"""Activation fake quantization (``quant.abits``): unsigned, per tensor, after the ReLUs that
feed the residual-block convolutions.

Every :class:`compress.models.resnet.BasicBlock` has two activation slots, identities in a
plain network: ``act_in`` (the block's input, i.e. the stem's or the previous block's final
ReLU output, seen by ``conv1`` and the shortcut) and ``act_mid`` (the ReLU between ``conv1``
and ``conv2``). :class:`ActivationQuantCallback` puts an :class:`ActFakeQuant` in each, so
every block conv reads ``abits``-bit activations while the stem's input and the classifier's
(the last block's output) stay full precision, as their weights do. With ``quant.abits``
unset (the default) nothing changes: weight-only quantization, as the seed.

The levels are ``code * s`` with ``code`` in ``0..2^abits - 1`` and ``s = range / (2^abits - 1)``:
values above ``range`` clip to the top level. ``range`` is calibrated before the stage's first
test or fit (the mean over a few training batches of each batch's maximum; ``quant.clip``
applies to weights only), then either
follows an exponential moving average of the batch maxima of training steps (``learn=False``)
or is a trainable parameter with LSQ's gradient (``learn=True``: Esser et al. 2020; its
gradient scaled by ``1 / sqrt(features * Q_p)``). Rounding is straight-through; the input's
gradient is zero where it was clipped. The formula is the same in both modes, so a model
reloaded with fixed ranges computes the same values.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import nn

from compress.data import leading_images
from compress.layers import network
from compress.lsq import _GradScale, _RoundStraightThrough
from compress.models.resnet import BasicBlock

SLOTS = ("act_in", "act_mid")
ABITS_RANGE = (2, 8)
MOMENTUM = 0.1  # of the moving average of batch maxima (as BatchNorm's default)


def check_abits(abits: object) -> int | None:
    """Return ``abits`` (None: no activation quantization) or raise ``ValueError`` naming it."""
    lo, hi = ABITS_RANGE
    if abits is None:
        return None
    if isinstance(abits, bool) or not isinstance(abits, int) or not lo <= abits <= hi:
        raise ValueError(f"quant.abits={abits!r} is not allowed: use null (weights only) or an integer in {lo}..{hi}")
    return abits


class ActFakeQuant(nn.Module):
    """Unsigned ``nbits`` fake quantization of a non-negative activation with a clipping
    ``range`` (a buffer, or with ``learn`` a parameter)."""

    range: torch.Tensor

    def __init__(self, nbits: int, learn: bool = False) -> None:
        super().__init__()
        self.nbits, self.learn = check_abits(nbits), learn
        self.top = 2**nbits - 1
        initial = torch.tensor(0.0)
        if learn:
            self.range = nn.Parameter(initial)
        else:
            self.register_buffer("range", initial)
        self.observing = False  # calibration: record batch maxima, pass the input through
        self.observed: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observed.append(x.detach().amax().float())
            return x
        if self.training and not self.learn and torch.is_grad_enabled():  # not in no-grad passes (BN re-estimation)
            with torch.no_grad():
                self.range.lerp_(x.detach().amax().float(), MOMENTUM)
        if self.learn:
            # LSQ trains the step s = range / top with gradient scale g; training range instead,
            # its gradient is scaled by g * top^2 so that s moves as LSQ's would under SGD
            step = self.step(_GradScale.apply(self.range, self.top**2 / math.sqrt(x[0].numel() * self.top)))
        else:
            step = self.step()
        return _RoundStraightThrough.apply((x / step).clamp(0, self.top)) * step

    def step(self, value: torch.Tensor | None = None) -> torch.Tensor:
        """The quantization step ``range / (2^nbits - 1)`` (a tiny positive floor for range 0),
        detached, or of ``value`` (the range with its gradient path)."""
        r = self.range.detach() if value is None else value
        return r.clamp_min(torch.finfo(torch.float32).tiny) / self.top

    @torch.no_grad()
    def settle(self, value: torch.Tensor) -> None:
        """End calibration with ``range = value``."""
        self.range.copy_(value)
        self.observing, self.observed = False, []

    def extra_repr(self) -> str:
        return f"nbits={self.nbits}, range={float(self.range):.4g}, {'learned' if self.learn else 'moving average'}"


def activation_quantizers(model: nn.Module) -> dict[str, ActFakeQuant]:
    """Every installed :class:`ActFakeQuant`, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ActFakeQuant)}


def has_activation_slots(model: nn.Module) -> bool:
    """Whether ``model`` has residual blocks with activation slots (the CIFAR ResNets)."""
    return any(isinstance(m, BasicBlock) for m in model.modules())


def install(model: nn.Module, nbits: int, learn: bool = False) -> dict[str, ActFakeQuant]:
    """Put an :class:`ActFakeQuant` in every activation slot of ``model``'s residual blocks
    (no-op if there are some already); returns them by name. ``ValueError`` if it has no blocks."""
    found = activation_quantizers(model)
    if found:
        return found
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    if not blocks:
        raise ValueError(f"quant.abits found no residual blocks in {type(model).__name__}")
    for block in blocks:
        for slot in SLOTS:
            setattr(block, slot, ActFakeQuant(nbits, learn))
    return activation_quantizers(model)


class ActivationQuantCallback(pl.Callback):
    """Install activation fake quantization (in ``setup``, so learned ranges reach the
    optimizer) and calibrate the ranges on ``calibration`` training images before the stage's
    first test or fit. Register it after the weight quantizer, before BatchNorm re-estimation.

    Args:
        nbits: activation bit width, 2..8.
        learn: train the ranges (LSQ) instead of a moving average of batch maxima.
        calibration: how many training images (whole batches, at least this many) set the
            initial ranges.
    """

    def __init__(self, nbits: int, learn: bool = False, calibration: int = 2048) -> None:
        self.nbits, self.learn, self.calibration = check_abits(nbits), learn, calibration
        self.done = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        install(network(pl_module), self.nbits, self.learn)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calibrate(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calibrate(trainer, pl_module)

    @torch.no_grad()
    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set every range to the mean batch maximum its input reaches on the calibration
        images (the network in eval mode, activations unquantized); once per callback."""
        if self.done:
            return
        model = network(pl_module)
        quantizers = activation_quantizers(model).values()
        was_training = model.training
        model.eval()
        for q in quantizers:
            q.observing = True
        batches = 0
        for images in leading_images(trainer, self.calibration, pl_module.device):
            model(images)
            batches += 1
        if batches == 0:
            raise ValueError("quant.abits: no training batch to calibrate the activation ranges on "
                             "(data.train_subset is smaller than one batch)")
        for q in quantizers:
            q.settle(trainer.strategy.reduce(torch.stack(q.observed).mean(), reduce_op="mean"))
        model.train(was_training)
        self.done = True
