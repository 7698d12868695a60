"""What a run says of its time: the plan, an early estimate, the run's ETA, epoch lines in train.log."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from compress.progress import StageBar


def test_a_run_says_its_plan_and_the_whole_runs_eta(run_app, data_root: Path) -> None:
    proc = run_app("prune=global", "quant=asym", "budget=debug", "progress=log", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "run: stage prune 2 epochs, stage quant 2 epochs (4 training epochs in all" in out
    assert re.search(r"prune: \d+ img/s over the first \d+ batches: about \S+ an epoch, \S+ for the run's 4 epochs left", out)
    assert re.search(r"prune epoch 1/2 .* ETA \S+ \(run \S+\)", out)  # this stage's, then the whole run's
    assert re.search(r"quant epoch 2/2 .* ETA 0s$", out, re.M)  # the last stage: its ETA is the run's


@pytest.fixture(scope="module")
def quiet_runs(run_apps, data_root: Path) -> dict:
    """A two-stage debug run with the progress bar, and one with no progress display."""
    base = ["prune=oneshot", "quant=asym", "budget=debug"]
    return run_apps({"bar": [*base, "progress=bar"], "none": [*base, "progress=none"]}, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("progress", ["bar", "none"])
def test_without_epoch_lines_on_the_console_they_still_reach_train_log(quiet_runs, progress: str) -> None:
    proc = quiet_runs[progress]
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (proc.run_dir / "train.log").read_text()
    for stage in ("prune", "quant"):
        assert re.search(rf"{stage} epoch 1/2 .* ETA \S+", log) and f"{stage} epoch 2/2" in log, log
    assert "epoch 1/2" not in proc.stdout + proc.stderr  # the console shows the bar, or nothing


def test_the_bar_names_the_stage_and_epoch_and_shows_the_runs_eta(quiet_runs) -> None:
    out = quiet_runs["bar"].stdout + quiet_runs["bar"].stderr
    for stage in ("prune", "quant"):
        assert re.search(rf"{stage} 1/2: .*run ETA=\S+", out) and re.search(rf"{stage} 2/2: 100%", out), out[-3000:]
    assert "v_num" not in out  # the logger's version, which the stage's name replaces
    assert "run ETA" not in quiet_runs["none"].stdout + quiet_runs["none"].stderr


def test_the_bars_eta_covers_the_later_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 of 4 batches of epoch 1 of 2 took 6 s; 1 + 4 batches are left in this stage and 3 x 4
    in the later ones: 17 batches at 2 s."""
    bar = StageBar("prune", later_epochs=3)
    bar.t0, bar.batches, bar.in_epoch = 100.0, 3, 3
    monkeypatch.setattr(time, "perf_counter", lambda: 106.0)
    trainer = SimpleNamespace(max_epochs=2, current_epoch=0, num_training_batches=4, loggers=[],
                              progress_bar_metrics={"train/loss": 1.5})
    assert bar.get_metrics(trainer, None) == {"train/loss": 1.5, "run ETA": "34s"}  # type: ignore[arg-type]
    bar.later = 0
    assert bar.get_metrics(trainer, None)["run ETA"] == "10s"  # type: ignore[arg-type]
