"""Clean interrupts: SIGINT/SIGTERM stop a run at once, never in the middle of a checkpoint write.

:func:`stop_on_signals` turns either signal into :class:`Interrupted` in the main thread (not
``KeyboardInterrupt``, on which Lightning exits 1 by itself). Inside :func:`critical` (the
epoch-end checkpoint write of :class:`EpochCheckpoint`) the signal is held until the file is
complete. The stage running at the time adds where it stopped (:meth:`Interrupted.at`), and
``compress.train`` prints that as one line and exits ``128 + signal``.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Iterator

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

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
    """``last.ckpt`` rewritten at every epoch end, never left half-written by an interrupt."""

    def __init__(self, dirpath: Path) -> None:
        # save_top_k=1 without a monitor rewrites one file every epoch; save_last alone with
        # save_top_k=0 would write last.ckpt only when training ends, too late to resume from.
        super().__init__(dirpath=dirpath, filename="last", save_top_k=1, enable_version_counter=False)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        with critical():
            super()._save_checkpoint(trainer, filepath)
