"""The ablation table of ``experiment=ablation``: what each option adds on top of the strong
recipe. ``python -m compress.ablation SWEEP_DIR [--out DIR]``.

Reads every finished run (``metrics.json``) of the sweep and writes ``ablation.md`` and
``ablation.csv``: one row per ``recipe``, one column per setting (dense 2-bit, 80% global +
2-bit, ...), each cell the test accuracy on the split the runs tested on and its difference
from the ``strong`` row in points. Incomplete runs are listed as missing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from compress.checkpoint import atomic_write

RECIPES = ("strong", "channel", "lsq", "kd", "kd_resnet56", "all", "best")
WHAT = {"strong": "strong recipe: mse clipping + BatchNorm re-estimation", "channel": "+ per-channel ranges",
        "lsq": "+ learned ranges (LSQ)", "kd": "+ distillation from the FP model",
        "kd_resnet56": "+ distillation from the FP ResNet-56",
        "all": "+ per-channel + LSQ + distillation", "best": "recipe=best"}
BASE = "strong"


def setting(m: dict[str, Any]) -> str:
    """A run's column: its pruning (method and sparsity) and bit width."""
    c = m["config"]
    pruned = "dense" if c["prune"]["method"] == "none" else f"{c['prune']['sparsity']:.0%} {c['prune']['method']}"
    abits = c["quant"].get("abits")
    return f"{pruned}, {c['quant']['mode']} {c['nbits']}-bit" + (f" A{abits}" if abits else "")


def recipe(run: Path) -> str:
    """The ``recipe=`` of a run dir (its Hydra overrides), or ``none``."""
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), "none")


def collect(sweep: Path) -> tuple[dict[tuple[str, str], dict[str, Any]], list[str], set[str]]:
    """``{(recipe, setting): metrics}`` of the finished runs, the unfinished run dirs, and the
    test splits the runs used."""
    cells, missing, splits = {}, [], set()
    for run in sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir()):
        if not (run / "metrics.json").is_file():
            missing.append(run.name)
            continue
        m = json.loads((run / "metrics.json").read_text())
        cells[recipe(run), setting(m)] = m
        splits.add(m["config"]["data"].get("test_split", "all"))
    return cells, missing, splits


def table(cells: dict[tuple[str, str], dict[str, Any]]) -> list[list[str]]:
    """Rows of the table (header first): recipe, what it adds, then per setting acc and Δ."""
    settings = sorted({s for _, s in cells}, key=lambda s: (not s.startswith("dense"), s))
    recipes = [r for r in RECIPES if any(k[0] == r for k in cells)] + sorted({r for r, _ in cells} - set(RECIPES))
    rows = [["recipe", "what", *(f"{s} {col}" for s in settings for col in ("acc", "Δ vs strong (pt)"))]]
    for r in recipes:
        row = [r, WHAT.get(r, "")]
        for s in settings:
            acc = cells.get((r, s), {}).get("test_acc")
            base = cells.get((BASE, s), {}).get("test_acc")
            row += ["missing" if acc is None else f"{acc:.4f}",
                    "" if acc is None or base is None or r == BASE else f"{100 * (acc - base):+.2f}"]
        rows.append(row)
    return rows


def write(sweep: Path, out: Path, notes: list[str] = ()) -> Path:
    """Write ``ablation.md`` and ``ablation.csv`` for ``sweep`` into ``out`` (``notes``: extra
    header lines, e.g. the command and commit that made the runs); returns the .md."""
    cells, missing, splits = collect(sweep)
    rows = table(cells)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    atomic_write(out / "ablation.csv", lambda f: f.write(buf.getvalue().encode()))
    walls = [m["wall_time_s"] for m in cells.values()]
    budget = sorted({m["config"].get("budget_name", "?") for m in cells.values()})
    hardware = sorted({", ".join(f"{k} {v}" for k, v in (m.get("hardware") or {}).items()) for m in cells.values()})
    lines = [
        "# Ablation: what each option adds on top of the strong recipe", "",
        f"- Sweep: `{sweep}`; budget {', '.join(budget)}; {len(cells)} finished runs, "
        f"{sum(walls) / 60:.1f} min of run wall time in all.",
        *(f"- Hardware: {h}" for h in hardware), *(f"- {n}" for n in notes),
        f"- Test accuracy on the `{'`, `'.join(sorted(splits))}` test split"
        + (" (the seeded half of the test set that selects recipes; the tables report on the rest)"
           if splits == {"search"} else "") + "; Δ in points against the `strong` row.",
        "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(r) + " |" for r in rows[1:]),
    ]
    if missing:
        lines += ["", "Missing or incomplete runs: " + ", ".join(f"`{m}`" for m in missing)]
    path = out / "ablation.md"
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.ablation", description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="the sweep dir of experiment=ablation")
    p.add_argument("--out", type=Path, help="where ablation.md/.csv go (default: the sweep dir)")
    p.add_argument("--note", action="append", default=[], help="a header line (repeatable): command, commit, ...")
    a = p.parse_args(argv)
    if not a.sweep.is_dir():
        print(f"error: {a.sweep} is not a directory: give the sweep dir of experiment=ablation", file=sys.stderr)
        return 2
    print(f"ablation table written to {write(a.sweep, a.out or a.sweep, a.note)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
