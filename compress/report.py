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
import json
import logging
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any, NamedTuple

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SEED = yaml.safe_load((Path(__file__).parent / "seed_results.yaml").read_text())
METHODS = ("oneshot", "iterative", "global")
NBITS = (6, 5, 4, 3, 2)
# Columns holding fractions (accuracy, sparsity): their diff is in percentage points.
FRACTIONS = {"acc", "acc_before", "acc_after", "asym", "sym", "sparsity"}

# table id: (title, row header, rows [(key, label)], columns [(key, label)]); keys match seed_results.yaml.
TABLES: dict[str, tuple[str, str, list[tuple[Any, str]], list[tuple[str, str]]]] = {
    "3.1": ("Table 3.1: pruning to 80% + fine-tuning", "Method", [
        ("baseline", "FP baseline (pretrained)"), ("control", "FP fine-tuned, no pruning (control)"),
        ("oneshot", "One-shot pruning + FT"), ("iterative", "Iterative pruning + FT"),
        ("global", "Global iterative pruning + FT")],
        [("acc", "Test acc"), ("loss", "Test loss"), ("acc_before", "Acc at FT start"), ("sparsity", "Sparsity")]),
    "3.2": ("Table 3.2: quantization without fine-tuning", "Nbits", [(n, str(n)) for n in NBITS],
            [("asym", "Asymmetric acc"), ("sym", "Symmetric acc")]),
    "3.3": ("Table 3.3: asymmetric quantization with fine-tuning", "Nbits", [(n, str(n)) for n in NBITS[1:]],
            [("acc_after", "Acc after FT")]),
    "3.4": ("Table 3.4: asymmetric quantization of the global-pruned model", "Nbits", [(n, str(n)) for n in NBITS[1:]],
            [("acc_before", "Acc before FT"), ("acc_after", "Acc after FT")]),
    "4": ("Section 4: performance vs FP baseline (from Table 3.1)", "Method",
          [("oneshot", "One-shot"), ("iterative", "Iterative"), ("global", "Global iterative")],
          [("pts", "Δ acc (points)"), ("rel_pct", "Δ acc (relative %)")]),
}
# The seed prints section 4 as relative drops; its drop in points follows from its Table 3.1.
for method in METHODS:
    SEED["4"][method]["pts"] = round((SEED["3.1"][method]["acc"] - SEED["3.1"]["baseline"]["acc"]) * 100, 2)
UNITS = {"loss": "absolute", "rel_pct": "percent"}  # of a diff; "points" otherwise
# Types of the optional metrics.json fields the report reads (checked so a hand-edited file cannot crash it).
OPTIONAL = {"config": dict, "hardware": dict, "size": dict, "sparsity": dict, "stages": list, "wall_time_s": (int, float)}


DEFAULT_MODEL = "resnet20"  # the seed's model, and that of runs from before the model family


class Section(NamedTuple):
    """One model at one budget in one setting: tables and figures never mix two."""

    model: str
    budget: str
    variant: str = ""  # a setting the seed's tables do not have (see :func:`variant_of`); "" if none
    recipe: str = ""  # how the seed's setting was trained, where not as the seed (see :func:`recipe_of`)

    @property
    def name(self) -> str:
        """The model as it is printed: ``ResNet-56``."""
        return f"ResNet-{self.model.removeprefix('resnet')}"

    @property
    def label(self) -> str:
        """``budget `full``` for ResNet-20 (as before the family existed), else ``ResNet-56, budget `full```;
        a variant follows: ``budget `smoke`, activations 4-bit``."""
        base = f"budget `{self.budget}`" if self.model == DEFAULT_MODEL else f"{self.name}, budget `{self.budget}`"
        return ", ".join([base, *(x for x in (self.variant, self.recipe) if x)])

    @property
    def tag(self) -> str:
        """File-name part of its figures: ``full``, ``resnet56_full``, ``smoke_activations_4-bit``."""
        parts = [*([] if self.model == DEFAULT_MODEL else [self.model]), self.budget, *(x for x in (self.variant, self.recipe) if x)]
        return re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(parts))

    @property
    def seeded(self) -> bool:
        """Whether the seed report has numbers for it (ResNet-20 in the seed's settings only)."""
        return self.model == DEFAULT_MODEL and not self.variant


def recipe_of(config: dict | None) -> str:
    """How a run trained or quantized differently from the seed's recipe, as a label ("" for
    the seed's): range clipping, BatchNorm re-estimation, per-channel ranges, LSQ,
    distillation. Such runs still fill the seed's cells (beside the seed's numbers), in a
    section of their own, so two recipes are never averaged into one cell."""
    c = config or {}
    quant, distill = c.get("quant") or {}, c.get("distill") or {}
    parts = []
    if quant.get("mode", "none") != "none":
        parts += [f"{quant['clip']} clip"] if quant.get("clip", "minmax") != "minmax" else []
        parts += [f"BN re-estimation {quant['bn_recalibration']}"] if quant.get("bn_recalibration") else []
        parts += ["per-channel"] if quant.get("granularity", "tensor") != "tensor" else []
        parts += ["LSQ"] if quant.get("learn_range") else []
    parts += [f"distill {distill['kind']}"] if distill.get("kind", "none") != "none" else []
    return f"recipe: {' + '.join(parts)}" if parts else ""


def variant_of(config: dict | None) -> str:
    """What in a run's resolved config makes it a setting the seed's tables do not have, as a
    label ("" for none): quantized activations, per-layer widths or sparsities, a sparsity
    other than 80%, a test split other than all. Recipes (clipping, BatchNorm re-estimation,
    per-channel ranges, LSQ, distillation) fill the seed's cells and are not variants."""
    c = config or {}
    quant, prune = c.get("quant") or {}, c.get("prune") or {}
    parts = []
    if quant.get("mode", "none") != "none" and quant.get("abits"):
        parts.append(f"activations {quant['abits']}-bit")
    if quant.get("mode", "none") != "none" and quant.get("layer_nbits"):
        parts.append("per-layer bit widths")
    if prune.get("method", "none") != "none" and prune.get("layer_sparsity"):
        parts.append("per-layer sparsity")
    if prune.get("method", "none") != "none" and prune.get("sparsity", 0.8) != 0.8:
        parts.append(f"sparsity {prune['sparsity']:g}")
    split = (c.get("data") or {}).get("test_split", "all")
    if split != "all":
        parts.append(f"test split {split}")
    return ", ".join(parts)


class Job(NamedTuple):
    """What a run is, as far as the tables care."""

    budget: str
    prune: str
    quant: str
    nbits: int | None
    ft: bool  # whether its last stage fine-tunes (after_ft exists)
    model: str = DEFAULT_MODEL
    variant: str = ""
    recipe: str = ""

    @property
    def section(self) -> Section:
        return Section(self.model, self.budget, self.variant, self.recipe)


@dataclass
class Cell:
    """The values one table cell gathers and the run dirs they came from."""

    values: list[float] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)


Key = tuple[Section, str, Any, str]  # (section, table, row, column)


def slots(job: Job) -> list[tuple[str, Any, str, tuple[str, ...]]]:
    """The (table, row, column, metrics.json path) cells a run fills."""
    if job.prune == "none" and job.quant == "none":
        out = [("3.1", "baseline", "acc", ("before_ft", "acc")), ("3.1", "baseline", "loss", ("before_ft", "loss"))]
        return out + ([("3.1", "control", c, ("after_ft", c)) for c in ("acc", "loss")] if job.ft else [])
    if job.prune in METHODS and job.quant == "none":
        return [("3.1", job.prune, "acc", ("after_ft", "acc")), ("3.1", job.prune, "loss", ("after_ft", "loss")),
                ("3.1", job.prune, "acc_before", ("before_ft", "acc")), ("3.1", job.prune, "sparsity", ("sparsity", "overall"))]
    if job.prune == "none" and job.quant in ("sym", "asym") and not job.ft:
        return [("3.2", job.nbits, job.quant, ("before_ft", "acc"))]
    if job.prune == "none" and job.quant == "asym":
        return [("3.3", job.nbits, "acc_after", ("after_ft", "acc"))]
    if job.prune == "global" and job.quant == "asym":
        return [("3.4", job.nbits, "acc_before", ("before_ft", "acc")), ("3.4", job.nbits, "acc_after", ("after_ft", "acc"))]
    return []


def dig(d: Any, path: tuple[str, ...]) -> float | None:
    """The number at ``path`` in nested dicts, or None."""
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def dig_dict(d: Any, *path: str) -> dict[str, float]:
    """The numeric entries of the dict at ``path`` in nested dicts ({} if there is none)."""
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
    return {k: v for k, v in d.items() if dig(v, ()) is not None} if isinstance(d, dict) else {}


def job_of_metrics(m: Any) -> Job:
    """The Job of a metrics.json; raises ValueError/KeyError/TypeError when it is not a valid one."""
    if not isinstance(m, dict):
        raise ValueError("not a JSON object")
    c = m["choices"]
    if c["prune"] not in ("none", *METHODS) or c["quant"] not in ("none", "sym", "asym"):
        raise ValueError(f"unknown choices {c}")
    if c["quant"] != "none" and not isinstance(c["nbits"], int):
        raise ValueError(f"quant={c['quant']} without an integer nbits")
    if dig(m, ("before_ft", "acc")) is None or (m["after_ft"] is not None and dig(m, ("after_ft", "acc")) is None):
        raise ValueError("no before_ft/after_ft accuracy")
    for k, t in OPTIONAL.items():
        if m.get(k) is not None and not isinstance(m[k], t):
            raise TypeError(f"{k} has the wrong type")
    if not all(isinstance(s, dict) and isinstance(s.get("history") or [], list) for s in m.get("stages") or []):
        raise TypeError("stages must be objects with a history list")
    budget = str((m.get("config") or {}).get("budget_name", "?"))
    return Job(budget, c["prune"], c["quant"], c.get("nbits"), m["after_ft"] is not None, str(c.get("model", DEFAULT_MODEL)),
               variant_of(m.get("config")), recipe_of(m.get("config")))


def job_of_config(path: Path) -> Job | None:
    """The Job a run dir's ``.hydra/config.yaml`` asked for, or None if unreadable."""
    try:
        cfg = OmegaConf.load(path)
        prune, quant = cfg.prune.method, cfg.quant.mode
        epochs = cfg.quant.epochs if quant != "none" else cfg.prune.epochs if prune != "none" else cfg.trainer.max_epochs
        return Job(str(OmegaConf.select(cfg, "budget_name", default="?")), prune, quant,
                   cfg.nbits if quant != "none" else None, epochs > 0, str(OmegaConf.select(cfg, "model.name", default=DEFAULT_MODEL)),
                   *(f({k: OmegaConf.to_container(cfg[k]) for k in ("quant", "prune", "data", "distill") if k in cfg})
                     for f in (variant_of, recipe_of)))
    except Exception:  # noqa: BLE001 - a broken config only costs the cell mapping
        return None


def find_runs(dirs: list[Path]) -> tuple[Path, list[tuple[str, dict, Job]], list[tuple[str, str, Job | None]]]:
    """Walk ``dirs``: (common root, valid runs (rel path, metrics, job), missing runs (rel path, reason, job))."""
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"not a directory: {d}")
    roots = [d.resolve() for d in dirs]
    common = Path(os.path.commonpath(roots))
    runs, missing, seen = [], [], set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))  # skips .hydra, .stages
            here = Path(dirpath)
            if here in seen or not ("metrics.json" in filenames or (here / ".hydra" / "config.yaml").is_file()):
                continue
            seen.add(here)
            rel = here.relative_to(common).as_posix()
            if "metrics.json" not in filenames:
                missing.append((rel, "unfinished: .hydra/ but no metrics.json", job_of_config(here / ".hydra" / "config.yaml")))
                continue
            try:
                m = json.loads((here / "metrics.json").read_text())
                runs.append((rel, m, job_of_metrics(m)))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                why = f"unreadable or invalid metrics.json ({type(e).__name__}: {e})"
                missing.append((rel, why, job_of_config(here / ".hydra" / "config.yaml")))
    return common, runs, missing


def gather(runs: list[tuple[str, dict, Job]], missing: list[tuple[str, str, Job | None]]) -> dict[Key, Cell]:
    """Every table cell the runs fill (missing runs add their path but no value), plus section 4."""
    cells: dict[Key, Cell] = defaultdict(Cell)
    for rel, m, job in runs + [(rel, {}, job) for rel, _, job in missing if job]:
        for table, row, col, path in slots(job):
            cell = cells[(job.section, table, row, col)]
            cell.runs.append(rel)
            if (v := dig(m, path)) is not None:
                cell.values.append(v)
    for section in {k[0] for k in cells}:
        base = cells.get((section, "3.1", "baseline", "acc"))
        for method in METHODS:
            ours = cells.get((section, "3.1", method, "acc"))
            if ours is None:
                continue
            cell_runs = (base.runs if base else []) + ours.runs
            pts = (mean(ours.values) - mean(base.values)) * 100 if base and base.values and ours.values else None
            cells[(section, "4", method, "pts")] = Cell([pts] if pts is not None else [], cell_runs)
            cells[(section, "4", method, "rel_pct")] = Cell([pts / mean(base.values)] if pts is not None else [], cell_runs)
    return dict(cells)


def fmt(v: float | None, col: str) -> str:
    """A value as the seed prints it (4 decimals; points with 2)."""
    return "—" if v is None else f"{v:.2f}" if col in ("pts", "rel_pct") else f"{v:.4f}"


def compare(cell: Cell | None, seed: float | None, col: str) -> tuple[float | None, float | None]:
    """(ours: mean of the cell, diff: ours - seed, in points for fractions)."""
    ours = mean(cell.values) if cell and cell.values else None
    if ours is None or seed is None:
        return ours, None
    return ours, (ours - seed) * 100 if col in FRACTIONS else ours - seed


def seed_numbers(section: Section, tid: str) -> dict[Any, dict[str, float]]:
    """The seed's numbers of table ``tid`` by row, for ResNet-20 sections only."""
    return SEED.get(tid, {}) if section.seeded else {}


def table_md(section: Section, tid: str, cells: dict[Key, Cell], csv_rows: list[list[Any]]) -> list[str]:
    """Markdown lines of one table for one section (and its CSV rows appended to ``csv_rows``)."""
    title, head, rows, cols = TABLES[tid]
    if head == "Nbits":  # the seed's bit widths and any other our runs have
        bits = {r for r, _ in rows} | {k[2] for k in cells if k[:2] == (section, tid)}
        rows = [(n, str(n)) for n in sorted(bits, reverse=True)]
    lines = [f"### {title} — {section.label}", "",
             "| " + " | ".join([head, *(f"{name} {w}" for _, name in cols for w in ("ours", "seed", "Δ")), "runs"]) + " |",
             "|" + "---|" * (2 + 3 * len(cols))]
    for row, label in rows:
        seed_row = seed_numbers(section, tid).get(row, {})
        row_cells = [cells.get((section, tid, row, col)) for col, _ in cols]
        if not seed_row and not any(row_cells):
            continue
        parts, row_runs = [label], []
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


def label(job: Job) -> str:
    """A short name for a run: ``global+asym4``, ``oneshot``, ``FP``, ``sym3 (no FT)``."""
    parts = ([job.prune] if job.prune != "none" else []) + ([f"{job.quant}{job.nbits}"] if job.quant != "none" else [])
    return ("+".join(parts) or "FP") + ("" if job.ft else " (no FT)")


def fig_nbits(Figure: type, section: Section, cells: dict[Key, Cell]) -> tuple[Any, str] | None:
    """(a) Test accuracy vs nbits for every quantization series with data; the seed dashed beside ours (ResNet-20)."""
    fig = Figure(figsize=(7.5, 4.5))
    ax, drawn = fig.subplots(), []
    series = [("3.2", "asym", "asym, no FT"), ("3.2", "sym", "sym, no FT"), ("3.3", "acc_after", "asym + FT"),
              ("3.4", "acc_before", "global-pruned + asym, before FT"), ("3.4", "acc_after", "global-pruned + asym, after FT")]
    for i, (tid, col, name) in enumerate(series):
        ours = sorted((k[2], mean(c.values)) for k, c in cells.items() if k[:2] == (section, tid) and k[3] == col and c.values)
        if ours:
            ax.plot(*zip(*ours), "o-", color=f"C{i}", label=name)
            seed = seed_numbers(section, tid)
            if seed:
                ax.plot(*zip(*[(n, seed[n][col]) for n in sorted(seed)]), "x--", color=f"C{i}", alpha=0.5)
            drawn.append(name)
    if not drawn:
        return None
    base = cells.get((section, "3.1", "baseline", "acc"))
    if base and base.values:
        ax.axhline(mean(base.values), color="k", ls=":", label="FP baseline (ours)")
        drawn.append("dotted line: our FP baseline")
    if section.seeded:
        ax.plot([], [], "x--", color="gray", label="seed report (dashed)")
    ax.set(xlabel="nbits (bit width of the quantized block convs)", ylabel="test accuracy", ylim=(0, 1),
           title=f"{section.name}: accuracy vs bit width ({section.budget})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    seed = " Solid: ours; dashed, same colour: the seed's published numbers." if section.seeded else ""
    return fig, f"{section.name} test accuracy vs nbits, budget `{section.budget}`: {'; '.join(drawn)}.{seed}"


def fig_sparsity(Figure: type, section: Section, runs: list[tuple[str, dict, Job]]) -> tuple[Any, str] | None:
    """(b) Per-layer sparsity of the Table 3.1 pruned models, grouped bars per layer (mean over a method's runs)."""
    by_method: dict[str, list[dict[str, float]]] = defaultdict(list)
    for _, m, job in runs:
        layers = dig_dict(m, "sparsity", "layers")
        if job.section == section and job.prune in METHODS and job.quant == "none" and layers:
            by_method[job.prune].append(layers)
    if not by_method:
        return None
    methods = [k for k in METHODS if k in by_method]
    layers = list(dict.fromkeys(n for k in methods for d in by_method[k] for n in d))
    fig = Figure(figsize=(max(7.0, 0.45 * len(layers)), 4.5))
    ax, w = fig.subplots(), 0.8 / len(methods)
    for i, k in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * w for j in range(len(layers))]
        ax.bar(xs, [mean(d.get(n, 0.0) for d in by_method[k]) for n in layers], w, label=k, color=f"C{i}")
    ax.axhline(SEED["3.1"]["global"]["sparsity"], color="k", ls="--", lw=1, label="80% target")
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=7)
    ax.set(xlabel="layer", ylabel="fraction of weights that are zero", ylim=(0, 1),
           title=f"{section.name}: per-layer sparsity ({section.budget})")
    ax.legend(fontsize=8)
    return fig, (f"Per-layer sparsity (fraction of exactly-zero weights) of the pruned, fine-tuned Table 3.1 models, "
                 f"{section.name}, budget `{section.budget}`: {', '.join(methods)}; dashed: the 80% overall target.")


def fig_history(Figure: type, section: Section, runs: list[tuple[str, dict, Job]]) -> tuple[Any, str] | None:
    """(c) Validation accuracy per epoch from ``stages[].history``, epochs counted across stages, one line per run."""
    curves = []
    for rel, m, job in runs:
        xs, ys, done = [], [], 0
        for stage in m.get("stages") or []:
            for h in stage.get("history") or []:
                if (y := dig(h, ("val/acc",))) is not None and (x := dig(h, ("epoch",))) is not None:
                    xs.append(done + x)
                    ys.append(y)
            done += dig(stage, ("epochs",)) or 0
        if job.section == section and xs:
            curves.append((label(job), rel, xs, ys))
    if not curves:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax, names = fig.subplots(), [c[0] for c in curves]
    for i, (name, rel, xs, ys) in enumerate(curves):
        ax.plot(xs, ys, marker=".", color=f"C{i % 10}", ls="-" if i < 10 else "--",
                label=name if names.count(name) == 1 else rel)
    ax.set(xlabel="epoch (counted across stages: pruning, then quantization)", ylabel="validation accuracy",
           title=f"{section.name}: validation accuracy during fine-tuning ({section.budget})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig, (f"Validation accuracy after every training epoch (pruning ramp and fine-tuning, then quantization-aware "
                 f"fine-tuning; epochs counted across a run's stages), one line per run, {section.name}, budget `{section.budget}`.")


def figures(section: Section, cells: dict[Key, Cell], runs: list[tuple[str, dict, Job]], out: Path) -> list[tuple[str, str]] | None:
    """Draw this section's figures into ``out``: [(file name, caption)], or None without matplotlib."""
    try:
        from matplotlib.figure import Figure  # lazy: the report works without matplotlib
    except ImportError:
        return None
    made = []
    for stem, drawn in (("acc_vs_nbits", fig_nbits(Figure, section, cells)),
                        ("sparsity_per_layer", fig_sparsity(Figure, section, runs)),
                        ("val_acc_per_epoch", fig_history(Figure, section, runs))):
        if drawn:
            name = f"{stem}_{section.tag}.png"
            drawn[0].savefig(out / name, dpi=110, bbox_inches="tight")
            made.append((name, drawn[1]))
    return made


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
    with failed jobs still gets its report, listing them as missing, before Hydra exits 1.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.register(self.on_multirun_end, config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self.on_multirun_end)
        try:
            sweep = Path(config.hydra.sweep.dir)
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
