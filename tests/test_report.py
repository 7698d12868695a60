"""The report on a fabricated sweep: exact table cells (ours | seed | diff) in report.md and
report.csv, missing/corrupt runs listed, budgets kept apart, figures, the Hydra callback, the CLI."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from compress.report import ReportCallback, write_report
from compress.reproduce import collect, sweep_keys, table_overrides

REPO = Path(__file__).resolve().parents[1]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
LAYERS = {"conv1": 0.5, "layer1.0.conv1": 0.7, "fc": 0.9}


def metrics(prune: str = "none", quant: str = "none", nbits: int | None = None, before: float = 0.9,
            after: float | None = None, budget: str = "full", seed: int = 0, **extra: Any) -> dict[str, Any]:
    """A metrics.json as compress.train writes it (only the fields the report reads, with known numbers)."""
    stages = [{"name": "prune" if prune != "none" else "quant" if quant != "none" else "finetune",
               "epochs": 2 if after is not None else 0, "before": {"acc": before, "loss": 1.0},
               "after": None if after is None else {"acc": after, "loss": 0.5}, "cached": False,
               "history": [{"epoch": e, "val/acc": after - 0.01 * (2 - e)} for e in (1, 2)] if after is not None else []}]
    return {"choices": {"prune": prune, "quant": quant, "nbits": nbits, "name": "t", "seed": seed},
            "before_ft": {"acc": before, "loss": 1.0}, "after_ft": None if after is None else {"acc": after, "loss": 0.5},
            "test_acc": after if after is not None else before, "sparsity": None, "stages": stages, "wall_time_s": 10.0,
            "hardware": {"device": "cpu", "threads": 2}, "config": {"budget_name": budget, "trainer": {"max_epochs": 2}},
            **extra}


def hydra_config(prune: str, quant: str, nbits: int, epochs: int) -> str:
    """The parts of a run's .hydra/config.yaml the report reads for an unfinished run."""
    return OmegaConf.to_yaml({"prune": {"method": prune, "epochs": "${trainer.max_epochs}"},
                              "quant": {"mode": quant, "epochs": "${trainer.max_epochs}"},
                              "trainer": {"max_epochs": epochs}, "nbits": nbits, "budget_name": "full"})


def put(root: Path, rel: str, m: dict | str | None, cfg: str | None = None) -> None:
    """A run dir ``root/rel`` with ``m`` as metrics.json (a str is written verbatim) and a .hydra/config.yaml."""
    (root / rel / ".hydra").mkdir(parents=True)
    (root / rel / ".hydra" / "config.yaml").write_text(cfg or "{}\n")
    if m is not None:
        (root / rel / "metrics.json").write_text(m if isinstance(m, str) else json.dumps(m))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    put(root, "full/prune=none", metrics(before=0.92, after=0.925) | {"before_ft": {"acc": 0.92, "loss": 0.30}})
    put(root, "full/prune=oneshot", metrics("oneshot", before=0.5, after=0.88,
                                            sparsity={"overall": 0.8, "layers": LAYERS}))
    put(root, "full/prune=global", metrics("global", before=0.6, after=0.89, sparsity={"overall": 0.81, "layers": LAYERS}))
    put(root, "full/prune=iterative", None, hydra_config("iterative", "none", 4, 20))  # unfinished
    put(root, "full/nbits=4,quant=asym", metrics(quant="asym", nbits=4, before=0.9))
    put(root, "full/nbits=4,quant=sym,seed=0", metrics(quant="sym", nbits=4, before=0.85))
    put(root, "full/nbits=4,quant=sym,seed=1", metrics(quant="sym", nbits=4, before=0.86, seed=1))
    put(root, "full/nbits=5,quant=asym", '{"choices": {"pru', hydra_config("none", "asym", 5, 0))  # corrupt
    put(root, "full/nbits=3,quant=asym,ft", metrics(quant="asym", nbits=3, before=0.4, after=0.90))
    put(root, "full/nbits=2,prune=global,quant=asym", metrics("global", "asym", 2, before=0.1, after=0.35,
                                                              size={"ratio": 12.5, "bits_per_weight": 2.56}))
    put(root, "full/prune=oneshot,quant=sym", metrics("oneshot", "sym", 4, before=0.7, after=0.8))  # in no table
    put(root, "full/nbits=8,quant=sym", metrics(quant="sym", nbits=8, before=0.91))  # a bit width the seed lacks
    put(root, "full/wrong", json.dumps({"choices": {"prune": "none"}, "before_ft": {"acc": 0.9}}))  # valid JSON, no quant
    put(root, "smoke/prune=none", metrics(before=0.92, after=0.5, budget="smoke"))
    return root


def cells(csv_path: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    with open(csv_path) as f:
        return {(r["budget"], r["table"], r["row"], r["column"]): r for r in csv.DictReader(f)}


def test_tables(sweep: Path, tmp_path: Path) -> None:
    md_path = write_report([sweep], tmp_path / "out")
    md = md_path.read_text()
    assert md_path == tmp_path / "out" / "report.md"
    # Table 3.1: baseline = before_ft, control = its after_ft, pruned rows = after_ft (+ before FT, sparsity).
    assert ("| FP baseline (pretrained) | 0.9200 | 0.9151 | +0.49 | 0.3000 | 0.3231 | -0.0231 "
            "| — | — | — | — | — | — |") in md
    assert "| FP fine-tuned, no pruning (control) | 0.9250 | — | — | 0.5000 | — | — |" in md
    assert ("| One-shot pruning + FT | 0.8800 | 0.8794 | +0.06 | 0.5000 | 0.3664 | +0.1336 "
            "| 0.5000 | — | — | 0.8000 | 0.8000 | +0.00 |") in md
    assert "| Iterative pruning + FT | missing | 0.8769 | — | missing | 0.3750 | — |" in md
    # Table 3.2: a corrupt run's cell is missing; two seeds in one cell give their mean and count.
    assert "| 5 | missing | 0.9113 | — | missing | 0.9071 | — |" in md
    assert "| 4 | 0.9000 | 0.8973 | +0.27 | 0.8550 (n=2) | 0.8532 | +0.18 |" in md
    assert "| 3 | 0.9000 | 0.9058 | -0.58 |" in md  # Table 3.3
    assert "| 2 | 0.1000 | 0.1000 | +0.00 | 0.3500 | 0.3348 | +1.52 |" in md  # Table 3.4
    # Section 4: -4.00 points vs the seed's -3.57 (from its Table 3.1); -4.35% relative vs its printed -3.9%.
    assert "| One-shot | -4.00 | -3.57 | -0.43 | -4.35 | -3.90 | -0.45 |" in md
    assert "| Global iterative | -3.00 | -3.10 | +0.10 | -3.26 | -3.40 | +0.14 |" in md
    # Traceability: each row names its run dirs; the run list shows the size fields.
    assert "`full/nbits=4,quant=asym`, `full/nbits=4,quant=sym,seed=0`, `full/nbits=4,quant=sym,seed=1` |" in md
    assert ("| `full/nbits=2,prune=global,quant=asym` | full | global | asym | 2 | prune 2 | 3.4 | 0.3500 | 10 "
            "| — | — | 12.50 | 2.56 |") in md
    assert "| `full/prune=oneshot,quant=sym` | full | oneshot | sym | 4 | prune 2 | none |" in md
    # Missing runs are listed with why, and what they would have been.
    missing = md.split("## Missing or incomplete runs")[1].split("## Runs")[0]
    assert "`full/prune=iterative`: unfinished: .hydra/ but no metrics.json (would be iterative, budget `full`)" in missing
    assert "`full/nbits=5,quant=asym`: unreadable or invalid metrics.json (JSONDecodeError" in missing
    assert "`full/wrong`: unreadable or invalid metrics.json (KeyError: 'quant')\n" in missing
    assert "Runs: 11 complete, 3 missing or incomplete." in md
    assert "| 8 | — | — | — | 0.9100 | — | — | `full/nbits=8,quant=sym` |\n| 6 | missing | 0.9144 |" in md
    # Budgets are separate tables.
    assert "| FP fine-tuned, no pruning (control) | 0.5000 | — | — |" in md.split("## Budget `smoke`")[1]
    assert md.index("## Budget `full`") < md.index("## Budget `smoke`")

    c = cells(tmp_path / "out" / "report.csv")
    assert c["full", "3.2", "4", "sym"] == {"budget": "full", "model": "resnet20", "table": "3.2", "row": "4", "column": "sym", "ours": "0.855",
                                                 "n": "2", "seed": "0.8532", "diff": "0.18", "diff_unit": "points",
                                                 "runs": "full/nbits=4,quant=sym,seed=0;full/nbits=4,quant=sym,seed=1"}
    assert (c["full", "3.1", "baseline", "loss"]["ours"], c["full", "3.1", "baseline", "loss"]["diff"]) == ("0.3", "-0.0231")
    assert c["full", "3.2", "5", "asym"]["ours"] == "" and c["full", "3.2", "5", "asym"]["runs"] == "full/nbits=5,quant=asym"
    assert c["full", "3.1", "iterative", "acc"]["n"] == "0" and c["full", "3.1", "iterative", "acc"]["seed"] == "0.8769"
    assert (c["full", "3.4", "2", "acc_after"]["ours"], c["full", "3.4", "2", "acc_after"]["diff"]) == ("0.35", "1.52")
    rel = c["full", "4", "oneshot", "rel_pct"]
    assert (rel["seed"], rel["diff"], rel["diff_unit"]) == ("-3.9", "-0.447826", "percent")
    assert c["full", "size", "full/nbits=2,prune=global,quant=asym", "ratio"]["ours"] == "12.5"
    assert c["smoke", "3.1", "control", "acc"]["ours"] == "0.5"


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_figures(sweep: Path, tmp_path: Path) -> None:
    md = write_report([sweep], tmp_path).read_text()
    for name in ("acc_vs_nbits_full.png", "sparsity_per_layer_full.png", "val_acc_per_epoch_full.png",
                 "val_acc_per_epoch_smoke.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert f"]({name})" in md
    assert not (tmp_path / "acc_vs_nbits_smoke.png").exists()  # no quantized runs there: not drawn


def test_without_matplotlib(sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    md = write_report([sweep], tmp_path).read_text()
    assert "Figures skipped: matplotlib is not installed" in md and not list(tmp_path.glob("*.png"))
    assert "| 4 | 0.9000 | 0.8973 | +0.27 |" in md


def test_callback(sweep: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep / "full")}}}))
    md = (sweep / "full" / "report.md").read_text()
    assert "| 4 | 0.9000 | 0.8973 | +0.27 |" in md
    assert "- Run dirs found under: `.`; paths below are relative to `.`." in md  # no machine's paths
    empty = tmp_path / "empty"  # a sweep that launched no job (its command line did not compose)
    empty.mkdir()
    (empty / "multirun.yaml").write_text("hydra: {}\n")
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(empty)}}}))
    assert not empty.exists()
    broken = tmp_path / "broken"  # a job ran, but the report cannot be written: a warning, never an error
    (broken / "job" / ".hydra").mkdir(parents=True)
    (broken / "report.md").mkdir()
    with caplog.at_level(logging.WARNING):
        ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(broken)}}}))
    assert "could not write the report" in caplog.text


def test_cli(sweep: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "compress.report"]
    ok = subprocess.run([*cmd, str(sweep / "full"), str(sweep / "smoke"), "-o", str(tmp_path / "o")],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    md = (tmp_path / "o" / "report.md").read_text()
    assert "paths below are relative to" in md and "`full/prune=oneshot`" in md and "## Budget `smoke`" in md
    bad = subprocess.run([*cmd, str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: not a directory: {tmp_path / 'nowhere'}"


def test_reproduce_collects_only_the_runs_its_command_launched(tmp_path: Path) -> None:
    def run(name: str, overrides: list[str]) -> None:
        (tmp_path / "sweep" / name / ".hydra").mkdir(parents=True)
        (tmp_path / "sweep" / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (tmp_path / "sweep" / name / "metrics.json").write_text("{}")

    cmd = table_overrides("table3_2", "smoke", [])
    assert sweep_keys("table3_2") == {"quant", "nbits"}
    assert sweep_keys("table3_2_bnrecal") == {"quant", "nbits"}  # inherited from table3_2
    run("nbits=2,quant=asym", ["quant=asym", "nbits=2", *cmd])
    run("nbits=2,quant=asym,trainer=gpu", ["quant=asym", "nbits=2", *cmd, "trainer=gpu"])
    run("nbits=2,optim.lr=0.1,quant=asym", ["quant=asym", "nbits=2", "optim.lr=0.1", *cmd])
    assert collect(tmp_path / "sweep", tmp_path / "out", cmd, sweep_keys("table3_2")) == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["nbits=2,quant=asym"]


def test_reproduce_keeps_the_published_config_of_a_run_a_later_launch_skipped(tmp_path: Path) -> None:
    """A relaunch rewrites a finished run's ``.hydra/`` in the sweep dir before the job skips it;
    publishing again keeps the published ``.hydra/`` of that run, and takes the sweep's for a
    run whose metrics changed."""
    cmd = table_overrides("table3_2", "smoke", [])

    def run(root: str, nbits: int, config: str, metrics: str) -> None:
        d = tmp_path / root / f"nbits={nbits},quant=asym"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*cmd, "quant=asym", f"nbits={nbits}"]))
        (d / ".hydra" / "config.yaml").write_text(config)
        (d / "metrics.json").write_text(metrics)

    run("published", 2, "as run", '{"test_acc": 0.9}')
    run("sweep", 2, "rewritten by the relaunch", '{"test_acc": 0.9}')
    run("published", 3, "as run", '{"test_acc": 0.9}')
    run("sweep", 3, "rewritten by the relaunch", '{"test_acc": 0.5}')
    assert collect(tmp_path / "sweep", tmp_path / "out", cmd, sweep_keys("table3_2"), tmp_path / "published") == 2
    assert (tmp_path / "out" / "nbits=2,quant=asym" / ".hydra" / "config.yaml").read_text() == "as run"
    assert (tmp_path / "out" / "nbits=3,quant=asym" / ".hydra" / "config.yaml").read_text() == "rewritten by the relaunch"


@pytest.mark.slow  # an end-to-end run of half a minute or more: .ci/run runs it with -m slow
def test_reproduce_reports_a_failed_table(tmp_path: Path) -> None:
    """Every job of the table fails (a data root without CIFAR-10): the reproduction still writes
    its report, marked incomplete and listing the failed runs, and exits 1. Runs in ``tmp_path``
    (its ``multirun/`` and report go there)."""
    cmd = [sys.executable, "-m", "compress.reproduce", "--tables", "table3_2", "--", f"data.root={tmp_path / 'none'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: table3_2 failed")
    report = (tmp_path / "multirun" / "reproduce" / "smoke" / "report.md").read_text()
    assert "**Incomplete**: runs of table3_2 failed" in report
    assert "0 complete, 10 missing or incomplete" in report
    assert "`table3_2/nbits=2,quant=asym`: unfinished" in report


def test_models_never_share_a_cell(tmp_path: Path) -> None:
    """Runs of ResNet-20 and ResNet-56 at the same budget: separate sections, the seed's numbers
    only beside ResNet-20's, figures named and titled with the model; an unfinished ResNet-56
    run (known from its .hydra config) is listed under its model."""
    def of(model: str, m: dict[str, Any]) -> dict[str, Any]:
        m["choices"]["model"] = model
        return m

    root = tmp_path / "multirun"
    put(root, "r20/nbits=4,quant=asym", metrics(quant="asym", nbits=4, before=0.9))
    put(root, "r56/nbits=4,quant=asym", of("resnet56", metrics(quant="asym", nbits=4, before=0.93)))
    put(root, "r56/nbits=3,quant=asym", of("resnet56", metrics(quant="asym", nbits=3, before=0.8)))
    unfinished = yaml.safe_load(hydra_config("none", "sym", 4, 0)) | {"model": {"name": "resnet56"}}
    put(root, "r56/nbits=4,quant=sym", None, OmegaConf.to_yaml(unfinished))
    md = write_report([root], tmp_path / "out").read_text()

    r20, r56 = md.split("## ResNet-56, budget `full`")[0], md.split("## ResNet-56, budget `full`")[1].split("## Missing")[0]
    assert "## Budget `full`" in r20 and "| 4 | 0.9000 | 0.8973 | +0.27 |" in r20
    assert "### Table 3.2: quantization without fine-tuning — ResNet-56, budget `full`" in r56
    assert "| 4 | 0.9300 | — | — | missing | — | — |" in r56  # no seed numbers for ResNet-56
    assert "| 3 | 0.8000 | — | — | — | — | — |" in r56
    assert "`r56/nbits=4,quant=sym`: unfinished: .hydra/ but no metrics.json (would be sym4 (no FT), ResNet-56, budget `full`)" in md
    assert "| `r56/nbits=4,quant=asym` | full | resnet56 | none | asym | 4 |" in md  # the run list gains a model column
    with open(tmp_path / "out" / "report.csv") as f:
        rows = [r for r in csv.DictReader(f) if (r["table"], r["row"], r["column"]) == ("3.2", "4", "asym")]
    assert [(r["model"], r["ours"], r["seed"]) for r in rows] == [("resnet20", "0.9", "0.8973"), ("resnet56", "0.93", "")]
    if HAS_MPL:
        assert (tmp_path / "out" / "acc_vs_nbits_full.png").is_file()
        assert (tmp_path / "out" / "acc_vs_nbits_resnet56_full.png").is_file()
        assert "*ResNet-56 test accuracy vs nbits, budget `full`" in md


def test_settings_the_seed_lacks_never_share_its_cells(tmp_path: Path) -> None:
    """W4A4 and W4A2 runs, and a 90%-sparse one, next to a weight-only run: each setting its own
    section without seed numbers; a recipe (clipping) fills the seed's cell, in its own section."""
    def cfg(**quant: Any) -> dict[str, Any]:
        return {"budget_name": "full", "trainer": {"max_epochs": 2}, "quant": {"mode": "asym", **quant},
                "prune": {"method": "none"}, "data": {"test_split": "all"}}

    root = tmp_path / "multirun"
    put(root, "w4", metrics(quant="asym", nbits=4, before=0.8, after=0.91, config=cfg(clip="mse")))
    put(root, "w4a4", metrics(quant="asym", nbits=4, before=0.8, after=0.89, config=cfg(abits=4)))
    put(root, "w4a2", metrics(quant="asym", nbits=4, before=0.2, after=0.33, config=cfg(abits=2)))
    sparse = cfg() | {"prune": {"method": "global", "sparsity": 0.9}}
    put(root, "p90", metrics("global", "asym", 4, before=0.7, after=0.85, config=sparse))
    md = write_report([root], tmp_path / "out").read_text()

    assert "| 4 | 0.9100 | 0.9140 | -0.40 | `w4` |" in md  # the seed's cell, beside the seed's number
    assert "## Budget `full`, recipe: mse clip\n" in md
    for variant, acc in (("activations 4-bit", "0.8900"), ("activations 2-bit", "0.3300")):
        section = md.split(f"## Budget `full`, {variant}")[1].split("\n## ")[0]
        assert f"| 4 | {acc} | — | — |" in section
    assert "## Budget `full`, sparsity 0.9" in md
    with open(tmp_path / "out" / "report.csv") as f:
        tables = {r["table"] for r in csv.DictReader(f)}
    assert {"3.3 (recipe: mse clip)", "3.3 (activations 4-bit)", "3.3 (activations 2-bit)", "3.4 (sparsity 0.9)"} <= tables
