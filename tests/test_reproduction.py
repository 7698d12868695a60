"""A reproduction in pieces: finished runs restored from a published copy, the pruning stage
refilled from it, runs not started listed; and ``compress.verify`` re-checking artifacts."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from compress.checkpoint import Checkpoint, load_checkpoint
from compress.data import TEST_SPLIT_SEED
from compress.export import load, save
from compress.layers import bake
from compress.models import resnet20
from compress.prune import PruningCallback, current_masks
from compress.quant import QuantizationCallback, baked_grids
from compress.reproduce import (collect, expected_runs, finished_runs, prepare, publish, restore, restore_stage,
                               run_publishing)
from compress.stats import distinct_values, distinct_values_per_channel, sparsity
from compress.verify import MEAN, STD

REPO = Path(__file__).resolve().parents[1]


def test_expected_runs_are_hydras_dir_names() -> None:
    assert expected_runs("table3_4", []) == [f"nbits={n},prune=global,quant=asym" for n in (5, 4, 3, 2)]
    assert expected_runs("table3_1", ["trainer=gpu", "progress=none"])[0] == "prune=none,trainer=gpu"
    assert len(expected_runs("table3_2_strong", [])) == 10  # inherited from table3_2
    assert expected_runs("table3_4_best", []) == expected_runs("table3_4", [])
    assert expected_runs("table3_4_best_90", []) == ["nbits=2,prune.sparsity=0.9,prune=global,quant=asym"]
    # launcher settings configure Hydra, not the job: same run dirs
    assert expected_runs("table3_4", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]) == expected_runs("table3_4", [])


def fake_run(root: Path, name: str, overrides: list[str], files: dict[str, str]) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    for f, text in files.items():
        (run / f).write_text(text)
    return run


def test_published_runs_are_restored_and_the_report_lists_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs"))
    out = tmp_path / "published"
    launched = ["experiment=table3_3", "budget=full"]
    fake_run(out / "runs" / "table3_3", "nbits=5,quant=asym", ["quant=asym", "nbits=5", *launched],
             {"metrics.json": "{}", "model.cpk": "artifact"})
    sweep = tmp_path / "runs" / "table3_3" / "full"
    assert restore(out / "runs" / "table3_3", sweep) == 1
    assert (sweep / "nbits=5,quant=asym" / "model.cpk").read_text() == "artifact"
    assert restore(out / "runs" / "table3_3", sweep) == 0  # already there: left alone

    report = publish(out, ["table3_3"], "full", [], ["- a note"]).read_text()
    assert (out / "runs" / "table3_3" / "nbits=5,quant=asym" / "model.cpk").is_file()
    for n in (4, 3, 2):
        assert f"`table3_3/nbits={n},quant=asym`: not started yet" in report
    assert "- a note" in report


def test_a_partial_reproduction_keeps_the_tables_published_before(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs"))
    out = tmp_path / "published"
    fake_run(out / "runs" / "table3_1", "prune=global", ["prune=global", "experiment=table3_1", "budget=full"],
             {"metrics.json": "{}"})
    reported = prepare(out, ["table3_4"], "full", [])
    assert reported == ["table3_1", "table3_4"]
    assert (tmp_path / "runs" / "table3_1" / "full" / "prune=global" / "metrics.json").is_file()
    report = publish(out, reported, "full", [], []).read_text()
    assert (out / "runs" / "table3_1" / "prune=global" / "metrics.json").is_file()  # not wiped
    assert "`table3_4/nbits=2,prune=global,quant=asym`: not started yet" in report


def test_published_copies_name_what_the_machines_paths_stand_for(tmp_path: Path, monkeypatch) -> None:
    """A run's metrics.json and .hydra/hydra.yaml are published with the data root, the runs root
    and the checkout replaced by ``$COMPRESS_DATA``, ``$COMPRESS_RUNS`` and relative paths; a run
    published before is still recognized as the same result (its published .hydra/ kept)."""
    checkout, data, runs = tmp_path / "checkout", tmp_path / "data", tmp_path / "runs"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("COMPRESS_DATA", str(data))
    monkeypatch.setenv("COMPRESS_RUNS", str(runs))
    monkeypatch.delenv("COMPRESS_CACHE", raising=False)
    sweep = runs / "table3_3" / "full"
    metrics = json.dumps({"config": {"data": {"root": str(data)}, "stage_cache": str(checkout / "multirun" / ".stages")}})
    hydra = f"hydra:\n  runtime:\n    cwd: {checkout}\n    output_dir: {sweep}/nbits=5,quant=asym\n"
    overrides = ["quant=asym", "nbits=5", "experiment=table3_3", "budget=full"]
    run = fake_run(sweep, "nbits=5,quant=asym", overrides, {"metrics.json": metrics, ".hydra/hydra.yaml": hydra})
    launched = ["experiment=table3_3", "budget=full"]
    assert collect(sweep, tmp_path / "first", launched, {"quant", "nbits"}) == 1
    published = tmp_path / "first" / run.name
    assert json.loads((published / "metrics.json").read_text())["config"] == {
        "data": {"root": "$COMPRESS_DATA"}, "stage_cache": "multirun/.stages"}
    assert (published / ".hydra" / "hydra.yaml").read_text() == (
        "hydra:\n  runtime:\n    cwd: .\n    output_dir: $COMPRESS_RUNS/table3_3/full/nbits=5,quant=asym\n")
    (run / ".hydra" / "hydra.yaml").write_text("a later launch that skipped the run\n")
    assert collect(sweep, tmp_path / "second", launched, {"quant", "nbits"}, tmp_path / "first") == 1
    assert (tmp_path / "second" / run.name / ".hydra" / "hydra.yaml").read_text().startswith("hydra:")


def test_runs_finishing_during_a_sweep_are_published_as_they_finish(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    script = (f"import pathlib, time\nfor n in (1, 2):\n    time.sleep(0.3)\n"
              f"    d = pathlib.Path({str(sweep)!r}) / f'run{{n}}'\n    d.mkdir(parents=True)\n"
              f"    (d / 'metrics.json').write_text('{{}}')\ntime.sleep(0.3)\n")
    seen: list[set[str]] = []
    rc = run_publishing([sys.executable, "-c", script], sweep, lambda: seen.append(finished_runs(sweep)), poll_s=0.05)
    assert rc == 0
    assert seen[0] == {"run1"} and seen[-1] == {"run1", "run2"}


def test_a_terminated_reproduction_stops_its_sweep(tmp_path: Path) -> None:
    """SIGTERM to the reproduction (a closed session) stops the sweep it runs too, instead of
    leaving it training on its own, and exits 143."""
    pid_file = tmp_path / "sweep.pid"
    sweep = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(120)"
    parent = (f"import sys; from pathlib import Path\nfrom compress.interrupt import Interrupted\n"
              f"from compress.reproduce import run_publishing\n"
              f"try:\n    run_publishing([sys.executable, '-c', {sweep!r}], Path({str(tmp_path)!r}), print, poll_s=0.05)\n"
              f"except Interrupted as e:\n    sys.exit(e.exit_code)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.time() + 60
    while not pid_file.is_file() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_a_published_pruning_run_refills_the_stage_cache(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = resnet20()
    PruningCallback(0.8, "global").install(model)
    masks = current_masks(model)
    bake(model)
    run = tmp_path / "prune=global"
    run.mkdir()
    save(Checkpoint(model.state_dict(), masks, {"quant": None}), run / "model.cpk")
    stage = {"name": "prune", "epochs": 20, "before": {"acc": 0.9, "loss": 0.3}, "after": {"acc": 0.88, "loss": 0.4},
             "history": [], "wall_s": 1.0, "cached": False, "cache_key": "abc123"}
    (run / "metrics.json").write_text(json.dumps({"stages": [stage]}))

    assert restore_stage(run, tmp_path / "cache")
    entry = load_checkpoint(str(tmp_path / "cache" / "abc123" / "model.pt"))
    assert set(entry.masks) == set(masks) and all(torch.equal(entry.masks[k], masks[k]) for k in masks)
    assert all(torch.equal(entry.state_dict[k], v) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "cache" / "abc123" / "result.json").read_text())["after"]["acc"] == 0.88
    assert not restore_stage(run, tmp_path / "cache")  # there already


# --- compress.verify ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10 root whose test batch holds 200 random images."""
    root = tmp_path_factory.mktemp("cifar")
    (root / "cifar-10-batches-py").mkdir()
    rng = np.random.default_rng(0)
    batch = {"data": rng.integers(0, 256, (200, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 200).tolist()}
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    return root


def accuracy_on(root: Path, model: nn.Module) -> float:
    """The accuracy compress.train would record, computed here its own way (uint8 -> normalized)."""
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        b = pickle.load(f)
    x = torch.tensor(b["data"]).view(-1, 3, 32, 32).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == torch.tensor(b["labels"])).float().mean())


def write_run(run: Path, cifar: Path, granularity: str | None = None) -> Path:
    """A pruned (layer-wise 80%) + 3-bit asym run dir with a truthful metrics.json (``granularity``:
    ``channel``, or None as before the option existed)."""
    torch.manual_seed(0)
    model = resnet20()
    PruningCallback(0.8, "layer").install(model)
    masks = current_masks(model)
    QuantizationCallback("asym", 3, granularity=granularity or "tensor").install(model)
    bake(model)
    run.mkdir(parents=True)
    meta = {"quant": {"mode": "asym", "nbits": 3, "granularity": granularity or "tensor", "grids": baked_grids(model)}}
    save(Checkpoint(model.state_dict(), masks, meta), run / "model.cpk")
    metrics = {"test_acc": accuracy_on(cifar, model), "sparsity": sparsity(model),
               "distinct_values": distinct_values(model),
               "choices": {"quant": "asym", "nbits": 3, **({"granularity": granularity} if granularity else {})},
               "config": {"prune": {"method": "oneshot", "sparsity": 0.8}}}
    if granularity:
        metrics["distinct_values_per_channel"] = distinct_values_per_channel(model)
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def verified_run(tmp_path: Path, tiny_cifar: Path) -> Path:
    return write_run(tmp_path / "table3_4" / "nbits=3", tiny_cifar)


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress.verify", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_verify_passes_a_truthful_run_and_fails_a_tampered_one(verified_run: Path, tiny_cifar: Path) -> None:
    ok = verify(str(verified_run.parent), "--data", str(tiny_cifar))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    line = ok.stdout.splitlines()[0]
    assert line.startswith("ok   nbits=3  acc ") and int(line.split("max distinct ")[1].split("/8")[0]) <= 8
    assert ok.stdout.splitlines()[-1] == "1 of 1 runs verified"

    m = json.loads((verified_run / "metrics.json").read_text())
    m["test_acc"] += 0.01
    m["distinct_values"]["layer1.0.conv1"] = 5
    (verified_run / "metrics.json").write_text(json.dumps(m))
    bad = verify(str(verified_run), "--data", str(tiny_cifar))
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout and "test acc" in bad.stdout and "distinct values differ" in bad.stdout


def test_verify_does_not_compare_the_accuracy_of_a_run_tested_on_fewer_batches(verified_run: Path, tiny_cifar: Path) -> None:
    """budget=debug tests on 2 batches: its accuracy is printed, not held against all the images;
    the sparsity and distinct-value checks still apply."""
    m = json.loads((verified_run / "metrics.json").read_text())
    m["test_acc"] += 0.1
    for limit, compared in ((2, False), (1, False), (0.5, False), (1.0, True)):
        m["config"]["trainer"] = {"limit_test_batches": limit}
        (verified_run / "metrics.json").write_text(json.dumps(m))
        proc = verify(str(verified_run), "--data", str(tiny_cifar))
        assert proc.returncode == (1 if compared else 0), (limit, proc.stdout)
        assert (f"on trainer.limit_test_batches={limit}: not compared" in proc.stdout) != compared
    m["config"]["trainer"] = {"limit_test_batches": 2}
    m["distinct_values"]["layer1.0.conv1"] = 5
    (verified_run / "metrics.json").write_text(json.dumps(m))
    proc = verify(str(verified_run), "--data", str(tiny_cifar))
    assert proc.returncode == 1 and "distinct values differ" in proc.stdout and "test acc" not in proc.stdout.split("FAIL: ")[1]


@pytest.mark.slow  # an end-to-end run of half a minute or more: .ci/run runs it with -m slow
def test_verify_compares_a_debug_run_on_the_test_images_it_tested(run_app, data_root: Path, pretrained: Path) -> None:
    """budget=debug tests 2 batches: metrics.json records how many images (the first 2 x 100 here)
    and verify compares the accuracy on exactly those, so a tampered accuracy still fails."""
    proc = run_app("quant=asym", "nbits=3", "budget=debug", "trainer.max_epochs=0", "data.eval_batch_size=100",
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((proc.run_dir / "metrics.json").read_text())
    assert m["test_images"] == 200
    ok = verify(str(proc.run_dir), "--data", str(data_root))
    assert ok.returncode == 0 and "on the first 200 of 10000 test images)" in ok.stdout, ok.stdout + ok.stderr
    for bad_metrics, why in (({"test_acc": m["test_acc"] + 0.01}, "test acc"),
                             ({"test_images": 10001}, "test_images 10001 is not a count of 1..10000")):
        (proc.run_dir / "metrics.json").write_text(json.dumps(m | bad_metrics))
        bad = verify(str(proc.run_dir), "--data", str(data_root))
        assert bad.returncode == 1 and why in bad.stdout.split("FAIL: ")[1], bad.stdout


def test_verify_report_half_is_the_accuracy_on_the_images_no_search_saw(verified_run: Path, tiny_cifar: Path) -> None:
    proc = verify(str(verified_run), "--data", str(tiny_cifar), "--report-half")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = float(re.search(r"  report half (\d\.\d{4})  ", proc.stdout).group(1))
    with open(tiny_cifar / "cifar-10-batches-py" / "test_batch", "rb") as f:
        b = pickle.load(f)
    unseen = torch.randperm(200, generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))[100:]  # not the search half
    x = torch.tensor(b["data"]).view(-1, 3, 32, 32).float()[unseen] / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = float((load(verified_run / "model.cpk").eval()(x).argmax(1) == torch.tensor(b["labels"])[unseen]).float().mean())
    assert shown == pytest.approx(expected, abs=5e-5)
    assert "report half" not in verify(str(verified_run), "--data", str(tiny_cifar)).stdout


def test_verify_checks_per_channel_runs_per_channel(tmp_path: Path, tiny_cifar: Path) -> None:
    run = write_run(tmp_path / "nbits=3,quant.granularity=channel", tiny_cifar, "channel")
    m = json.loads((run / "metrics.json").read_text())
    assert max(m["distinct_values"].values()) > 8 >= max(m["distinct_values_per_channel"].values())
    ok = verify(str(run), "--data", str(tiny_cifar))
    assert ok.returncode == 0 and re.search(r" max distinct [1-8]/8 per channel\n", ok.stdout), ok.stdout + ok.stderr
    m["distinct_values_per_channel"]["layer1.0.conv1"] -= 1
    (run / "metrics.json").write_text(json.dumps(m))
    assert "distinct values per channel differ" in verify(str(run), "--data", str(tiny_cifar)).stdout
    m["choices"]["granularity"] = "tensor"  # a per-tensor run may not hold more than 8 values a tensor
    del m["distinct_values_per_channel"]
    (run / "metrics.json").write_text(json.dumps(m))
    bad = verify(str(run), "--data", str(tiny_cifar))
    assert bad.returncode == 1 and "18 tensors with more than 8 values" in bad.stdout, bad.stdout


def test_verify_bad_input_is_one_line(tmp_path: Path) -> None:
    proc = verify(str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such file or directory"


@pytest.mark.slow
def test_verify_published_full_budget_runs(data_root: Path) -> None:
    """Two published full-budget artifacts re-evaluated from scratch on the real test set."""
    runs = REPO / "multirun" / "published" / "full" / "runs" / "table3_2"
    proc = verify(str(runs / "nbits=4,quant=asym"), str(runs / "nbits=2,quant=sym"), "--data", str(data_root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "2 of 2 runs verified"
