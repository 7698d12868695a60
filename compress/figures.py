"""The report's figures: accuracy vs bit width, per-layer sparsity, validation accuracy per epoch.

Each draws one section's runs with matplotlib's object API (no global state, no display);
:func:`figures` returns None where matplotlib is not installed, and the report says so.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from compress.cells import METHODS, SEED, Cell, Job, Key, Section, dig, dig_dict, label, seed_numbers

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
