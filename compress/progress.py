"""What a run tells you while it works: one line per epoch with speed and time left.

``progress=log`` (the default when the output is not a terminal) logs, at the end of every
training epoch, the stage, epoch/total, train loss and accuracy, validation accuracy, learning
rate, training images/s, the stage's elapsed time and ETA, and the ETA of the whole run (its
later stages' epochs at the same pace); early in each stage's first epoch one line estimates
the epoch and the run from the first batches. ``progress=bar`` shows Lightning's (tqdm) progress
bar instead (:class:`StageBar`: described as ``<stage> <epoch>/<epochs>``, with the whole run's
ETA beside the epoch's), and the same lines go to the run's ``train.log`` only;
``progress=none`` shows neither (``train.log`` still gets them). The lines go through the
``compress`` logger.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

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


EARLY_BATCHES = 20  # the first estimate comes after this many batches (or the whole epoch, if shorter)


def file_only(logger: logging.Logger) -> logging.Logger:
    """A child of ``logger`` that writes to its file handlers only (``train.log``), not the console."""
    child = logger.getChild("file")
    if not child.handlers:
        child.propagate = False
        for handler in logging.getLogger().handlers + logger.handlers:
            if isinstance(handler, logging.FileHandler):
                child.addHandler(handler)
        child.setLevel(logging.INFO)
    return child


class ProgressLog(pl.Callback):
    """Logs one line per training epoch of a stage, and an early estimate (see the module docstring).

    Args:
        stage: the stage's name.
        later_epochs: training epochs of the run's stages after this one (for the run's ETA).
        console: log to the console too (else ``train.log`` only, beside a progress bar).
    """

    def __init__(self, stage: str, later_epochs: int = 0, console: bool = True) -> None:
        self.stage, self.later = stage, later_epochs
        self.out = log if console else file_only(log)
        self.t0 = self.epoch_t0 = self.last_batch = 0.0
        self.images = 0
        self.first_epoch = 0
        self.estimated = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = time.perf_counter()
        self.first_epoch = trainer.current_epoch  # > 0 when resumed from a checkpoint
        self.out.info("stage %s: training %d epochs of %d steps%s", self.stage, trainer.max_epochs,
                 trainer.num_training_batches, f" (resumed at epoch {self.first_epoch + 1})" if self.first_epoch else "")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_t0, self.images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.images += len(batch[1])
        self.last_batch = time.perf_counter()
        steps = trainer.num_training_batches
        if not self.estimated and batch_idx + 1 >= min(EARLY_BATCHES, steps):
            self.estimated = True
            epoch = (self.last_batch - self.epoch_t0) / (batch_idx + 1) * steps
            left = trainer.max_epochs - trainer.current_epoch + self.later
            self.out.info("%s: %.0f img/s over the first %d batches: about %s an epoch, %s for the run's %d epochs left",
                          self.stage, self.images / max(self.last_batch - self.epoch_t0, 1e-9), batch_idx + 1,
                          duration(epoch), duration(epoch * left), left)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.perf_counter()
        done, total = trainer.current_epoch + 1, trainer.max_epochs
        elapsed = now - self.t0
        per_epoch = elapsed / (done - self.first_epoch)
        eta = per_epoch * (total - done)
        run = f" (run {duration(eta + per_epoch * self.later)})" if self.later else ""
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        val = f"  val acc {m['val/acc']:.4f}" if "val/acc" in m else ""
        self.out.info("%s epoch %d/%d  loss %.4f  acc %.4f%s  lr %.2e  %.0f img/s  elapsed %s  ETA %s%s",
                      self.stage, done, total, m.get("train/loss", float("nan")), m.get("train/acc", float("nan")), val,
                      lr, self.images / max(self.last_batch - self.epoch_t0, 1e-9), duration(elapsed), duration(eta), run)


class StageBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, its training bar described as ``<stage> <epoch>/<epochs>``
    (``prune 3/20``) and showing ``run ETA``: the time left in the whole run (this stage's
    batches left and ``later_epochs`` of the later stages) at the pace of its batches so far,
    validation included.

    Args:
        stage: the stage's name.
        later_epochs: training epochs of the run's stages after this one.
    """

    def __init__(self, stage: str, later_epochs: int = 0) -> None:
        super().__init__()
        self.stage, self.later = stage, later_epochs
        self.t0 = 0.0
        self.batches = self.in_epoch = 0  # training batches done since the fit started, in this epoch

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.t0, self.batches = time.perf_counter(), 0

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.in_epoch = 0
        self.train_progress_bar.set_description(f"{self.stage} {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batches, self.in_epoch = self.batches + 1, batch_idx + 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The bar's postfix: Lightning's metrics without the logger's version, and the run's ETA."""
        items = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        if self.batches:
            epochs_left = trainer.max_epochs - trainer.current_epoch + self.later  # this one's included
            left = epochs_left * trainer.num_training_batches - self.in_epoch
            items["run ETA"] = duration((time.perf_counter() - self.t0) / self.batches * left)
        return items
