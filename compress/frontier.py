"""The accuracy-vs-size frontier of a multi-objective search, and how it compares with the seed.

``python -m compress.train hparams_search=frontier`` (the ``search`` extra: Hydra's Optuna
sweeper) runs trials that each return ``(test accuracy, model.cpk bytes)`` on the *search*
half of the test set (``data.test_split=search``); when the search ends, :class:`FrontierCallback`
writes its front into the sweep dir. ``python -m compress.frontier SWEEP_DIR [-o OUT]`` writes it
again (``-o``: elsewhere, with copies of the trials' ``metrics.json``, ``.hydra/`` and ``model.cpk``).

The front is chosen on the search half only: the non-dominated trials (higher accuracy, fewer
bytes). Each front model is then rebuilt from its ``model.cpk`` and evaluated on the other
half, the *report* half, which no trial looked at; that is the accuracy the front is reported
and compared with. The seed's points are its Table 3.2-3.4 accuracies (all 10,000 test
images) at the bytes of our artifact of the same configuration (the seed reports no sizes),
taken from our published runs; our published runs are drawn at their own accuracy and bytes.

Writes ``front.csv`` (the front), ``trials.csv`` (every trial), ``front.png`` (accuracy vs bytes)
and ``report.md`` (which seed points the front dominates and which it does not).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from compress.checkpoint import atomic_write
from compress.data import default_root, load_split, normalize, split_mask
from compress.export import load
from compress.progress import duration
from compress.cells import SEED, find_runs, slots

log = logging.getLogger(__name__)

PUBLISHED = ("multirun/published/full", "multirun/published/smoke")  # the faithful tables, best budget first
REPORT_IMAGES = 5000  # the report half of the CIFAR-10 test set
SEARCH_FILE = "search.json"  # the search's command, commit and wall time, written by FrontierCallback
SEED_CELLS = [("3.2", n, q, f"3.2 {q}{n}, no FT") for n in (6, 5, 4, 3, 2) for q in ("asym", "sym")] + \
    [("3.3", n, "acc_after", f"3.3 asym{n} + FT") for n in (5, 4, 3, 2)] + \
    [("3.4", n, c, f"3.4 global 80% + asym{n}, {'before' if c == 'acc_before' else 'after'} FT")
     for n in (5, 4, 3, 2) for c in ("acc_before", "acc_after")]


@dataclass
class Trial:
    """One finished trial: its run dir (relative to the sweep), what it chose, and its objectives."""

    run: str
    sparsity: float | None
    quant: str
    nbits: int | None
    layer_nbits: str  # the layers with their own width, ``name:bits`` joined by spaces ("" for none)
    acc_search: float
    compressed_bytes: int
    bits_per_weight: float
    wall_s: float
    acc_report: float | None = None


@dataclass
class SeedPoint:
    """A seed table cell at the bytes of our artifact of the same configuration."""

    name: str
    acc: float
    compressed_bytes: int
    bytes_from: str  # the published run whose model.cpk gives the size


def trials(sweep: Path) -> list[Trial]:
    """The finished trials under ``sweep``; ``ValueError`` if one selected on anything but the
    search half (its objectives would have looked at the report half)."""
    out = []
    for metrics in sorted(sweep.glob("*/metrics.json")):
        m = json.loads(metrics.read_text())
        split = m["config"]["data"].get("test_split", "all")
        if split != "search":
            raise ValueError(f"{metrics}: tested on data.test_split={split!r}; a frontier search selects on 'search' only")
        c, own = m["choices"], {k: v for k, v in (m.get("layer_nbits") or {}).items() if v != m["choices"]["nbits"]}
        prune = m["config"]["prune"]
        out.append(Trial(metrics.parent.name, prune.get("sparsity") if prune["method"] != "none" else None, c["quant"],
                         c["nbits"], " ".join(f"{k}:{v}" for k, v in own.items()), m["test_acc"], m["compressed_bytes"],
                         m["bits_per_weight"], m["wall_time_s"]))
    return out


def dominates(acc: float, size: int, other_acc: float, other_size: int) -> bool:
    """Whether ``(acc, size)`` is at least as accurate and as small as the other, and better in one."""
    return acc >= other_acc and size <= other_size and (acc > other_acc or size < other_size)


def pareto(found: Sequence[Trial]) -> list[Trial]:
    """The trials no other trial dominates on the search half, smallest first (one per point)."""
    front = [t for t in found if not any(dominates(o.acc_search, o.compressed_bytes, t.acc_search, t.compressed_bytes)
                                         for o in found)]
    unique = {(t.acc_search, t.compressed_bytes): t for t in sorted(front, key=lambda t: t.run, reverse=True)}
    return sorted(unique.values(), key=lambda t: (t.compressed_bytes, -t.acc_search))


@torch.inference_mode()
def report_accuracy(run: Path, images: torch.Tensor, labels: torch.Tensor, batch: int = 200) -> float:
    """Accuracy of the model rebuilt from ``run/model.cpk`` on the report half of ``images``
    (all 10,000 test images in file order), fp32, normalized as for training."""
    keep = split_mask(len(labels), "report")
    x, y = images[keep], labels[keep]
    model = load(run / "model.cpk").float()
    right = sum(int((model(normalize(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return right / len(y)


def published_runs(dirs: Sequence[Path]) -> list[tuple[str, dict, Any]]:
    """ResNet-20 runs with a size under ``dirs`` (in that order): ``(dir name/run, metrics, job)``."""
    out = []
    for d in dirs:
        if d.is_dir():
            _, runs, _ = find_runs([d])
            out += [(f"{d.name}/{rel}", m, job) for rel, m, job in runs
                    if job.model == "resnet20" and isinstance(m.get("compressed_bytes"), int)]
    return out


def seed_points(runs: Sequence[tuple[str, dict, Any]]) -> list[SeedPoint]:
    """The seed's Table 3.2-3.4 accuracies, each at the bytes of the first of ``runs`` (best
    budget first) that fills the same cell; cells no run fills are left out."""
    out = []
    for tid, row, col, name in SEED_CELLS:
        run = next(((rel, m) for rel, m, job in runs if any(s[:3] == (tid, row, col) for s in slots(job))), None)
        if run:
            out.append(SeedPoint(name, SEED[tid][row][col], run[1]["compressed_bytes"], run[0]))
    return out


def best_within(front: Sequence[Trial], size: int) -> Trial | None:
    """The front point with the highest report-half accuracy among those of at most ``size`` bytes."""
    small = [t for t in front if t.compressed_bytes <= size and t.acc_report is not None]
    return max(small, key=lambda t: (t.acc_report, -t.compressed_bytes), default=None)


def standard_error(acc: float, images: int) -> float:
    """The standard error of an accuracy ``acc`` measured on ``images`` test images."""
    return (acc * (1 - acc) / images) ** 0.5


def dominance_table(front: Sequence[Trial], seeds: Sequence[SeedPoint]) -> list[str]:
    """Markdown lines: for each seed point, whether a front point (report half) dominates it
    (and whether the accuracy difference is below two standard errors of the report half)."""
    lines = ["| seed point | seed acc | bytes (ours, same config) | dominated by the front? | best front point at ≤ these bytes "
             "(report half) | Δ acc (points) |", "|---|---|---|---|---|---|"]
    for p in seeds:
        best = best_within(front, p.compressed_bytes)
        if best is None:
            verdict, where, delta = "no: no front point is this small", "—", "—"
        else:
            yes = dominates(best.acc_report, best.compressed_bytes, p.acc, p.compressed_bytes)
            noise = abs(best.acc_report - p.acc) < 2 * standard_error(p.acc, REPORT_IMAGES)
            verdict = ("**yes**" if yes else "no") + (" (Δ within noise)" if noise else "")
            where = f"`{best.run}`: {best.acc_report:.4f}, {best.compressed_bytes:,} B"
            delta = f"{(best.acc_report - p.acc) * 100:+.2f}"
        lines.append(f"| {p.name} | {p.acc:.4f} | {p.compressed_bytes:,} (`{p.bytes_from}`) | {verdict} | {where} | {delta} |")
    return lines


def figure(found: Sequence[Trial], front: Sequence[Trial], seeds: Sequence[SeedPoint],
           published: Sequence[tuple[str, dict, Any]], path: Path) -> bool:
    """Accuracy vs bytes (log) in two panels (all, and accuracy >= 0.8); False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(13, 5.2))
    for ax, low in zip(fig.subplots(1, 2), (0.0, 0.8)):
        ax.scatter([t.compressed_bytes for t in found], [t.acc_search for t in found], s=14, color="0.6",
                   label="trials (search half)")
        ax.plot([t.compressed_bytes for t in front], [t.acc_search for t in front], "o--", mfc="none", color="C0",
                label="front, search half (selection)")
        ax.plot([t.compressed_bytes for t in front], [t.acc_report for t in front], "o-", color="C0",
                label="front, report half (reported)")
        for d, color in zip(dict.fromkeys(rel.split("/")[0] for rel, _, _ in published), ("C2", "C1", "C4", "C5", "C6")):
            pts = [(m["compressed_bytes"], m["test_acc"]) for rel, m, _ in published if rel.split("/")[0] == d]
            ax.scatter(*zip(*pts), marker="^", s=20, color=color, alpha=0.6, label=f"our published runs ({d})")
        for table, marker in (("3.2", "x"), ("3.3", "+"), ("3.4", "D")):
            pts = [(p.compressed_bytes, p.acc) for p in seeds if p.name.startswith(table)]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=30 if marker != "D" else 14, color="C3",
                           facecolors="none" if marker == "D" else None, label=f"seed Table {table} (at our bytes)")
        ax.set_xscale("log")
        ax.set(xlabel="model.cpk bytes (log scale)", ylabel="test accuracy", ylim=(low, 0.95 if low else 1.0),
               title="all points" if not low else "accuracy ≥ 0.8")
        ax.grid(alpha=0.3, which="both")
    fig.axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("ResNet-20 / CIFAR-10: accuracy vs stored size; the front is selected on the search half, "
                 "reported on the report half", fontsize=10)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    return True


def _csv(rows: Sequence[Trial]) -> bytes:
    text = io.StringIO()
    w = csv.DictWriter(text, list(asdict(rows[0])) if rows else ["run"], lineterminator="\n")
    w.writeheader()
    w.writerows(asdict(t) for t in rows)
    return text.getvalue().encode()


def write_front(sweep: Path, out: Path, data_root: Path, published: Sequence[Path] = tuple(map(Path, PUBLISHED)),
                notes: Sequence[str] = ()) -> Path:
    """Write the front of the trials under ``sweep`` into ``out`` (see the module docstring);
    returns ``report.md``. ``out`` other than ``sweep`` also gets copies of the trials in ``out/runs``."""
    found = trials(sweep)
    if not found:
        raise FileNotFoundError(f"{sweep}: no finished trial (a run dir with metrics.json)")
    front = pareto(found)
    images, labels = load_split(data_root, train=False)
    for t in front:
        t.acc_report = round(report_accuracy(sweep / t.run, images, labels), 6)
    runs = published_runs(published)
    seeds = seed_points(runs)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != sweep.resolve():
        from compress.reproduce import restore  # copies finished run dirs (metrics.json, .hydra/, model.cpk)
        shutil.rmtree(out / "runs", ignore_errors=True)
        restore(sweep, out / "runs")
        for name in (SEARCH_FILE, "optimization_results.yaml"):  # what the sweeper itself recorded
            if (sweep / name).is_file():
                shutil.copy2(sweep / name, out / name)
    atomic_write(out / "front.csv", lambda f: f.write(_csv(front)))
    atomic_write(out / "trials.csv", lambda f: f.write(_csv(found)))
    drew = figure(found, front, seeds, runs, out / "front.png")

    search = json.loads((sweep / SEARCH_FILE).read_text()) if (sweep / SEARCH_FILE).is_file() else {}
    cfg = json.loads((sweep / found[0].run / "metrics.json").read_text())["config"]
    walls = sorted(t.wall_s for t in found)
    dominated = [p for p in seeds if (b := best_within(front, p.compressed_bytes))
                 and dominates(b.acc_report, b.compressed_bytes, p.acc, p.compressed_bytes)]
    md = ["# Accuracy-vs-size frontier", "", *notes]
    if search:
        md.append(f"- Search: `{search['command']}` at commit `{search['commit']}`; {search['trials']} trials in "
                  f"{duration(search['wall_s'])} wall time.")
    md += [f"- Trials: {len(found)} finished runs under `{sweep}`, {len(front)} on the front. Each trial fine-tunes "
           f"{cfg['trainer']['max_epochs']} epoch(s) per stage on {cfg['data']['train_subset'] or 'all'} training images "
           f"(budget `{cfg['budget_name']}`, trainer.limit_train_batches {cfg['trainer']['limit_train_batches']}); "
           f"cost per trial: median {duration(walls[len(walls) // 2])}, min {duration(walls[0])}, max {duration(walls[-1])} "
           f"(a cached pruning stage makes a trial cheaper), {duration(sum(walls))} in all.",
           "- **Selection and reporting use different test images.** Every trial's objectives (accuracy, "
           "`model.cpk` bytes) are on the *search* half of the CIFAR-10 test set (`data.test_split=search`, 5,000 images, "
           "a seeded half); the front is chosen there. Its models are then rebuilt from their `model.cpk` and evaluated on "
           "the other 5,000 (*report* half), which no trial saw: those are the accuracies reported and compared below. "
           "(The training split is no use for selection: the checkpoint was trained on it.)",
           "- Seed points: the seed's Table 3.2-3.4 accuracies (on all 10,000 test images) at the size of our "
           "`model.cpk` of the same configuration (the seed reports no sizes), from our published runs. Our published runs "
           "are drawn at their own accuracy (all 10,000 images) and size. A 5,000-image accuracy has a standard error of "
           "about 0.4 points near 0.9: \"Δ within noise\" marks a difference below two standard errors.", "",
           "## The front", "",
           "| run | sparsity | quant | nbits | own layer widths | acc (search half, selection) | acc (report half) | bytes | bits/weight |",
           "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| `{t.run}` | {t.sparsity if t.sparsity is not None else '—'} | {t.quant} | {t.nbits} | {t.layer_nbits or '—'} | "
           f"{t.acc_search:.4f} | {t.acc_report:.4f} | {t.compressed_bytes:,} | {t.bits_per_weight:.2f} |" for t in front]
    close = [p for p in dominated if abs(best_within(front, p.compressed_bytes).acc_report - p.acc)
             < 2 * standard_error(p.acc, REPORT_IMAGES)]
    md += ["", f"## The seed's points: {len(dominated)} of {len(seeds)} dominated by the front "
           f"({len(close)} of them by less than two standard errors)", "",
           "A seed point is dominated when a front point is at least as accurate (report half) and at most as large, "
           "and better in one of the two.", "", *dominance_table(front, seeds), ""]
    md += ["![front.png](front.png)", "", "*Accuracy vs `model.cpk` bytes: trials and the front on the search half "
           "(grey dots, dashed), the front re-evaluated on the report half (solid), the seed's Table 3.2-3.4 points at "
           "our bytes (red: x 3.2, + 3.3, diamonds 3.4 before and after FT), our published runs (triangles). "
           "Right: accuracy ≥ 0.8.*"] if drew else \
        ["Figure skipped: matplotlib is not installed (`pip install -e .[report]`)."]
    atomic_write(out / "report.md", lambda f: f.write(("\n".join(md) + "\n").encode()))
    return out / "report.md"


class FrontierCallback(Callback):
    """Hydra callback of ``hparams_search=frontier``: records the search's command, commit and
    wall time (``search.json``) and writes the front into the sweep dir when it ends; never raises."""

    def __init__(self) -> None:
        self.t0 = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.t0 = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            from compress.reproduce import git_commit

            sweep = Path(config.hydra.sweep.dir)
            search = {"command": shlex.join(["python", "-m", "compress.train", *sys.argv[1:]]),
                      "commit": git_commit(sweep), "trials": config.hydra.sweeper.n_trials, "wall_s": time.time() - self.t0}
            atomic_write(sweep / SEARCH_FILE, lambda f: f.write(json.dumps(search, indent=1).encode()))
            root = Path(config.data.root) if config.data.root else default_root()
            log.info("frontier written to %s", write_front(sweep, sweep, root))
        except Exception as e:  # noqa: BLE001 - a report must not fail the search
            log.warning("could not write the frontier: %s: %s", type(e).__name__, e)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m compress.frontier SWEEP_DIR [-o OUT] [--data ROOT] [--published DIR ...]``."""
    import os

    p = argparse.ArgumentParser(prog="python -m compress.frontier", description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="the search's sweep dir (multirun/frontier/<budget>)")
    p.add_argument("-o", "--out", type=Path, help="output dir (default: the sweep dir); gets copies of the trials")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("COMPRESS_DATA", "")),
                   help="CIFAR-10 root (default: $COMPRESS_DATA)")
    p.add_argument("--published", type=Path, nargs="*", default=list(map(Path, PUBLISHED)),
                   help="published reproductions to draw and to size the seed's points with (best budget first)")
    a = p.parse_args(argv)
    try:
        if not a.sweep.is_dir():
            raise FileNotFoundError(f"{a.sweep}: not a directory")
        from compress.reproduce import git_commit

        command = shlex.join(["python", "-m", "compress.frontier", *(argv if argv is not None else sys.argv[1:])])
        notes = [f"- Written by `{command}` at commit `{git_commit(a.out or a.sweep)}`."]
        path = write_front(a.sweep, a.out or a.sweep, a.data, a.published, notes)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"frontier written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
