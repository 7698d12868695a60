"""Unstructured magnitude pruning of every conv and linear weight, as a Lightning callback.

Why not Lightning's ``ModelPruning``: it is built on ``torch.nn.utils.prune``, whose forward
pre-hook rewrites ``module.weight`` and cannot be chained with the fake-quant
parametrization on the same tensor, and its schedule prunes only at epoch ends (the one-shot
method must prune before the first evaluation). So the mask here is a
``torch.nn.utils.parametrize`` parametrization (:class:`Mask`): the effective weight is
``original * mask``, exactly zero where pruned whatever the optimizer (momentum, weight
decay) does to ``original``. Masks are the same as ``torch.nn.utils.prune.l1_unstructured``
(layer scope) and ``global_unstructured`` (global scope) compute for the same number of
weights (:func:`prune_count`, rounded up so each layer reaches the target), ties aside.

``layer_sparsity`` (``prune.layer_sparsity``: layer name -> sparsity) gives the layers it names
their own target, each reached on its own (as ``layer`` scope does); the others keep the
method's: ``sparsity`` each (``layer`` scope), or one threshold over them all (``global``).

The schedule is *cumulative*: after ``e`` of the first ``ramp_epochs`` epochs the target is
``sparsity * e / ramp_epochs`` of all weights (not of the survivors), so ten steps reach 80%
at 8% a step; already pruned weights stay pruned. ``ramp_epochs=0`` prunes once, in
``setup``, before anything is evaluated or trained.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Mapping

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.layers import (bake, check_layer_map, network, prunable_layers, weight_parametrization,
                             with_parametrization)

Scope = Literal["layer", "global"]


def check_sparsity(sparsity: object, key: str = "prune.sparsity") -> float:
    """Return ``sparsity`` as a float in [0, 1), else raise ``ValueError`` naming it (as ``key``)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"{key}={sparsity!r} is not allowed: it must be a number in [0, 1)")
    return float(sparsity)


def check_layer_sparsity(layer_sparsity: object, layers: Iterable[str]) -> dict[str, float]:
    """``prune.layer_sparsity`` as ``{layer: sparsity}``; ``ValueError`` naming an unknown layer
    (with the valid ``layers``) or a sparsity outside [0, 1)."""
    return check_layer_map("prune.layer_sparsity", layer_sparsity, layers, check_sparsity)


def prune_count(sparsity: float, numel: int) -> int:
    """Weights to remove so that at least ``sparsity`` of ``numel`` are zero: ``ceil``, so every
    layer really reaches the target (``torch.nn.utils.prune`` rounds a fractional amount to
    nearest; given this count as an int amount it computes the same mask)."""
    return math.ceil(round(sparsity * numel, 6))


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask that drops the ``prune_count`` smallest entries of ``scores``."""
    k = prune_count(sparsity, scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return keep.view_as(scores)


def magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float, scope: Scope,
                    layer_sparsity: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Masks (True = kept) removing the smallest-magnitude weights.

    ``scope="layer"`` prunes ``sparsity`` of each tensor; ``"global"`` uses one threshold over
    all tensors together, so only the overall sparsity is ``sparsity``. The tensors that
    ``layer_sparsity`` names are pruned to their own sparsity each, and left out of the global threshold.
    """
    check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"prune scope {scope!r} is not allowed: use 'layer' or 'global'")
    own = check_layer_sparsity(layer_sparsity, weights)
    masks = {n: _keep_largest(weights[n].abs(), s) for n, s in own.items()}
    rest = {n: w for n, w in weights.items() if n not in own}
    if scope == "layer":
        masks |= {n: _keep_largest(w.abs(), sparsity) for n, w in rest.items()}
    elif rest:
        flat = _keep_largest(torch.cat([w.abs().flatten() for w in rest.values()]), sparsity)
        parts = flat.split([w.numel() for w in rest.values()])
        masks |= {n: p.view_as(w) for (n, w), p in zip(rest.items(), parts)}
    return {n: masks[n] for n in weights}


def layer_targets(model: nn.Module, sparsity: float, scope: Scope,
                  layer_sparsity: Mapping[str, float] | None = None) -> dict[str, float | None]:
    """The target sparsity of every conv/linear layer: its own from ``layer_sparsity``, else
    ``sparsity`` (``layer`` scope), or None where the layer is under the one ``global`` threshold."""
    own = check_layer_sparsity(layer_sparsity, prunable_layers(model))
    default = check_sparsity(sparsity) if scope == "layer" else None
    return {n: own.get(n, default) for n in prunable_layers(model)}


class Mask(nn.Module):
    """Parametrization ``w -> w * mask`` with a fixed (buffer) mask."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The boolean masks installed on ``model``, by layer name."""
    return {n: p.mask.bool() for n, p in with_parametrization(model, Mask).items()}


class PruningCallback(pl.Callback):
    """Magnitude-prune every conv/linear weight to ``sparsity`` on a linear cumulative ramp.

    Args:
        sparsity: target fraction of zero weights, in [0, 1). 0 with ``masks`` just keeps them.
        scope: ``"layer"`` (each layer reaches ``sparsity``) or ``"global"`` (one threshold).
        ramp_epochs: prune at the end of each of the first ``ramp_epochs`` epochs, to
            ``sparsity * epoch / ramp_epochs``; 0 prunes once, at setup (one-shot).
        masks: masks to start from (True = kept), e.g. from a pruned checkpoint; these
            weights stay pruned whatever the schedule says.
        layer_sparsity: targets of single layers (name -> sparsity), on the same ramp; the
            layers not named keep ``sparsity`` and ``scope``.
    """

    def __init__(
        self,
        sparsity: float = 0.8,
        scope: Scope = "layer",
        ramp_epochs: int = 0,
        masks: Mapping[str, torch.Tensor] | None = None,
        layer_sparsity: Mapping[str, float] | None = None,
    ) -> None:
        self.sparsity = check_sparsity(sparsity)
        self.layer_sparsity = {str(n): check_sparsity(s, f"prune.layer_sparsity.{n}")
                               for n, s in (layer_sparsity or {}).items()}
        if scope not in ("layer", "global"):
            raise ValueError(f"prune scope {scope!r} is not allowed: use 'layer' or 'global'")
        if not isinstance(ramp_epochs, int) or ramp_epochs < 0:
            raise ValueError(f"prune.ramp_epochs={ramp_epochs!r} is not allowed: use an integer >= 0")
        self.scope, self.ramp_epochs = scope, ramp_epochs
        self.initial_masks = dict(masks or {})

    def _ramped(self, target: float, epochs_done: int) -> float:
        if self.ramp_epochs == 0:
            return target
        return target * min(epochs_done, self.ramp_epochs) / self.ramp_epochs

    def sparsity_after(self, epochs_done: int) -> float:
        """Target sparsity once ``epochs_done`` training epochs have finished."""
        return self._ramped(self.sparsity, epochs_done)

    def layer_sparsity_after(self, epochs_done: int) -> dict[str, float]:
        """Targets of the layers with their own sparsity once ``epochs_done`` epochs have finished."""
        return {n: self._ramped(s, epochs_done) for n, s in self.layer_sparsity.items()}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not with_parametrization(network(pl_module), Mask):
            self.install(network(pl_module))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs < self.ramp_epochs:
            raise ValueError(
                f"prune.ramp_epochs={self.ramp_epochs} is longer than the stage's "
                f"{trainer.max_epochs} epochs: the target sparsity would never be reached"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if done <= self.ramp_epochs:
            self.prune(network(pl_module), self.sparsity_after(done), self.layer_sparsity_after(done))

    def install(self, model: nn.Module) -> None:
        """Put a :class:`Mask` on every conv/linear weight and apply the epoch-0 target."""
        check_layer_sparsity(self.layer_sparsity, prunable_layers(model))
        for name, m in prunable_layers(model).items():
            mask = self.initial_masks.get(name, torch.ones_like(m.weight, dtype=torch.bool))
            if mask.shape != m.weight.shape:
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight has {tuple(m.weight.shape)}")
            parametrize.register_parametrization(m, "weight", Mask(mask.to(m.weight.device)))
        self.prune(model, self.sparsity_after(0), self.layer_sparsity_after(0))

    @torch.no_grad()
    def prune(self, model: nn.Module, sparsity: float, layer_sparsity: Mapping[str, float] | None = None) -> None:
        """Recompute the masks from the current (masked) weights' magnitudes: ``sparsity`` (and
        each named layer's own ``layer_sparsity``) of all weights."""
        layers = prunable_layers(model)
        masks = magnitude_masks({n: m.weight for n, m in layers.items()}, sparsity, self.scope, layer_sparsity)
        for name, m in layers.items():
            weight_parametrization(m, Mask).mask.mul_(masks[name])

    @staticmethod
    def remove(model: nn.Module) -> None:
        """Bake the masked weights into plain parameters (zeros stay in the tensors)."""
        bake(model)
