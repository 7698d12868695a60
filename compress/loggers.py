"""Experiment loggers from the ``logger`` config group (``conf/logger/``): csv, tensorboard, wandb, mlflow.

Each entry of ``cfg.logger`` is a Lightning logger to ``instantiate``; a ``save_dir`` left null
becomes the run dir, and loggers that take a ``version`` get the stage name, so every stage of
a run has its own folder (``<run>/csv/prune/metrics.csv``). Optional packages are checked up
front, with the command that installs them.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger

# Logger class name -> (packages, any of which it needs; how to install one)
REQUIRES: dict[str, tuple[tuple[str, ...], str]] = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), 'pip install -e ".[tensorboard]"'),
    "WandbLogger": (("wandb",), "pip install wandb"),
    "MLFlowLogger": (("mlflow",), "pip install mlflow"),
}


def check_loggers(spec: DictConfig | None) -> None:
    """Raise ``ValueError`` naming a logger whose target cannot be loaded or whose package is missing."""
    for name, conf in (spec or {}).items():
        try:
            cls = get_class(conf._target_)
        except Exception as e:  # noqa: BLE001 - hydra raises ImportError or its own error types
            raise ValueError(f"logger.{name}._target_={conf.get('_target_')!r} cannot be loaded: {e}") from None
        packages, install = REQUIRES.get(cls.__name__, ((), ""))
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise ValueError(f"logger={name} needs the {packages[0]} package: {install}")


def make_loggers(spec: DictConfig | None, out_dir: Path, stage: str) -> list[Logger]:
    """The configured loggers for one stage of a run in ``out_dir``."""
    loggers = []
    for conf in (spec or {}).values():
        params = inspect.signature(get_class(conf._target_)).parameters
        extra: dict[str, object] = {}
        if "save_dir" in params and conf.get("save_dir") is None:
            extra["save_dir"] = str(out_dir)
        if "version" in params and conf.get("version") is None:
            extra["version"] = stage
        if "tracking_uri" in params and conf.get("tracking_uri") is None:  # MLflow: its file store is retired
            extra["tracking_uri"] = f"sqlite:///{out_dir / 'mlflow.db'}"
        loggers.append(instantiate(conf, **extra))
    return loggers
