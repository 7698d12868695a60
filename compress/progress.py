"""What a run tells you while it works: one line per epoch with speed and time left.

``progress=log`` (the default when the output is not a terminal) logs, at the end of every
training epoch, the stage, epoch/total, train loss and accuracy, validation accuracy, learning
rate, training images/s, and the stage's elapsed time and ETA (from the mean epoch time so far);
``progress=bar`` shows Lightning's progress bar instead, ``progress=none`` neither. The lines
go through the ``compress`` logger, so they land in the run's ``train.log`` too.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger("compress")

PROGRESS = ("auto", "log", "bar", "none")


def check_progress(progress: object) -> str:
    """``progress`` resolved to ``log``, ``bar`` or ``none`` (``auto``: a bar on a terminal)."""
    if progress not in PROGRESS:
        raise ValueError(f"progress={progress!r} is not allowed: use one of {', '.join(PROGRESS)}")
    if progress == "auto":
        return "bar" if sys.stdout.isatty() else "log"
    return str(progress)


def duration(seconds: float) -> str:
    """``1h02m``, ``3m07s`` or ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressLog(pl.Callback):
    """Logs one line per training epoch of a stage (see the module docstring)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.t0 = self.epoch_t0 = self.last_batch = 0.0
        self.images = 0
        self.first_epoch = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = time.perf_counter()
        self.first_epoch = trainer.current_epoch  # > 0 when resumed from a checkpoint
        log.info("stage %s: training %d epochs of %d steps%s", self.stage, trainer.max_epochs,
                 trainer.num_training_batches, f" (resumed at epoch {self.first_epoch + 1})" if self.first_epoch else "")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_t0, self.images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.images += len(batch[1])
        self.last_batch = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.perf_counter()
        done, total = trainer.current_epoch + 1, trainer.max_epochs
        elapsed = now - self.t0
        eta = elapsed / (done - self.first_epoch) * (total - done)
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        val = f"  val acc {m['val/acc']:.4f}" if "val/acc" in m else ""
        log.info("%s epoch %d/%d  loss %.4f  acc %.4f%s  lr %.2e  %.0f img/s  elapsed %s  ETA %s",
                 self.stage, done, total, m.get("train/loss", float("nan")), m.get("train/acc", float("nan")), val, lr,
                 self.images / max(self.last_batch - self.epoch_t0, 1e-9), duration(elapsed), duration(eta))
