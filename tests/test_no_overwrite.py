"""A finished result is never replaced by the result of another configuration."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.models import resnet20
from compress.train import differing_keys


def weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save({"state_dict": resnet20().state_dict()}, path)
    return path


def test_other_weights_in_a_finished_run_dir_stop_with_one_line(run_app, data_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = ["quant=none", "trainer.max_epochs=0", "trainer.limit_test_batches=1", "progress=none"]
    first = run_app(*base, f"model.pretrained={weights(tmp_path / 'a.th', 0)}", run_dir=run_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (run_dir / "metrics.json").read_bytes()
    second = run_app(*base, f"model.pretrained={weights(tmp_path / 'b.th', 1)}", run_dir=run_dir)
    assert second.returncode == 2, second.stderr[-2000:]
    err = second.stderr.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {run_dir} holds the finished result of another configuration")
    assert "differs in model.pretrained" in err and "it is kept" in err
    assert (run_dir / "metrics.json").read_bytes() == before  # nothing replaced
    again = run_app(*base, f"model.pretrained={tmp_path / 'a.th'}", run_dir=run_dir)  # the same result: skipped
    assert again.returncode == 0 and "already finished, skipping" in again.stdout + again.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["config_hash"] == json.loads(before)["config_hash"]


def test_differing_keys_are_dotted_and_leave_out_what_is_not_hashed() -> None:
    old = {"model": {"pretrained": "a", "name": "r"}, "seed": 0, "progress": "log", "data": {"root": "/x"}}
    new = {"model": {"pretrained": "b", "name": "r"}, "seed": 1, "progress": "bar", "data": {"root": "/x", "n": 1}}
    assert differing_keys(old, new) == ["data.n", "model.pretrained", "seed"]
