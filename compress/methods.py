"""What every compression method is: a Lightning callback built from its config group.

``prune=<option>`` and ``quant=<option>`` each name a yaml whose ``_target_`` is a
:class:`Method` subclass; ``python -m compress.train`` instantiates it (the class checks its own
arguments), lets it check the network (:meth:`Method.prepare`), runs one fine-tuning stage of
``epochs`` with :meth:`Method.callbacks`, and writes what :meth:`Method.record` says it did into
``metrics.json``. Nothing else in the pipeline knows a method's arguments, so a new method is one
class, one yaml and its tests (see docs/adding-a-method.md).
"""

from __future__ import annotations

from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn

from compress.selection import select_layers
from compress.targets import build_target, parameters


def check_count(key: str, value: object) -> int:
    """``value`` as an int >= 0, else ``ValueError`` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}={value!r} is not allowed: use an integer >= 0")
    return value


class Method(pl.Callback):
    """A compression method run as one fine-tuning stage.

    Subclasses set :attr:`stage` (the stage's name and config group: ``prune``, ``quant``) and
    :attr:`verb`, and implement :meth:`prepare`, :meth:`choices` and :meth:`record`.

    Args:
        epochs: fine-tuning epochs of its stage (0: compress and test, no training).
        layers: which layers it acts on (see :mod:`compress.selection`); null entries: the
            model's default.
    """

    stage = ""
    verb = ""  # what it does to a layer, for errors: "prune", "quantize"
    layer_kind = ""  # whose default selection it takes (compress.selection); "" = its stage's

    def __init__(self, epochs: int = 0, layers: Mapping[str, Any] | None = None) -> None:
        self.epochs = check_count(f"{self.stage}.epochs", epochs)
        self.layers_cfg = layers

    def selected(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers of ``model`` its ``layers`` selection picks (null entries: the model's
        default, :mod:`compress.selection`); ``ValueError`` if none, or a name matches none."""
        layers = select_layers(model, self.layer_kind or self.stage, self.layers_cfg, f"{self.stage}.layers")
        if not layers:
            raise ValueError(f"{self.stage}={self.choices().get(self.stage)} found nothing to {self.verb} in "
                             f"{type(model).__name__}: widen {self.stage}.layers (types, include, exclude, keep_first, "
                             "keep_last)")
        return layers

    def prepare(self, model: nn.Module) -> None:
        """Check the method against the instantiated network, before any data or training
        (e.g. that its layer selection matches some layer); ``ValueError`` naming what is wrong."""

    def callbacks(self, masks: Mapping[str, torch.Tensor]) -> list[pl.Callback]:
        """The callbacks of its stage, given the pruning masks the model has so far (to keep)."""
        return [self]

    def choices(self) -> dict[str, Any]:
        """The labels of ``metrics.json``'s ``choices`` it sets (e.g. ``{"prune": "global"}``)."""
        return {}

    def record(self, model: nn.Module) -> dict[str, Any]:
        """What it did to the baked ``model``, for ``metrics.json`` (and ``model.pt``'s meta)."""
        return {}


def build(cfg: DictConfig, key: str) -> Any:
    """Instantiate the config group ``key`` (``prune``, ``quant``, ``distill``) from its
    ``_target_``; ``ValueError`` in one line for a key its class does not take (a typo, or a
    ``+key=`` that no code would read), listing those it does, or for a bad argument."""
    cls, params, takes_all = parameters(cfg.get("_target_"), key)
    unknown = [k for k in cfg if k != "_target_" and k not in params]
    if unknown and not takes_all:
        allowed = ", ".join(n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD and n != "masks")
        raise ValueError(f"{key}.{unknown[0]} is not an option of {key} ({cls.__name__}): use one of {allowed}")
    return build_target(cfg, key)
