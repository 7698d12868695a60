"""The ablation table: one row per recipe, one column per setting, Δ against the strong row."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from compress.ablation import main


def run(sweep: Path, recipe: str, prune: str, acc: float | None) -> None:
    d = sweep / f"nbits=2,prune={prune},quant=asym,recipe={recipe}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["quant=asym", "nbits=2", f"prune={prune}", f"recipe={recipe}"]))
    if acc is None:
        return
    config = {"prune": {"method": prune, "sparsity": 0.8}, "quant": {"mode": "asym", "abits": None}, "nbits": 2,
              "data": {"test_split": "search"}, "budget_name": "smoke"}
    (d / "metrics.json").write_text(json.dumps({"test_acc": acc, "wall_time_s": 60.0, "config": config}))


def test_rows_columns_and_deltas(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run(sweep, "strong", "none", 0.89)
    run(sweep, "kd", "none", 0.9042)
    run(sweep, "strong", "global", 0.85)
    run(sweep, "kd", "global", None)  # still running
    assert main([str(sweep)]) == 0
    md = (sweep / "ablation.md").read_text()
    assert "| recipe | what | dense, asym 2-bit acc | dense, asym 2-bit Δ vs strong (pt) | 80% global, asym 2-bit acc |" in md
    assert "| kd | + distillation from the FP model | 0.9042 | +1.42 | missing |  |" in md
    assert "`search` test split" in md and "Missing or incomplete runs: `nbits=2,prune=global,quant=asym,recipe=kd`" in md
    assert (sweep / "ablation.csv").read_text().splitlines()[2].startswith("kd,")


def test_not_a_dir_is_one_line(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")
