"""Compare a sweep's runs with the seed report: ``python -m compress.report multirun/table3_2/full [-o out]``.

Walks the given dirs for run dirs (a dir holding ``.hydra/config.yaml`` or ``metrics.json``), maps
each run to its cells of the seed's Tables 3.1-3.4 and section 4, and writes ``report.md``,
``report.csv`` and PNG figures. Every cell is "ours | seed | diff" with the run dirs it came from;
tables are split by model and budget, and several runs in one cell (e.g. seeds) show their mean and count.
A run dir without a readable, valid ``metrics.json`` is listed as missing, and its cell (known
from ``.hydra/config.yaml``) reads "missing". Runs of different models (``model=resnet32`` ...) go
into separate sections; only ResNet-20's cells have seed numbers (the seed report is about it).
"""

from __future__ import annotations

import argparse
import atexit
import csv
import logging
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from compress.cells import (
    FRACTIONS, TABLES, UNITS, Cell, Key, Section, dig, find_runs, gather, label, seed_numbers, slots,
)
from compress.figures import figures

log = logging.getLogger(__name__)


def fmt(v: float | None, col: str) -> str:
    """A value as the seed prints it (4 decimals; points with 2)."""
    return "—" if v is None else f"{v:.2f}" if col in ("pts", "rel_pct") else f"{v:.4f}"


def compare(cell: Cell | None, seed: float | None, col: str) -> tuple[float | None, float | None]:
    """(ours: mean of the cell, diff: ours - seed, in points for fractions)."""
    ours = mean(cell.values) if cell and cell.values else None
    if ours is None or seed is None:
        return ours, None
    return ours, (ours - seed) * 100 if col in FRACTIONS else ours - seed


def table_md(section: Section, tid: str, cells: dict[Key, Cell], csv_rows: list[list[Any]]) -> list[str]:
    """Markdown lines of one table for one section (and its CSV rows appended to ``csv_rows``)."""
    title, head, rows, cols = TABLES[tid]
    if head == "Nbits":  # the seed's bit widths and any other our runs have
        bits = {r for r, _ in rows} | {k[2] for k in cells if k[:2] == (section, tid)}
        rows = [(n, str(n)) for n in sorted(bits, reverse=True)]
    lines = [f"### {title} — {section.label}", "",
             "| " + " | ".join([head, *(f"{name} {w}" for _, name in cols for w in ("ours", "seed", "Δ")), "runs"]) + " |",
             "|" + "---|" * (2 + 3 * len(cols))]
    for row, row_label in rows:
        seed_row = seed_numbers(section, tid).get(row, {})
        row_cells = [cells.get((section, tid, row, col)) for col, _ in cols]
        if not seed_row and not any(row_cells):
            continue
        parts, row_runs = [row_label], []
        for (col, _), cell in zip(cols, row_cells):
            seed = seed_row.get(col)
            ours, d = compare(cell, seed, col)
            n, runs = (len(cell.values), cell.runs) if cell else (0, [])
            if ours is not None:
                text = fmt(ours, col) + (f" (n={n})" if n > 1 else "")
            else:  # a cell no run maps to and the seed leaves empty does not apply (e.g. the baseline's sparsity)
                text = "missing" if cell or seed is not None else "—"
            parts += [text, fmt(seed, col), "—" if d is None else f"{d:+.4f}" if col == "loss" else f"{d:+.2f}"]
            row_runs += [r for r in runs if r not in row_runs]
            table = f"{tid} ({', '.join(x for x in (section.variant, section.recipe) if x)})" if section.variant or section.recipe else tid
            csv_rows.append([section.budget, section.model, table, row, col, ours, n, seed, d, UNITS.get(col, "points"), ";".join(runs)])
        lines.append("| " + " | ".join(parts + [", ".join(f"`{r}`" for r in row_runs) or "—"]) + " |")
    return lines + [""]


def heading(section: Section) -> str:
    """A section's heading: ``Budget `full```, ``ResNet-56, budget `full```."""
    return section.label[0].upper() + section.label[1:]


def shown(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (where the report is written) when it lies below it, else
    to the working directory when below that, else absolute: a published report names no
    machine's paths."""
    path = Path(path).resolve()
    for root in (Path(base).resolve(), Path.cwd()):
        if path.is_relative_to(root):
            return str(path.relative_to(root))
    return str(path)


def size_text(value: object) -> str:
    """A size column's cell: bytes as integers, ratio and bits/weight to 2 decimals."""
    if isinstance(value, float):
        return f"{value:.2f}"
    return "—" if value is None else str(value)


def write_report(dirs: list[Path], out: Path, notes: list[str] = (), pending: list[str] = ()) -> Path:
    """Write ``report.md``, ``report.csv`` and figures for the runs under ``dirs`` into ``out``; returns report.md.

    ``notes`` are extra markdown lines for the header (e.g. the command that made the runs);
    ``pending`` names expected runs that have no run dir yet (listed as missing, not started)."""
    common, runs, missing = find_runs([Path(d) for d in dirs])
    missing += [(rel, "not started yet", None) for rel in pending]
    runs.sort(key=lambda r: r[0])
    cells = gather(runs, missing)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = sorted({k[0] for k in cells} | {job.section for *_, job in runs},
                      key=lambda s: (not s.seeded, s.model, s.budget != "full", s.budget, s.variant, s.recipe))

    wall = sum(m.get("wall_time_s") or 0 for _, m, _ in runs)
    hardware = defaultdict(int)
    for _, m, _ in runs:
        h = m.get("hardware") or {}
        hardware[", ".join(f"{k} {v}" for k, v in h.items()) or "unknown"] += 1
    md = ["# Compression report: ours vs the seed report", "", *notes,
          f"- Run dirs found under: {', '.join(f'`{shown(d, out)}`' for d in map(Path, dirs))}; "
          f"paths below are relative to `{shown(common, out)}`.",
          f"- Runs: {len(runs)} complete, {len(missing)} missing or incomplete."]
    for sec in sections:
        epochs = sorted({dig(m, ("config", "trainer", "max_epochs")) for _, m, j in runs if j.section == sec} - {None})
        md.append(f"- {heading(sec)}: complete runs {sum(j.section == sec for *_, j in runs)}, "
                  f"trainer.max_epochs {', '.join(str(int(e)) for e in epochs) or '?'} (epochs per fine-tuning stage).")
    md += [f"- Hardware: {h} ({n} runs)" for h, n in hardware.items()]
    md += [f"- Total wall time: {wall:.0f} s ({wall / 60:.1f} min) summed over the runs "
           f"(a pruning stage reused from the cache counts only its load time).",
           "- Each cell: ours | seed | Δ = ours − seed, in percentage points for accuracies and sparsity "
           "(absolute for losses; section 4 in points / percent). Tables are split by model and budget; where several runs "
           "(e.g. seeds) fill one cell, ours is their mean and (n=…) their count. \"missing\": the run that fills the "
           "cell is missing or incomplete (see below) or has no such number. The runs column names the run dirs of the row.",
           "- Seed numbers: `compress/seed_results.yaml`, for ResNet-20 only (the seed's model; other models show — "
           "in the seed and Δ columns). Seed section 4 prints relative drops (Δ/baseline); "
           "its drop in points is computed from its Table 3.1.",
           "- Table 3.1 \"Acc at FT start\": the model as fine-tuning begins. One-shot prunes to 80% first; "
           "iterative and global ramp the sparsity up during fine-tuning, so they start from the dense model.", ""]

    csv_rows: list[list[Any]] = []
    for sec in sections:
        md += [f"## {heading(sec)}", ""]
        for tid in TABLES:
            if any(k[:2] == (sec, tid) for k in cells):
                md += table_md(sec, tid, cells, csv_rows)

    md += ["## Missing or incomplete runs", ""]
    md += [f"- `{rel}`: {why}" + (f" (would be {label(j)}, {j.section.label})" if j else "")
           for rel, why, j in missing] or ["None."]

    size_keys = ("fp32_bytes", "compressed_bytes", "ratio", "bits_per_weight")
    sized = any(isinstance(m.get("size"), dict) for _, m, _ in runs)
    models = any(not job.section.seeded for *_, job in runs)  # a model column once there is more than ResNet-20
    md += ["", "## Runs", "",
           "| run | budget |" + (" model |" if models else "")
           + " prune | quant | nbits | stages (epochs) | tables | test acc | wall s |"
           + ("".join(f" {k} |" for k in size_keys) if sized else ""),
           "|" + "---|" * (9 + models + 4 * sized)]
    for rel, m, job in runs:
        stages = " + ".join(f"{s.get('name')} {s.get('epochs')}" + (" (cached)" if s.get("cached") else "")
                            for s in m.get("stages") or [])
        tables = ", ".join(sorted({t for t, *_ in slots(job)})) or "none"
        size = m.get("size") if isinstance(m.get("size"), dict) else {}
        md.append(f"| `{rel}` | {job.budget} |" + (f" {job.model} |" if models else "")
                  + f" {job.prune} | {job.quant} | {job.nbits if job.nbits is not None else '—'} | "
                  f"{stages or '—'} | {tables} | {fmt(dig(m, ('test_acc',)), 'acc')} | {m.get('wall_time_s') or 0:.0f} |"
                  + ("".join(f" {size_text(size.get(k))} |" for k in size_keys) if sized else ""))
        csv_rows += [[job.budget, job.model, "size", rel, k, size[k], 1, None, None, "", rel] for k in size_keys if k in size]

    md += ["", "## Figures", ""]
    for sec in sections:
        made = figures(sec, cells, runs, out)
        if made is None:
            md.append("Figures skipped: matplotlib is not installed (`pip install -e .[report]`).")
            break
        md += [f"![{name}]({name})\n\n*{cap}*\n" for name, cap in made] or [f"No figure data for {sec.label}."]

    (out / "report.md").write_text("\n".join(md) + "\n")
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget", "model", "table", "row", "column", "ours", "n", "seed", "diff", "diff_unit", "runs"])
        w.writerows([[("" if v is None else round(v, 6) if isinstance(v, float) else v) for v in r] for r in csv_rows])
    return out / "report.md"


class ReportCallback(Callback):
    """Hydra callback writing the report into the sweep dir when a multirun ends; never raises.

    Hydra skips ``on_multirun_end`` when a job failed (the sweeper re-raises the job's error
    first), so ``on_multirun_start`` also registers the report to be written at exit: a sweep
    with failed jobs still gets its report, listing them as missing, before Hydra exits 1. A
    sweep that launched no job (its command line did not compose) gets none, and the sweep dir
    Hydra made for it, holding only ``multirun.yaml``, is removed.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.register(self.on_multirun_end, config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self.on_multirun_end)
        try:
            sweep = Path(config.hydra.sweep.dir)
            if not any(sweep.glob("*/.hydra")):  # no job started
                if sweep.is_dir() and {p.name for p in sweep.iterdir()} <= {"multirun.yaml"}:
                    shutil.rmtree(sweep)
                return
            log.info("report written to %s", write_report([sweep], sweep))
        except Exception as e:  # noqa: BLE001 - a report must not fail the sweep
            log.warning("could not write the report: %s: %s", type(e).__name__, e)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m compress.report <dir> [<dir>...] [-o outdir]``; exit 2 on a bad dir."""
    p = argparse.ArgumentParser(prog="python -m compress.report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="multirun dirs to walk for run dirs")
    p.add_argument("-o", "--out", type=Path, help="output dir (default: the first dir)")
    a = p.parse_args(argv)
    try:
        path = write_report(a.dirs, a.out or a.dirs[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
