"""Clean interrupts: SIGINT/SIGTERM stop a run at once, never in the middle of a checkpoint write.

:func:`stop_on_signals` turns either signal into :class:`Interrupted` in the main thread (not
``KeyboardInterrupt``, on which Lightning exits 1 by itself). Inside :func:`critical` (the
epoch-end checkpoint write of :class:`EpochCheckpoint`) the signal is held until the file is
complete. The stage running at the time adds where it stopped (:meth:`Interrupted.at`), and
``compress.train`` prints that as one line and exits ``128 + signal``.
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger("compress")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A run stopped by a signal; ``where`` says what was kept (filled in by the stage)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.where = ""

    @property
    def exit_code(self) -> int:
        """``128 + signal``: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def at(self, stage: str, epoch: int, epochs: int, checkpoint: Path) -> "Interrupted":
        """Record the stage, the epoch that was running (1-based) and the checkpoint kept."""
        if not epochs:
            self.where = f" in stage {stage}, while testing"
            return self
        kept = f"kept {checkpoint} (end of epoch {epoch - 1})" if checkpoint.is_file() else "no epoch finished yet"
        self.where = f" in stage {stage} at epoch {epoch}/{epochs}: {kept}"
        return self

    def message(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}{self.where}; re-run the same command to resume"


_held: list[int] = []  # signals received inside critical(), raised when it ends
_depth = 0


def _raise(signum: int, frame: FrameType | None) -> None:
    if _depth:
        _held.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted`; handlers restored after."""
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then raise the first one held."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if not _depth and _held:
        signum = _held[0]
        _held.clear()
        raise Interrupted(signum)


class EpochCheckpoint(ModelCheckpoint):
    """``last.ckpt`` rewritten at every epoch end, never left half-written: by an interrupt (the
    signal waits) nor by a failed write (a full disk): it is written to ``last.ckpt.tmp`` and
    renamed into place, so the previous epoch's file stays whole until the new one is."""

    def __init__(self, dirpath: Path) -> None:
        # save_top_k=1 without a monitor rewrites one file every epoch; save_last alone with
        # save_top_k=0 would write last.ckpt only when training ends, too late to resume from.
        super().__init__(dirpath=dirpath, filename="last", save_top_k=1, enable_version_counter=False)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        tmp = Path(f"{filepath}.tmp")
        with critical():
            try:
                super()._save_checkpoint(trainer, str(tmp))  # under DDP rank 0 writes it
                if trainer.is_global_zero:
                    os.replace(tmp, filepath)
            finally:
                if trainer.is_global_zero:
                    tmp.unlink(missing_ok=True)
        self._last_checkpoint_saved = filepath


def usable(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` (a Lightning ``last.ckpt``) reads back; if not, it is renamed to
    ``<name>.corrupt`` and a line says so, so the stage starts again instead of failing on it."""
    if not checkpoint.is_file():
        return False
    try:
        torch.load(checkpoint, map_location="cpu", weights_only=False)
        return True
    except Exception as e:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
        aside = checkpoint.with_name(checkpoint.name + ".corrupt")
        os.replace(checkpoint, aside)
        log.warning("%s is unreadable (%s): set aside as %s; the stage starts from its beginning",
                    checkpoint, type(e).__name__, aside.name)
        return False
