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
from typing import Any, Iterable, Literal, Mapping

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.layers import bake, check_layer_map, network, weight_parametrization, with_parametrization
from compress.methods import Method

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
    return _keep_count(scores, prune_count(sparsity, scores.numel()))


def _global_masks(weights: Mapping[str, torch.Tensor], sparsity: float, min_density: float) -> dict[str, torch.Tensor]:
    """One magnitude threshold over all ``weights`` removing ``sparsity`` of them, except that no
    tensor keeps fewer than ``min_density`` of its weights: a tensor the threshold would take
    below that keeps its largest ``ceil(min_density * numel)``, and the threshold is recomputed
    over the others so that the overall target is still met (where it can be)."""
    total = sum(w.numel() for w in weights.values())
    removed = prune_count(sparsity, total)
    floor = {n: min(w.numel(), math.ceil(round(min_density * w.numel(), 6))) for n, w in weights.items()}
    floored: dict[str, torch.Tensor] = {}
    while True:
        rest = {n: w for n, w in weights.items() if n not in floored}
        if not rest:
            return floored
        budget = removed - sum(int((~m).sum()) for m in floored.values())
        numel = sum(w.numel() for w in rest.values())
        flat = _keep_count(torch.cat([w.abs().flatten() for w in rest.values()]), min(max(budget, 0), numel))
        parts = dict(zip(rest, flat.split([w.numel() for w in rest.values()])))
        short = [n for n, p in parts.items() if int(p.sum()) < floor[n]]
        if not short:
            return floored | {n: parts[n].view_as(w) for n, w in rest.items()}
        for n in short:
            floored[n] = _keep_count(weights[n].abs(), weights[n].numel() - floor[n])


def _keep_count(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask that drops the ``k`` smallest entries of ``scores``."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return keep.view_as(scores)


def magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float, scope: Scope,
                    layer_sparsity: Mapping[str, float] | None = None, min_density: float = 0.0) -> dict[str, torch.Tensor]:
    """Masks (True = kept) removing the smallest-magnitude weights.

    ``scope="layer"`` prunes ``sparsity`` of each tensor; ``"global"`` uses one threshold over
    all tensors together, so only the overall sparsity is ``sparsity``, no tensor keeping fewer
    than ``min_density`` of its weights. The tensors that ``layer_sparsity`` names are pruned to
    their own sparsity each, and left out of the global threshold.
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
        masks |= _global_masks(rest, sparsity, min_density)
    return {n: masks[n] for n in weights}


def layer_targets(layers: Iterable[str], sparsity: float, scope: Scope,
                  layer_sparsity: Mapping[str, float] | None = None) -> dict[str, float | None]:
    """The target sparsity of every pruned layer: its own from ``layer_sparsity``, else
    ``sparsity`` (``layer`` scope), or None where the layer is under the one ``global`` threshold."""
    names = list(layers)
    own = check_layer_sparsity(layer_sparsity, names)
    default = check_sparsity(sparsity) if scope == "layer" else None
    return {n: own.get(n, default) for n in names}


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


def install_masks(model: nn.Module, layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
    """Put a :class:`Mask` on the weight of every layer in ``layers``: its entry of ``masks``
    (True = kept), else all ones; ``ValueError`` for a mask of the wrong shape."""
    for name, m in layers.items():
        mask = masks.get(name, torch.ones_like(m.weight, dtype=torch.bool))
        if mask.shape != m.weight.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight has {tuple(m.weight.shape)}")
        parametrize.register_parametrization(m, "weight", Mask(mask.to(m.weight.device)))


class KeepMasks(pl.Callback):
    """Keep the zeros of earlier pruning while a later stage trains: a fixed :class:`Mask` on
    each layer ``masks`` names (installed in ``setup``, once)."""

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks = dict(masks)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = network(pl_module)
        if not with_parametrization(model, Mask):
            modules = dict(model.named_modules())
            missing = [n for n in self.masks if n not in modules]
            if missing:
                raise ValueError(f"the model's masks name {missing[0]!r}, which {type(model).__name__} does not have")
            install_masks(model, {n: modules[n] for n in self.masks}, self.masks)


def ramp_fit(ramp_epochs: int, epochs: int, lead: str = " with") -> str:
    """The end of a message saying how a ramp of ``ramp_epochs`` fits a stage of ``epochs``
    (``prune.epochs``, which follows ``trainer.max_epochs``); empty where it already fits."""
    if ramp_epochs <= epochs:
        return ""
    lower = f"prune.ramp_epochs={epochs} or less, or " if epochs else ""
    return f"{lead} {lower}trainer.max_epochs={ramp_epochs} (or prune.epochs={ramp_epochs}, where it is set)"


class PruningCallback(Method):
    """Magnitude pruning of the selected weights to ``sparsity`` on a linear cumulative ramp.

    Args:
        sparsity: target fraction of zero weights, in [0, 1).
        scope: ``"layer"`` (each layer reaches ``sparsity``) or ``"global"`` (one threshold).
        ramp_epochs: prune at the end of each of the first ``ramp_epochs`` epochs, to
            ``sparsity * epoch / ramp_epochs``; 0 prunes once, at setup (one-shot).
        masks: masks to start from (True = kept), e.g. from a pruned checkpoint; these
            weights stay pruned whatever the schedule says.
        layer_sparsity: targets of single layers (name or ``re:`` pattern -> sparsity), on the
            same ramp; the layers not named keep ``sparsity`` and ``scope``.
        method: its label in run dirs and reports (``oneshot``, ``iterative``, ``global``);
            ``oneshot`` must have ``ramp_epochs=0``, the others a ramp.
        epochs: fine-tuning epochs of the stage (the ramp must fit in them).
        layers: which layers it prunes (see :mod:`compress.selection`); null entries: the
            model's default (every conv/linear weight).
        min_density: ``global`` scope: the fewest weights (fraction) a layer keeps, so pruning
            never empties a layer.
    """

    stage, verb = "prune", "prune"

    def __init__(
        self,
        sparsity: float = 0.8,
        scope: Scope = "layer",
        ramp_epochs: int = 0,
        masks: Mapping[str, torch.Tensor] | None = None,
        layer_sparsity: Mapping[str, float] | None = None,
        method: str | None = None,
        epochs: int = 0,
        layers: Mapping[str, Any] | None = None,
        min_density: float = 0.001,
    ) -> None:
        super().__init__(epochs, layers)
        self.sparsity = check_sparsity(sparsity)
        if layer_sparsity is not None and not isinstance(layer_sparsity, Mapping):
            raise ValueError(f"prune.layer_sparsity={layer_sparsity!r} is not allowed: use a map of layer name "
                             "(or re: pattern) to sparsity")
        self.layer_patterns = {str(n): check_sparsity(s, f"prune.layer_sparsity.{n}")
                               for n, s in (layer_sparsity or {}).items()}
        self.layer_sparsity: dict[str, float] = dict(self.layer_patterns)  # by layer name once installed
        if scope not in ("layer", "global"):
            raise ValueError(f"prune scope {scope!r} is not allowed: use 'layer' or 'global'")
        if not isinstance(ramp_epochs, int) or isinstance(ramp_epochs, bool) or ramp_epochs < 0:
            raise ValueError(f"prune.ramp_epochs={ramp_epochs!r} is not allowed: use an integer >= 0")
        if isinstance(min_density, bool) or not isinstance(min_density, (int, float)) or not 0 <= min_density <= 1:
            raise ValueError(f"prune.min_density={min_density!r} is not allowed: use a number in [0, 1]")
        self.method = method or ("oneshot" if ramp_epochs == 0 else scope)
        if self.method == "oneshot" and ramp_epochs != 0:
            raise ValueError(f"prune.ramp_epochs={ramp_epochs} is not allowed for prune=oneshot (it prunes once, at "
                             f"the start): drop it, or for a ramp use prune=iterative{ramp_fit(ramp_epochs, self.epochs)}")
        if method is not None and self.method != "oneshot" and ramp_epochs == 0:
            raise ValueError(f"prune.ramp_epochs=0 is not allowed for prune={self.method}: use prune=oneshot"
                             + ("" if self.epochs else ", or give the stage epochs to ramp over (trainer.max_epochs)"))
        if method is not None and ramp_epochs > self.epochs:
            raise ValueError(f"prune.ramp_epochs={ramp_epochs} is longer than prune.epochs={self.epochs} (the target "
                             f"sparsity would never be reached){ramp_fit(ramp_epochs, self.epochs, ': use')}")
        self.scope, self.ramp_epochs, self.min_density = scope, ramp_epochs, float(min_density)
        self.initial_masks = dict(masks or {})

    def prepare(self, model: nn.Module) -> None:
        self.layer_sparsity = check_layer_sparsity(self.layer_patterns, self.selected(model))

    def callbacks(self, masks: Mapping[str, torch.Tensor]) -> list[pl.Callback]:
        self.initial_masks = dict(masks)
        return [self]

    def choices(self) -> dict[str, Any]:
        return {"prune": self.method}

    def record(self, model: nn.Module) -> dict[str, Any]:
        """Its label and the target sparsity of every layer it pruned (None: under the global threshold)."""
        return {"method": self.method, "scope": self.scope, "sparsity": self.sparsity,
                "layer_sparsity": layer_targets(self.selected(model), self.sparsity, self.scope, self.layer_sparsity)}

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
                f"prune.ramp_epochs={self.ramp_epochs} is longer than the stage's {trainer.max_epochs} epochs: the "
                f"target sparsity would never be reached (train the stage for {self.ramp_epochs} epochs or more)"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if done <= self.ramp_epochs:
            self.prune(network(pl_module), self.sparsity_after(done), self.layer_sparsity_after(done))

    def install(self, model: nn.Module) -> None:
        """Put a :class:`Mask` on every selected weight and apply the epoch-0 target."""
        self.prepare(model)
        install_masks(model, self.selected(model), self.initial_masks)
        self.prune(model, self.sparsity_after(0), self.layer_sparsity_after(0))

    @torch.no_grad()
    def prune(self, model: nn.Module, sparsity: float, layer_sparsity: Mapping[str, float] | None = None) -> None:
        """Recompute the masks from the current (masked) weights' magnitudes: ``sparsity`` (and
        each named layer's own ``layer_sparsity``) of all weights."""
        layers = self.selected(model)
        masks = magnitude_masks({n: m.weight for n, m in layers.items()}, sparsity, self.scope, layer_sparsity,
                                self.min_density)
        for name, m in layers.items():
            weight_parametrization(m, Mask).mask.mul_(masks[name])

    @staticmethod
    def remove(model: nn.Module) -> None:
        """Bake the masked weights into plain parameters (zeros stay in the tensors)."""
        bake(model)
