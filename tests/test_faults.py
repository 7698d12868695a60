"""Faults leave nothing broken: a truncated checkpoint is set aside, a failed write keeps the
previous file whole."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from compress.checkpoint import atomic_write
from compress.config import config_hash
from compress.interrupt import EpochCheckpoint


def test_a_truncated_epoch_checkpoint_is_set_aside_and_the_stage_restarts(run_app, hydra_compose, data_root: Path,
                                                                          tmp_path: Path) -> None:
    overrides = ["prune=iterative", "budget=debug", "progress=log"]
    ckpt = tmp_path / "run" / "checkpoints" / f"prune-{config_hash(hydra_compose(overrides))}" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    proc = run_app(*overrides, run_dir=tmp_path / "run", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "last.ckpt is unreadable" in out and "set aside as last.ckpt.corrupt" in out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"][0]["epochs"] == 2


def test_a_full_disk_keeps_the_previous_result_whole(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("{}")

    def full(f) -> None:  # noqa: ANN001
        f.write(b'{"half": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, full)
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_epoch_checkpoint_write_keeps_the_last_one(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"epoch 3")

    def save_checkpoint(path: str, weights_only: bool = False) -> None:
        Path(path).write_bytes(b"epoch 4, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer = SimpleNamespace(save_checkpoint=save_checkpoint, global_step=4, is_global_zero=True, loggers=[])
    with pytest.raises(OSError):
        EpochCheckpoint(tmp_path)._save_checkpoint(trainer, str(last))  # type: ignore[arg-type]
    assert last.read_bytes() == b"epoch 3" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
