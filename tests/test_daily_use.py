"""Day-to-day use: progress lines, loggers, the debug budget, clean interrupts, file modes,
and display settings kept out of the config hash (published hashes: test_config_hash.py)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from compress.config import config_hash
from compress.interrupt import Interrupted, critical, stop_on_signals
from compress.progress import check_progress, duration
from conftest import REPO, app_command

HAS_TENSORBOARD = find_spec("tensorboard") is not None or find_spec("tensorboardX") is not None
OPTIONAL_LOGGERS = [name for name in ("wandb", "mlflow") if find_spec(name) is not None]


def test_display_settings_do_not_change_the_hash() -> None:
    with initialize_config_module("compress.conf", version_base="1.3"):
        base = config_hash(compose("config"))
        assert config_hash(compose("config", overrides=["progress=none", "logger=none"])) == base
        assert config_hash(compose("config", overrides=["trainer.limit_train_batches=1.0"])) == base
        assert config_hash(compose("config", overrides=["trainer.limit_train_batches=4"])) != base


def test_duration_and_progress_choices(monkeypatch) -> None:
    assert [duration(s) for s in (42, 187, 3725)] == ["42s", "3m07s", "1h02m"]
    assert check_progress("log") == "log" and check_progress("none") == "none"
    with pytest.raises(ValueError, match="progress='x' is not allowed: use one of auto, log, bar, none"):
        check_progress("x")


def test_a_signal_inside_critical_waits_for_the_end_of_the_block() -> None:
    done, before = [], signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job
    with stop_on_signals():
        with pytest.raises(Interrupted) as info:
            with critical():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("write finished")
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert done == ["write finished"]
    assert info.value.exit_code == 143 and "SIGTERM" in info.value.message()
    assert signal.getsignal(signal.SIGINT) is before  # restored


# --- the app, on real data ----------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_run(run_apps, data_root: Path, pretrained: Path) -> subprocess.CompletedProcess:
    loggers = "logger=[csv,tensorboard]" if HAS_TENSORBOARD else "logger=csv"
    return run_apps({"run": ["prune=iterative", "quant=asym", "nbits=3", "budget=debug", "progress=log", loggers]})["run"]


def test_debug_budget_runs_every_stage_with_progress_and_csv(debug_run) -> None:
    assert debug_run.returncode == 0, debug_run.stderr
    log = (debug_run.run_dir / "train.log").read_text()
    for stage in ("prune", "quant"):
        assert f"{stage} epoch 1/2  loss" in log and "ETA" in log
        assert f"stage {stage}: test acc" in log
        rows = (debug_run.run_dir / "csv" / stage / "metrics.csv").read_text().splitlines()
        assert rows[0].startswith("epoch,") and "train/acc" in rows[0] and len(rows) > 3
    assert "results in" in debug_run.stdout + log
    metrics = json.loads((debug_run.run_dir / "metrics.json").read_text())
    assert metrics["config"]["budget_name"] == "debug" and metrics["max_distinct_values"] <= 8


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
def test_tensorboard_logger_writes_event_files(debug_run) -> None:
    for stage in ("prune", "quant"):
        assert list((debug_run.run_dir / "tensorboard" / stage).glob("events.out.tfevents.*"))


@pytest.mark.skipif(not OPTIONAL_LOGGERS, reason="neither wandb nor mlflow is installed")
def test_wandb_and_mlflow_presets_log_into_the_run_dir(run_app, data_root: Path, pretrained: Path) -> None:
    proc = run_app("prune=global", "budget=debug", f"logger=[{','.join(OPTIONAL_LOGGERS)}]",
                   env={"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "wandb" in OPTIONAL_LOGGERS:  # an offline run, to `wandb sync` later
        assert list((proc.run_dir / "wandb").glob("offline-run-*-prune/run-prune.wandb"))
    if "mlflow" in OPTIONAL_LOGGERS:  # a SQLite store in the run dir (MLflow retired its file store)
        with sqlite3.connect(proc.run_dir / "mlflow.db") as db:
            keys = {k for (k,) in db.execute("select distinct key from metrics")}
        assert {"train/loss", "val/acc", "test/acc"} <= keys


def test_results_are_readable_by_everyone(debug_run) -> None:
    for name in ("metrics.json", "model.pt", "model.cpk"):
        mode = stat.S_IMODE((debug_run.run_dir / name).stat().st_mode)
        assert mode & 0o044 == 0o044, f"{name}: {oct(mode)}"


def test_dense_run_reports_zero_sparsity(run_app, data_root: Path, pretrained: Path) -> None:
    proc = run_app("quant=none", "trainer.max_epochs=0", "budget=debug")
    assert proc.returncode == 0, proc.stderr
    sparsity = json.loads((proc.run_dir / "metrics.json").read_text())["sparsity"]
    assert sparsity["overall"] == 0.0 and set(sparsity["layers"].values()) == {0.0}


def test_sigterm_stops_with_one_line_and_the_rerun_resumes(tmp_path: Path, data_root: Path, pretrained: Path) -> None:
    cmd, env, run_dir = app_command(["prune=global", "budget=debug", "trainer.max_epochs=3"], tmp_path)
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(run_dir.glob("checkpoints/*/last.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    killed_after = time.time() - started
    assert proc.returncode == 143, err
    assert err.strip().count("\n") == 0 and err.startswith("error: interrupted by SIGTERM in stage prune at epoch ")
    assert "last.ckpt (end of epoch 1)" in err and "re-run the same command to resume" in err
    assert not (run_dir / "metrics.json").exists()

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed at epoch 2" in (run_dir / "train.log").read_text()
    assert "exists and is not empty" not in again.stderr + again.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())  # the killed run's time is counted too
    stage = metrics["stages"][0]
    assert 0 < stage["resumed_s"] < killed_after and stage["wall_s"] > stage["resumed_s"]
    assert metrics["wall_time_s"] > stage["wall_s"]
