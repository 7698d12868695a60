"""The run's data module from its config, what it says about its inputs, and the model's fit to them.

``data`` is any ``LightningDataModule`` given by ``_target_``. Besides its constructor's
arguments a data config may say what the data is (:data:`compress.data.DESCRIBED`: ``num_classes``,
``mean``, ``std``, ``image_size``); the module's own attributes of those names win. The
pipeline uses them to check the network before training (its output width must be the class
count), and records them in ``model.pt``/``model.cpk`` so a loaded model says which inputs it
expects. A module's ``check()`` (fail early on missing files) is called where it has one.
"""

from __future__ import annotations

from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compress.data import DESCRIBED
from compress.data import describe as data_describe
from compress.targets import build_target, parameters


# Keys a data config may hold that its class need not take: what the data is, and the subset
# that budget=debug|smoke sets (a module of one's own without that argument trains on all of it).
OPTIONAL = (*DESCRIBED, "train_subset")


def instantiate_data(cfg: Mapping[str, Any]) -> pl.LightningDataModule:
    """The data module the plain config ``cfg`` configures (its :data:`OPTIONAL` keys passed
    only where the class takes them); ``ValueError`` in one line if it cannot be imported or
    built, takes an argument it does not know, or is no ``LightningDataModule``."""
    target = cfg.get("_target_")
    _, params, takes_all = parameters(target, "data")
    kwargs = {k: v for k, v in cfg.items() if k not in OPTIONAL or takes_all or k in params}
    unknown = [k for k in kwargs if k != "_target_" and k not in params and not takes_all]
    if unknown:
        takes = ", ".join(n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        raise ValueError(f"data.{unknown[0]} is not an argument of {target} (it takes {takes}): start from "
                         "data=custom for a data module of your own, or remove the key")
    module = build_target(kwargs, "data", (ValueError, FileNotFoundError))
    if not isinstance(module, pl.LightningDataModule):
        raise ValueError(f"data._target_={target!r} built a {type(module).__name__}, not a LightningDataModule")
    return module


def build_data(cfg: DictConfig) -> pl.LightningDataModule:
    """The data module ``cfg`` configures (:func:`instantiate_data`), checked with its
    ``check()`` if it has one; ``ValueError`` in one line if it has no test data."""
    module = instantiate_data(OmegaConf.to_container(cfg, resolve=True))
    if callable(getattr(module, "check", None)):
        module.check()
    if not _overrides(module, "test_dataloader"):
        raise ValueError(f"data._target_={cfg._target_!r} has no test data: give it a test_dataloader()")
    return module


def _overrides(module: pl.LightningDataModule, hook: str) -> bool:
    return getattr(type(module), hook) is not getattr(pl.LightningDataModule, hook)


def describe(module: pl.LightningDataModule, cfg: DictConfig) -> dict[str, Any]:
    """``{num_classes, mean, std, image_size}`` of the data: the module's attributes
    (:func:`compress.data.describe`), else the config's keys, else None."""
    given = OmegaConf.to_container(cfg, resolve=True)
    return {k: v if v is not None else given.get(k) for k, v in data_describe(module).items()}


def outputs_of(model: nn.Module, image_size: int) -> int:
    """How many logits ``model`` gives for a ``3 x image_size x image_size`` image (eval mode,
    no gradient; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, image_size, image_size))
    model.train(was_training)
    return int(logits.shape[-1])


def check_outputs(model: nn.Module, data: Mapping[str, Any]) -> None:
    """``ValueError`` in one line unless ``model`` runs on the data's image size and predicts
    its ``num_classes`` (where the data says them)."""
    size, classes = data.get("image_size"), data.get("num_classes")
    if not size:
        return
    try:
        found = outputs_of(model, int(size))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"model.net cannot run on the data's {size}x{size} images ({reason}): adapt the network "
                         "or data.image_size") from None
    if classes and found != classes:
        raise ValueError(f"model.net predicts {found} classes, the data has {classes}: set model.net.num_classes={classes} "
                         "(or the constructor's argument for it)")
