"""Structured (channel) pruning: whole filters removed, so the network itself gets smaller.

``prune=channel`` removes output channels of the selected layers and everything that depends on
them (the next layer's input channels, BatchNorm entries, depthwise partners, both sides of a
residual add) with Torch-Pruning's dependency graph (``pip install -e .[channel]``). The result
is a smaller dense network: fewer MACs and parameters, fine-tuned like any other stage.

Which channels may go is the ``prune.layers`` selection (a layer outside it keeps its output
channels, and so does every layer coupled to one). The CIFAR ResNets' default is the first conv
of each residual block: their option-A shortcuts zero-pad the residual stream, which a
dependency graph cannot follow, so the stream keeps its width. Other networks: every conv/linear
but the classifier (the last layer).

Target: ``macs_speedup`` (e.g. 2.0: at most half the dense MACs, reached in small steps of
``ratio_step``), else ``ratio`` (the fraction of each selected layer's channels to remove) and
``layer_ratio`` (layer name or ``re:`` pattern -> its own fraction, as Torch-Pruning's
``pruning_ratio_dict``: e.g. ``{"re:layer3\\..*": 0.625}``).
Importance: ``l1`` (the group's L1 weight norm), ``bn`` (its BatchNorm scales) or ``random``;
``scope`` ``local`` (each layer alike) or ``global`` (one ranking over all groups).
"""

from __future__ import annotations

from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from torch import nn

from compress.layers import check_layer_map, network
from compress.methods import Method

IMPORTANCES = ("l1", "bn", "random")
SCOPES = ("local", "global")


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise ValueError("prune=channel needs Torch-Pruning: pip install -e '.[channel]'") from None
    return torch_pruning


def count_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """``(MACs, parameters)`` of ``model`` for one ``example`` input (Torch-Pruning's counter)."""
    was_training = model.training
    macs, params = _torch_pruning().utils.count_ops_and_params(model.eval(), example)
    model.train(was_training)
    return int(macs), int(params)


def _fraction(value: object, key: str) -> float:
    """``value`` as a fraction in (0, 1); ``ValueError`` naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{key}={value!r} is not allowed: use a number in (0, 1)")
    return float(value)


class ChannelPruning(Method):
    """Remove whole output channels of the selected layers at the start of the stage (in
    ``setup``, once), then fine-tune the smaller network.

    Args:
        ratio: fraction of each selected layer's output channels to remove (without ``macs_speedup``).
        macs_speedup: remove channels until the MACs are at most ``1 / macs_speedup`` of the
            dense network's (> 1; null: use ``ratio`` and ``layer_ratio``).
        layer_ratio: fractions of single layers (name or ``re:`` pattern -> fraction; later
            entries win); the other selected layers take ``ratio``. Only without ``macs_speedup``.
        importance: ``l1``, ``bn`` or ``random``.
        scope: ``local`` (every layer loses the same fraction) or ``global`` (one ranking).
        ratio_step: the fraction removed per step while reaching ``macs_speedup``.
        image_size: the square input size the MACs are counted at (the data's; default 32).
        round_to: keep a multiple of this many channels in every pruned layer (8 or 16: integer
            and vector kernels then run at full width; null: any count).
        method: its label (``channel``).
        epochs: fine-tuning epochs of the stage.
        layers: which layers may lose output channels (see :mod:`compress.selection`).
    """

    stage, verb, layer_kind = "prune", "prune", "channel"

    def __init__(self, ratio: float = 0.5, macs_speedup: float | None = None, importance: str = "l1",
                 scope: str = "local", ratio_step: float = 0.05, image_size: int = 32, round_to: int | None = None,
                 layer_ratio: Mapping[str, float] | None = None, method: str = "channel",
                 epochs: int = 0, layers: Mapping[str, Any] | None = None,
                 masks: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__(epochs, layers)
        self.ratio = _fraction(ratio, "prune.ratio")
        if macs_speedup is not None and (isinstance(macs_speedup, bool) or not isinstance(macs_speedup, (int, float))
                                         or macs_speedup <= 1):
            raise ValueError(f"prune.macs_speedup={macs_speedup!r} is not allowed: use a number > 1 (2.0: half the "
                             "MACs) or null (prune.ratio of the channels)")
        if importance not in IMPORTANCES:
            raise ValueError(f"prune.importance={importance!r} is not allowed: use one of {', '.join(IMPORTANCES)}")
        if scope not in SCOPES:
            raise ValueError(f"prune.scope={scope!r} is not allowed for prune=channel: use one of {', '.join(SCOPES)}")
        self.macs_speedup, self.importance, self.scope = macs_speedup, importance, scope
        self.ratio_step = _fraction(ratio_step, "prune.ratio_step")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"prune.image_size={image_size!r} is not allowed: use a positive integer")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"prune.round_to={round_to!r} is not allowed: use a positive integer (8, 16) or null")
        if layer_ratio is not None and not isinstance(layer_ratio, Mapping):
            raise ValueError(f"prune.layer_ratio={layer_ratio!r} is not allowed: use a map of layer name (or re: "
                             "pattern) to the fraction of its channels to remove, or null")
        if layer_ratio and macs_speedup is not None:
            raise ValueError("prune.layer_ratio sets fractions, prune.macs_speedup a MAC target: set "
                             "prune.macs_speedup=null to use prune.layer_ratio")
        self.image_size, self.round_to, self.layer_ratio, self.method = image_size, round_to, layer_ratio, method
        self.before: tuple[int, int] | None = None
        self.after: tuple[int, int] | None = None
        self.done = False

    def example(self) -> torch.Tensor:
        return torch.zeros(1, 3, self.image_size, self.image_size)

    def prepare(self, model: nn.Module) -> None:
        _torch_pruning()
        self.own_ratios(model)

    def own_ratios(self, model: nn.Module, selected: Mapping[str, nn.Module] | None = None) -> dict[str, float]:
        """``layer_ratio`` as ``{selected layer: fraction}`` (``selected``: the model's selection,
        if already made); ``ValueError`` for a name or pattern that matches no selected layer, or
        a fraction outside (0, 1)."""
        return check_layer_map("prune.layer_ratio", self.layer_ratio,
                               self.selected(model) if selected is None else selected, _fraction)

    def callbacks(self, masks: Mapping[str, torch.Tensor]) -> list[pl.Callback]:
        if masks:
            raise ValueError("prune=channel starts from a dense network: model.pretrained holds pruning masks")
        return [self]

    def choices(self) -> dict[str, Any]:
        return {"prune": self.method}

    def record(self, model: nn.Module) -> dict[str, Any]:
        """Its target, and the MACs and parameters before and after."""
        (macs0, params0), (macs1, params1) = self.before or (0, 0), self.after or (0, 0)
        return {"method": self.method, "importance": self.importance, "scope": self.scope, "round_to": self.round_to,
                "ratio": None if self.macs_speedup else self.ratio, "macs_speedup_target": self.macs_speedup,
                **({"layer_ratio": self.own_ratios(model)} if self.layer_ratio else {}),
                "macs": {"before": macs0, "after": macs1, "speedup": macs0 / macs1 if macs1 else None},
                "params": {"before": params0, "after": params1},
                "channels": {n: int(m.weight.shape[0]) for n, m in self.selected(model).items()}}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.done:
            self.prune(network(pl_module))

    def prune(self, model: nn.Module) -> None:
        """Remove the channels (once). The dependency graph is traced with autograd, so this
        runs with gradients on even where Lightning calls it from a test pass."""
        with torch.inference_mode(False), torch.enable_grad():
            self._prune(model)

    def _prune(self, model: nn.Module) -> None:
        tp = _torch_pruning()
        device = next(model.parameters()).device
        example = self.example().to(device)
        selected = self.selected(model)
        chosen = set(selected.values())
        own = {selected[n]: r for n, r in self.own_ratios(model, selected).items()}
        ignored = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in chosen]
        importance = {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
                      "bn": lambda: tp.importance.BNScaleImportance(),
                      "random": lambda: tp.importance.RandomImportance()}[self.importance]()
        self.before = count_macs(model, example)
        steps = max(1, round(self.ratio / self.ratio_step)) if self.macs_speedup is None else round(0.95 / self.ratio_step)
        target = self.ratio if self.macs_speedup is None else 0.95
        was_training = model.training
        model.eval()
        pruner = tp.pruner.BasePruner(model, example, importance=importance, pruning_ratio=target,
                                      pruning_ratio_dict=own or None, iterative_steps=steps, ignored_layers=ignored,
                                      global_pruning=self.scope == "global", round_to=self.round_to)
        for _ in range(steps):
            pruner.step()
            if self.macs_speedup is not None and count_macs(model, example)[0] * self.macs_speedup <= self.before[0]:
                break
        model.train(was_training)
        self.after = count_macs(model, example)
        self.done = True
