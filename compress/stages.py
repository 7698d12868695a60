"""A run is a short list of stages, each one Lightning fit with its compression callbacks.

One stage per configured method (:class:`compress.methods.Method`), in order: ``prune``
(pruning + fine-tuning), then ``quant`` (fake quantization + fine-tuning, masks kept); a run
with neither is one plain ``finetune`` stage. Each stage tests the model
once its compression is installed ("before" fine-tuning: for a pruning ramp that is its
first step, sparsity 0) and, when it trains, once more on
the baked plain model ("after"), so the reported number is the saved model's.

The pruning stage is cached under a key of everything it depends on, so a sweep over
``nbits`` (or Table 3.1 then Table 3.4) trains it once: a file lock makes parallel jobs
wait for the one computing it, and the entry appears by an atomic rename.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from compress.checkpoint import Checkpoint, apply_checkpoint, load_checkpoint, save_checkpoint
from compress.config import config_hash, digest, hashed_config
from compress.interrupt import EpochCheckpoint, Interrupted, usable
from compress.layers import bake
from compress.loggers import make_loggers
from compress.methods import Method
from compress.module import Classifier, CompileNetwork
from compress.progress import ProgressLog, StageBar, check_progress
from compress.prune import KeepMasks, current_masks

log = logging.getLogger(__name__)

CallbackFactory = Callable[[dict[str, torch.Tensor]], list[pl.Callback]]


@dataclass
class Stage:
    """One fine-tuning stage: its name, length, and the compression callbacks it installs
    (built from the masks the previous stage left)."""

    name: str
    epochs: int
    callbacks: CallbackFactory
    cache_key: str | None = None


@dataclass
class StageResult:
    """Test metrics before and after a stage's fine-tuning, with its per-epoch history."""

    name: str
    epochs: int
    before: dict[str, float]
    after: dict[str, float] | None
    history: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0  # including resumed_s
    resumed_s: float = 0.0  # wall time of the interrupted runs whose last epoch checkpoint this one resumed from
    cached: bool = False
    cache_key: str | None = None


class History(pl.Callback):
    """Records the epoch-level logged metrics (train/val loss and accuracy, learning rate) and
    the stage's wall time so far; both travel in Lightning checkpoints, so a resumed stage keeps
    the earlier epochs and counts the time they took (``resumed_s``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.started = time.time()
        self.resumed_s = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "wall_s": self.resumed_s + time.time() - self.started}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])
        self.resumed_s = float(state_dict.get("wall_s", 0.0))  # checkpoints from before the field: unknown, 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch + 1, "lr": trainer.optimizers[0].param_groups[0]["lr"]}
        row |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        self.rows.append(row)


def make_trainer(cfg: DictConfig, epochs: int, callbacks: list[pl.Callback], out_dir: Path, stage: str = "",
                 later_epochs: int = 0) -> pl.Trainer:
    """A Lightning Trainer from ``cfg.trainer`` for ``epochs`` epochs of ``stage`` (none: a test
    pass), with the progress display and, when it trains, the loggers the config asks for
    (``later_epochs``: the run's epochs after this stage, for its ETA)."""
    progress = check_progress(cfg.progress)
    training = bool(stage) and epochs > 0
    loggers = make_loggers(cfg.logger, out_dir, stage) if training else []
    shown = [ProgressLog(stage, later_epochs, console=progress == "log")] if training else []  # train.log: always
    shown += [StageBar(stage, later_epochs)] if progress == "bar" else []  # Lightning's bar, described
    lr = [LearningRateMonitor("epoch")] if loggers else []
    return instantiate(
        cfg.trainer, max_epochs=epochs, callbacks=[*callbacks, *shown, *lr], default_root_dir=str(out_dir),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=progress == "bar", logger=loggers or False,
    )


def test(trainer: pl.Trainer, module: Classifier, datamodule: pl.LightningDataModule) -> dict[str, float]:
    """Test-set accuracy and loss, and ``images``: how many test images they are over, the first
    ones of the test split (all of them unless ``trainer.limit_test_batches`` cut the pass short)."""
    (res,) = trainer.test(module, datamodule=datamodule, verbose=False)
    images = int(trainer.strategy.reduce(module.tested, reduce_op="sum"))  # over every DDP rank's shard
    # Logged as float32 means; 6 decimals keep the exact count-based accuracy of 10k images.
    return {"acc": round(res["test/acc"], 6), "loss": round(res["test/loss"], 6), "images": images}


def run_stage(
    stage: Stage, cfg: DictConfig, model: nn.Module, masks: dict[str, torch.Tensor], datamodule: pl.LightningDataModule,
    out_dir: Path, extra: list[pl.Callback] | None = None, later_epochs: int = 0,
) -> tuple[StageResult, dict[str, torch.Tensor]]:
    """Fine-tune ``model`` in place with the stage's callbacks and the run's ``extra`` ones
    (distillation); bake it; return the result and its masks.

    Every epoch ends with ``<out_dir>/checkpoints/<stage>-<config hash>/last.ckpt``; a stage
    that finds one (the same config was killed there) resumes from it. It is deleted once the
    stage is done.
    """
    t0 = time.time()
    pl.seed_everything(cfg.seed, workers=False, verbose=False)
    module = Classifier(model, **cfg.optim)
    history = History()
    ckpt_dir = out_dir / "checkpoints" / f"{stage.name}-{config_hash(cfg)}"
    compiling = [CompileNetwork()] if cfg.compile else []
    callbacks = [*stage.callbacks(masks), *(extra or []), *compiling, history, EpochCheckpoint(ckpt_dir)]
    trainer = make_trainer(cfg, stage.epochs, callbacks, out_dir, stage.name, later_epochs)
    last = ckpt_dir / "last.ckpt"
    try:
        before = test(trainer, module, datamodule)
        log.info("stage %s: test acc %.4f before fine-tuning", stage.name, before["acc"])
        if stage.epochs > 0:
            resume = usable(last)
            if resume:
                log.info("stage %s resumes from %s", stage.name, last)
            trainer.fit(module, datamodule=datamodule, ckpt_path=last if resume else None)
    except Interrupted as e:
        raise e.at(stage.name, trainer.current_epoch + 1, stage.epochs, last)
    if rank_zero_only.rank == 0:  # DDP: the rank that writes the epoch checkpoints removes them
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    masks = current_masks(model)
    bake(model)
    after = test(make_trainer(cfg, 0, [], out_dir), module, datamodule) if stage.epochs > 0 else None
    if after:
        log.info("stage %s: test acc %.4f after %d epochs of fine-tuning", stage.name, after["acc"], stage.epochs)
    result = StageResult(stage.name, stage.epochs, before, after, history.rows, time.time() - t0 + history.resumed_s,
                         history.resumed_s, cache_key=stage.cache_key)
    return result, masks


def plan(cfg: DictConfig, methods: list[Method], pretrained_id: str) -> list[Stage]:
    """The stages of ``methods`` in order, one each (the pruning stage cached under
    :func:`stage_key`); with none, one plain ``finetune`` stage keeping a loaded model's zeros."""
    stages = [Stage(m.stage, m.epochs, m.callbacks, cache_key=stage_key(cfg, pretrained_id) if m.stage == "prune" else None)
              for m in methods]
    keep = lambda m: [KeepMasks(m)] if m else []  # noqa: E731
    return stages or [Stage("finetune", cfg.trainer.max_epochs, keep)]


def stage_key(cfg: DictConfig, pretrained_id: str) -> str:
    """Hash of everything the pruning stage's result depends on."""
    c = hashed_config(cfg)
    spec = {"model": c["model"]["net"], "pretrained": pretrained_id, "data": c["data"], "trainer": c["trainer"],
            "optim": c["optim"], "prune": c["prune"], "seed": c["seed"], "version": 1}
    spec |= {k: c[k] for k in ("distill",) if k in c}  # new options, where not at their neutral value
    return digest(spec)


class StageCache:
    """Finished stages on disk: ``<root>/<key>/{model.pt,result.json}``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def run(
        self, stage: Stage, compute: Callable[[], tuple[StageResult, dict[str, torch.Tensor]]], model: nn.Module
    ) -> tuple[StageResult, dict[str, torch.Tensor]]:
        """Load ``stage`` from the cache into ``model``, or ``compute`` it and store it.

        Under DDP only global rank 0 locks and stores; the other ranks (started by Lightning
        while rank 0 holds the lock) compute alongside it, or load what it stored earlier.
        """
        entry = self.root / stage.cache_key
        if rank_zero_only.rank != 0:
            return self._load(entry, model) if (entry / "result.json").is_file() else compute()
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{stage.cache_key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (entry / "result.json").is_file():
                return self._load(entry, model)
            result, masks = compute()
            tmp = self.root / f".{stage.cache_key}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_checkpoint(tmp / "model.pt", model, masks, {"stage": stage.name, "resized": True})  # widths as trained
            (tmp / "result.json").write_text(json.dumps(asdict(result), indent=1))
            shutil.rmtree(entry, ignore_errors=True)  # a partly deleted entry, left by hand
            tmp.rename(entry)
            log.info("stage %s stored in %s", stage.name, entry)
            return result, masks

    @staticmethod
    def _load(entry: Path, model: nn.Module) -> tuple[StageResult, dict[str, torch.Tensor]]:
        ckpt: Checkpoint = load_checkpoint(str(entry / "model.pt"))
        apply_checkpoint(model, ckpt, str(entry / "model.pt"))
        result = StageResult(**json.loads((entry / "result.json").read_text()))
        result.cached = True
        log.info("stage %s reused from %s", result.name, entry)
        return result, ckpt.masks


def run_stages(
    cfg: DictConfig, model: nn.Module, masks: dict[str, torch.Tensor], datamodule: pl.LightningDataModule,
    out_dir: Path, pretrained_id: str, methods: list[Method], extra: list[pl.Callback],
) -> tuple[list[StageResult], dict[str, torch.Tensor]]:
    """Run (or reuse) the stage of each of ``methods`` on ``model``, with the ``extra``
    callbacks (distillation) in every stage; returns results and final masks."""
    results = []
    stages = plan(cfg, methods, pretrained_id)
    log.info("run: %s (%d training epochs in all; a cached stage takes none)",
             ", ".join(f"stage {s.name} {s.epochs} epochs" for s in stages), sum(s.epochs for s in stages))
    for i, stage in enumerate(stages):
        later = sum(s.epochs for s in stages[i + 1:])
        compute = lambda s=stage, m=masks, n=later: run_stage(s, cfg, model, m, datamodule, out_dir, extra, n)  # noqa: E731
        if stage.cache_key:
            result, masks = StageCache(cfg.stage_cache).run(stage, compute, model)
        else:
            result, masks = compute()
        results.append(result)
    return results, masks
