"""What a run says of its time: the plan, an early estimate, the run's ETA, epoch lines in train.log."""

from __future__ import annotations

import re
from pathlib import Path


def test_a_run_says_its_plan_and_the_whole_runs_eta(run_app, data_root: Path) -> None:
    proc = run_app("prune=global", "quant=asym", "budget=debug", "progress=log", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "run: stage prune 2 epochs, stage quant 2 epochs (4 training epochs in all" in out
    assert re.search(r"prune: \d+ img/s over the first \d+ batches: about \S+ an epoch, \S+ for the run's 4 epochs left", out)
    assert re.search(r"prune epoch 1/2 .* ETA \S+ \(run \S+\)", out)  # this stage's, then the whole run's
    assert re.search(r"quant epoch 2/2 .* ETA 0s$", out, re.M)  # the last stage: its ETA is the run's


def test_with_a_progress_bar_the_epoch_lines_still_reach_train_log(run_app, data_root: Path) -> None:
    proc = run_app("prune=oneshot", "budget=debug", "progress=bar", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (proc.run_dir / "train.log").read_text()
    assert "prune epoch 1/2" in log and "prune epoch 2/2" in log
    assert "prune epoch 1/2" not in proc.stdout + proc.stderr  # the console shows the bar instead
