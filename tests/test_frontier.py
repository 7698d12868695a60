"""The frontier search (``hparams_search=frontier``): configs, the front, the seed's points and
their dominance, and a tiny search end to end (Optuna sweeper, ``search`` extra)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

import compress.sensitivity  # noqa: F401 - registers the sensitive_widths resolver
from compress.config import validate
from compress.frontier import SEED_CELLS, SeedPoint, Trial, dominance_table, dominates, pareto, published_runs, seed_points, trials
from compress.cells import SEED

from conftest import REPO, app_command



def trial(run: str, acc: float, size: int, report: float | None = None) -> Trial:
    return Trial(run, 0.8, "asym", 4, "", acc, size, 1.0, 60.0, report)


def test_dominance_and_the_front() -> None:
    assert dominates(0.9, 100, 0.9, 200) and dominates(0.91, 100, 0.9, 100)
    assert not dominates(0.9, 100, 0.9, 100) and not dominates(0.95, 300, 0.9, 200)
    found = [trial("a", 0.90, 100), trial("b", 0.85, 120), trial("c", 0.92, 150), trial("d", 0.92, 150),
             trial("e", 0.70, 50), trial("f", 0.91, 200)]
    front = pareto(found)
    assert [(t.acc_search, t.compressed_bytes) for t in front] == [(0.70, 50), (0.90, 100), (0.92, 150)]
    assert front[2].run in ("c", "d")  # one run per point


def test_the_seed_points_take_our_bytes_and_are_judged_on_the_report_half() -> None:
    front = [trial("small", 0.88, 60_000, report=0.885), trial("big", 0.92, 150_000, report=0.905)]
    seeds = [SeedPoint("3.2 asym4, no FT", 0.8973, 150_016, "full/x"), SeedPoint("3.3 asym4 + FT", 0.9140, 150_035, "smoke/y"),
             SeedPoint("3.2 sym2, no FT", 0.1, 20_754, "full/z")]
    lines = dominance_table(front, seeds)
    assert "| 3.2 asym4, no FT | 0.8973 | 150,016 (`full/x`) | **yes** (Δ within noise) | `big`: 0.9050, 150,000 B | +0.77 |" in lines
    assert "| 3.3 asym4 + FT | 0.9140 | 150,035 (`smoke/y`) | no | `big`: 0.9050, 150,000 B | -0.90 |" in lines
    assert dominance_table(front, [SeedPoint("3.4", 0.85, 70_000, "s")])[2].split(" | ")[3] == "**yes**"  # +3.5 points
    assert any(ln.startswith("| 3.2 sym2, no FT |") and "no front point is this small" in ln for ln in lines)


def fake_run(root: Path, name: str, prune: str, quant: str, nbits: int | None, after: float | None, size: int,
             split: str = "all", budget: str = "full") -> Path:
    run = root / name
    run.mkdir(parents=True)
    m = {"choices": {"prune": prune, "quant": quant, "nbits": nbits, "model": "resnet20"},
         "before_ft": {"acc": 0.5}, "after_ft": {"acc": after} if after is not None else None, "test_acc": after or 0.5,
         "compressed_bytes": size, "bits_per_weight": 2.0, "wall_time_s": 30.0, "layer_nbits": {},
         "config": {"budget_name": budget, "data": {"test_split": split}, "prune": {"method": prune, "sparsity": 0.8}}}
    (run / "metrics.json").write_text(json.dumps(m))
    return run


def test_seed_points_are_sized_by_our_run_of_the_same_cell_best_budget_first(tmp_path: Path) -> None:
    full, smoke = tmp_path / "full", tmp_path / "smoke"
    fake_run(full, "nbits=4,quant=asym", "none", "asym", 4, None, 150_016)
    fake_run(smoke, "nbits=4,quant=asym", "none", "asym", 4, None, 150_999, budget="smoke")
    fake_run(smoke, "nbits=4,prune=global,quant=asym", "global", "asym", 4, 0.89, 66_704, budget="smoke")
    runs = published_runs([full, smoke, tmp_path / "absent"])
    points = {p.name: p for p in seed_points(runs)}
    assert points["3.2 asym4, no FT"].compressed_bytes == 150_016 and points["3.2 asym4, no FT"].bytes_from.startswith("full/")
    assert points["3.2 asym4, no FT"].acc == SEED["3.2"][4]["asym"]
    assert {points[f"3.4 global 80% + asym4, {w} FT"].compressed_bytes for w in ("before", "after")} == {66_704}
    assert "3.2 sym4, no FT" not in points  # no run of ours fills that cell: left out
    assert len(SEED_CELLS) == 22


def test_trials_must_have_selected_on_the_search_half(tmp_path: Path) -> None:
    fake_run(tmp_path, "a", "global", "asym", 4, 0.9, 70_000, split="search")
    assert [t.run for t in trials(tmp_path)] == ["a"]
    fake_run(tmp_path, "b", "global", "asym", 4, 0.9, 70_000, split="all")
    with pytest.raises(ValueError, match="tested on data.test_split='all'; a frontier search selects on 'search' only"):
        trials(tmp_path)


def test_frontier_configs_compose_with_the_optuna_sweeper(hydra_compose, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = hydra_compose(["hparams_search=frontier"], return_hydra_config=True)
    assert cfg.budget_name == "smoke" and cfg.data.test_split == "search" and cfg.prune.method == "global"
    assert cfg.hydra.sweeper.direction == ["maximize", "minimize"] and cfg.hydra.sweeper.n_trials == 16
    assert cfg.hydra.callbacks.report._target_ == "compress.frontier.FrontierCallback"
    assert set(cfg.hydra.sweeper.params) == {"prune.sparsity", "quant", "nbits"}
    assert hydra_compose(["hparams_search=frontier", "budget=debug"]).budget_name == "debug"  # the command line wins
    ranking = sensitivity_csv(tmp_path / "s.csv", {"layer1.0.conv1": 0.3, "layer3.2.conv2": 0.5, "layer2.0.conv2": 0.8})
    cfg = hydra_compose(["hparams_search=frontier_layers", f"frontier.sensitivity={ranking}",
                         "frontier.protect=2", "nbits=3"])
    assert cfg.quant.layer_nbits == {"layer1.0.conv1": 5, "layer3.2.conv2": 5}
    validate(cfg)
    assert hydra_compose(["hparams_search=frontier_layers"]).quant.layer_nbits == {}  # protect 0: reads no file


def sensitivity_csv(path: Path, accs: dict[str, float]) -> Path:
    """A sensitivity CSV in which each named block conv has the given search-half accuracy."""
    rows = [{"layer": n, "method": "asym", "setting": 2, "weights": 1, "acc": a, "acc_search": a, "acc_report": 0.9,
             "drop": 0} for n, a in accs.items()]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.slow
def test_a_tiny_search_writes_its_front(tmp_path: Path, data_root: Path, pretrained: Path) -> None:
    """Two trials at a few batches each, with the two most sensitive layers protected: every
    trial selected on the search half at its own per-layer widths, Optuna got (test_acc,
    compressed_bytes) back from each, the front is written with its report-half accuracy."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import subprocess

    sweep = tmp_path / "sweep"
    ranking = sensitivity_csv(tmp_path / "s.csv", {"layer1.0.conv1": 0.3, "layer3.2.conv2": 0.5, "layer2.0.conv2": 0.8})
    cmd, env, _ = app_command(["hparams_search=frontier_layers", f"frontier.sensitivity={ranking}", "frontier.protect=2",
                               "budget=debug", "trainer.max_epochs=1", "hydra.sweeper.n_trials=2",
                               f"hydra.sweep.dir={sweep}"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = trials(sweep)
    assert 1 <= len(found) <= 2
    for t in found:
        wide = min(8, t.nbits + 2)
        assert t.layer_nbits == ("" if wide == t.nbits else f"layer1.0.conv1:{wide} layer3.2.conv2:{wide}")
    told = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["solutions"]
    assert {tuple(s["values"]) for s in told} <= {(t.acc_search, float(t.compressed_bytes)) for t in found}
    with open(sweep / "front.csv") as f:
        front = list(csv.DictReader(f))
    assert front and all(0 <= float(r["acc_report"]) <= 1 for r in front)
    report = (sweep / "report.md").read_text()
    assert "Selection and reporting use different test images" in report and "![front.png](front.png)" in report
    assert (sweep / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((sweep / "search.json").read_text())["trials"] == 2
