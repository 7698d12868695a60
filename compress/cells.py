"""Where a run's numbers go: the seed's tables, and the section and cell of each run.

A run (its ``metrics.json``, or for an unfinished one its ``.hydra/config.yaml``) is a
:class:`Job`; its :class:`Section` (model, budget, setting, recipe) keeps tables from mixing two
settings, and :func:`slots` names the cells of the seed's Tables 3.1-3.4 it fills.
:func:`find_runs` walks dirs for runs and :func:`gather` collects the cells; the report and the
frontier read them.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any, NamedTuple

import yaml
from omegaconf import OmegaConf

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
    if distill.get("kind", "none") != "none":
        teacher = distill.get("teacher")
        parts += [f"distill {distill['kind']}" + (f" from {teacher}" if teacher else "")]
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
    if not isinstance(c["prune"], str) or not isinstance(c["quant"], str):  # labels of any method
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


def label(job: Job) -> str:
    """A short name for a run: ``global+asym4``, ``oneshot``, ``FP``, ``sym3 (no FT)``."""
    parts = ([job.prune] if job.prune != "none" else []) + ([f"{job.quant}{job.nbits}"] if job.quant != "none" else [])
    return ("+".join(parts) or "FP") + ("" if job.ft else " (no FT)")


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


def seed_numbers(section: Section, tid: str) -> dict[Any, dict[str, float]]:
    """The seed's numbers of table ``tid`` by row, for ResNet-20 sections only."""
    return SEED.get(tid, {}) if section.seeded else {}
