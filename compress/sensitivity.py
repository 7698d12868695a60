"""Per-layer sensitivity: each layer alone pruned or quantized, the rest untouched, no fine-tuning.

``python -m compress.train experiment=sensitivity_prune`` prunes each conv/linear layer alone
(magnitude, to each of ``sensitivity.settings``) and ``experiment=sensitivity_quant`` quantizes
each residual-block conv alone (``sym`` and ``asym``, each bit width of ``sensitivity.settings``);
every other layer stays dense and full precision. A cell's weight is exactly what the training
pipeline computes for that setting (:func:`compress.prune.magnitude_masks`,
:func:`compress.quant.quantize`), so a cell's accuracy is that of
``prune=oneshot prune.sparsity=0 prune.layer_sparsity={layer: s} trainer.max_epochs=0``.

One process evaluates every cell: the model and the test set are loaded once, and for each
batch of test images the unchanged activations entering every part of the network (stem, each
block, head) are computed once; a cell then runs only the parts from the one holding its layer
(bit for bit what a full forward computes). It nothing selects, so it reports on every test
image (``trainer.limit_test_batches`` limits them, as for training runs), with the accuracy on
each seeded half beside it (``acc_search``, ``acc_report``: see
:func:`compress.data.split_mask`): a search that uses the ranking reads ``acc_search``.

Writes into the run dir: ``sensitivity.csv`` (one row per (layer, method, setting)), a heatmap
``sensitivity_<kind>.png`` (layers x settings -> accuracy; one panel per quantization mode),
``report.md`` (the ranked "most sensitive layers" table) and, last, ``sensitivity.json``
(config hash, baseline, wall time: a run dir holding it with the same config hash is skipped).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shlex
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compress.checkpoint import apply_checkpoint, atomic_write, load_checkpoint
from compress.data import load_split, normalize, resolve_eval_batch, split_mask
from compress.layers import quantizable_layers, prunable_layers
from compress.models import ResNet
from compress.progress import duration
from compress.prune import check_sparsity, magnitude_masks
from compress.quant import MODES, check_mode, check_nbits, quantize

log = logging.getLogger("compress")

KINDS = ("prune", "quant")
CSV_NAME = "sensitivity.csv"
FIELDS = ("layer", "method", "setting", "weights", "acc", "acc_search", "acc_report", "drop")


@dataclass(frozen=True)
class Cell:
    """One layer at one setting: ``method`` is ``prune`` (``setting`` a sparsity) or a
    quantization mode (``setting`` a bit width)."""

    layer: str
    method: str
    setting: float | int

    @property
    def column(self) -> str:
        """The heatmap/table column: ``0.9``, ``sym 3``."""
        return f"{self.setting:g}" if self.method == "prune" else f"{self.method} {self.setting}"


def cells_of(spec: Mapping[str, Any], model: nn.Module) -> list[Cell]:
    """The cells ``spec`` (the ``sensitivity`` config: ``kind``, ``settings``, ``modes`` for
    quant, ``layers``: ``all`` or names) asks for, layer by layer; ``ValueError`` naming the
    first bad value and what is allowed."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"sensitivity.kind={kind!r} is not allowed: use one of {', '.join(KINDS)}")
    valid = list(prunable_layers(model) if kind == "prune" else quantizable_layers(model))
    layers = spec.get("layers", "all")
    if layers != "all":
        names = [layers] if isinstance(layers, str) else list(layers or [])
        unknown = [n for n in names if n not in valid]
        if not names or unknown:
            raise ValueError(f"sensitivity.layers={layers!r} is not allowed: use all, or some of {', '.join(valid)}")
        valid = [n for n in valid if n in names]
    settings = list(spec.get("settings") or [])
    if not settings:
        raise ValueError("sensitivity.settings is empty: give the sparsities (prune) or bit widths (quant) to try")
    if kind == "prune":
        return [Cell(n, "prune", check_sparsity(s, "sensitivity.settings")) for n in valid for s in settings]
    modes = list(spec.get("modes") or [])
    if not modes:
        raise ValueError(f"sensitivity.modes is empty: use some of {', '.join(MODES)}")
    return [Cell(n, check_mode(m), check_nbits(b, "sensitivity.settings")) for n in valid for m in modes for b in settings]


def cell_weight(w: torch.Tensor, cell: Cell) -> torch.Tensor:
    """The weight ``w`` of ``cell.layer`` as the pipeline computes it at the cell's setting."""
    if cell.method == "prune":
        return w * magnitude_masks({cell.layer: w}, float(cell.setting), "layer")[cell.layer].to(w.dtype)
    return quantize(w, cell.method, int(cell.setting))


Part = tuple[tuple[str, ...], Callable[[torch.Tensor], torch.Tensor]]


def parts(model: ResNet) -> list[Part]:
    """The network as consecutive parts with the conv/linear layers each holds: stem, every
    residual block, head. Applied in order they compute ``model(x)``."""
    stem: Part = (("conv1",), lambda x: F.relu(model.bn1(model.conv1(x))))
    blocks: list[Part] = [((f"{stage}.{i}.conv1", f"{stage}.{i}.conv2"), block)
                          for stage in ("layer1", "layer2", "layer3") for i, block in enumerate(getattr(model, stage))]
    head: Part = (("linear",), lambda x: model.linear(F.adaptive_avg_pool2d(x, 1).flatten(1)))
    return [stem, *blocks, head]


@contextmanager
def swapped(module: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """``module.weight`` holds ``weight`` inside the block, its own values again after it."""
    own = module.weight.data
    module.weight.data = weight
    try:
        yield
    finally:
        module.weight.data = own


@torch.inference_mode()
def evaluate(model: ResNet, cells: Sequence[Cell], images: torch.Tensor, labels: torch.Tensor, batch: int,
             progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per test image, whether ``model`` classifies it right unchanged (``[N]``) and with each
    cell's weight in place (``[cells, N]``); fp32, eval mode, batches of ``batch`` normalized
    images (as the pipeline's test). ``progress(done, total)`` is called after every batch."""
    model.eval()
    chain = parts(model)
    start = {name: k for k, (names, _) in enumerate(chain) for name in names}
    modules = dict(model.named_modules())
    weights = [cell_weight(modules[c.layer].weight.detach(), c) for c in cells]
    n = len(labels)
    dense, right = torch.zeros(n, dtype=torch.bool), torch.zeros(len(cells), n, dtype=torch.bool)
    for i in range(0, n, batch):
        y = labels[i:i + batch]
        acts = [normalize(images[i:i + batch])]
        for _, f in chain:
            acts.append(f(acts[-1]))
        dense[i:i + batch] = acts[-1].argmax(1) == y
        for c, (cell, w) in enumerate(zip(cells, weights)):
            k = start[cell.layer]
            with swapped(modules[cell.layer], w):
                out = acts[k]
                for _, f in chain[k:]:
                    out = f(out)
            right[c, i:i + batch] = out.argmax(1) == y
        if progress:
            progress(min(i + batch, n), n)
    return dense, right


def accuracies(right: torch.Tensor, n_total: int) -> dict[str, float]:
    """Accuracy over the evaluated images (the first ``len(right)`` of the ``n_total`` test
    images) and over each seeded half of them."""
    out = {"acc": right.float().mean().item()}
    for split in ("search", "report"):
        keep = split_mask(n_total, split)[: len(right)]
        out[f"acc_{split}"] = right[keep].float().mean().item()
    return out


def limit_batches(limit: int | float, batches: int) -> int:
    """How many of ``batches`` test batches ``trainer.limit_test_batches`` allows (Lightning's
    rule: an int is a count, a float a fraction)."""
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0:
        raise ValueError(f"trainer.limit_test_batches={limit!r} is not allowed: use a count or a fraction in [0, 1]")
    return min(batches, limit if isinstance(limit, int) else int(batches * limit))


def ranking(rows: Sequence[Mapping[str, Any]], column: str = "acc") -> list[tuple[str, float]]:
    """Layers from the most to the least sensitive: ``[(layer, mean accuracy over its cells)]``
    in ``column`` (``acc``, or a half's ``acc_search``/``acc_report``), lowest first (every
    cell's drop is from the same dense model, so the lowest mean is the largest mean drop)."""
    accs = defaultdict(list)
    for r in rows:
        accs[r["layer"]].append(float(r[column]))
    return sorted(((n, mean(a)) for n, a in accs.items()), key=lambda na: (na[1], na[0]))


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``sensitivity.csv``; ``FileNotFoundError``/``ValueError`` in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sensitivity CSV (python -m compress.train experiment=sensitivity_quant writes one)")
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    if not rows or not set(FIELDS) <= set(rows[0]):
        raise ValueError(f"{path}: not a sensitivity CSV (columns {', '.join(FIELDS)})")
    return rows


def sensitive_widths(path: str, count: int, nbits: int, extra: int) -> dict[str, int]:
    """``{layer: min(8, nbits + extra)}`` for the ``count`` block convs whose quantization
    costs the most accuracy on the *search* half of the test set, by the CSV of
    ``experiment=sensitivity_quant`` at ``path`` (mean over its modes and bit widths). The
    OmegaConf resolver ``${sensitive_widths:path,count,nbits,extra}``: per-layer bit widths of a
    search, seeded from the sensitivity results without looking at the report half."""
    if count == 0:
        return {}
    ranked = ranking([r for r in read_rows(path) if r["method"] in MODES], "acc_search")
    return {layer: min(8, nbits + extra) for layer, _ in ranked[:count]}


if not OmegaConf.has_resolver("sensitive_widths"):
    OmegaConf.register_new_resolver("sensitive_widths", sensitive_widths)


def heatmap(rows: Sequence[Mapping[str, Any]], title: str, baseline: float, path: Path) -> bool:
    """Draw layers x settings -> accuracy (one panel per method) into ``path``; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = Figure(figsize=(2.2 + 1.7 * len(methods) + 0.55 * len({r["setting"] for r in rows}) * len(methods),
                          1.2 + 0.32 * len(layers)))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        settings = list(dict.fromkeys(r["setting"] for r in rows if r["method"] == method))
        acc = {(r["layer"], r["setting"]): float(r["acc"]) for r in rows if r["method"] == method}
        grid = [[acc.get((n, s), math.nan) for s in settings] for n in layers]
        image = ax.imshow(grid, cmap="viridis", vmin=0.1, vmax=baseline, aspect="auto")
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(settings)), [f"{s:g}" for s in settings])
        ax.set_yticks(range(len(layers)), layers if ax is axes[0] else [""] * len(layers), fontsize=7)
        ax.set_xlabel("sparsity" if method == "prune" else f"{method}: bit width")
    fig.colorbar(image, ax=list(axes), label="test accuracy", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    return True


def table(rows: Sequence[Mapping[str, Any]], baseline: float) -> list[str]:
    """The ranked "most sensitive layers" table (markdown lines): mean drop over a layer's
    cells, then its accuracy in each column."""
    columns = list(dict.fromkeys(Cell(r["layer"], r["method"], r["setting"]).column for r in rows))
    acc = {(r["layer"], Cell(r["layer"], r["method"], r["setting"]).column): float(r["acc"]) for r in rows}
    weights = {r["layer"]: r["weights"] for r in rows}
    lines = ["| rank | layer | weights | mean acc | mean drop (points) | " + " | ".join(columns) + " |",
             "|" + "---|" * (5 + len(columns))]
    for rank, (layer, mean_acc) in enumerate(ranking(rows), 1):
        cells = " | ".join(f"{acc[(layer, c)]:.4f}" for c in columns)
        lines.append(f"| {rank} | `{layer}` | {weights[layer]} | {mean_acc:.4f} | {(baseline - mean_acc) * 100:.2f} | {cells} |")
    return lines


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any] | None:
    """The sweep ``cfg.sensitivity`` asks for, into ``out_dir``; its summary (None if skipped:
    ``sensitivity.json`` there holds the same config hash)."""
    from compress.reproduce import git_commit
    from compress.train import hardware, start  # the app's helpers (the app imports this module)

    t0 = time.time()
    summary_path = out_dir / "sensitivity.json"
    digest = start(cfg, summary_path)
    if digest is None:
        return None
    model = instantiate(cfg.model.net)
    cells = cells_of(cfg.sensitivity, model)
    datamodule = instantiate(cfg.data)
    datamodule.check()
    apply_checkpoint(model, load_checkpoint(cfg.model.pretrained), cfg.model.pretrained)
    images, labels = load_split(datamodule.root, train=False)
    batch = resolve_eval_batch(cfg.data.eval_batch_size, torch.device("cpu"))
    n = min(len(labels), batch * limit_batches(cfg.trainer.limit_test_batches, math.ceil(len(labels) / batch)))
    kind = cfg.sensitivity.kind
    log.info("sensitivity_%s: %d cells (%d layers) on %d test images", kind, len(cells), len({c.layer for c in cells}), n)
    t_eval, shown = time.time(), [0.0]

    def progress(done: int, total: int) -> None:
        elapsed = time.time() - t_eval
        if done == total or elapsed - shown[0] >= 60:
            shown[0] = elapsed
            log.info("sensitivity_%s: %d/%d test images  elapsed %s  ETA %s", kind, done, total, duration(elapsed),
                     duration(elapsed / done * (total - done)))

    dense, right = evaluate(model, cells, images[:n], labels[:n], batch, progress)
    eval_s = time.time() - t_eval
    base = {k: round(v, 6) for k, v in accuracies(dense, len(labels)).items()}
    layers = dict(model.named_modules())
    rows = []
    for cell, r in zip(cells, right):
        accs = {k: round(v, 6) for k, v in accuracies(r, len(labels)).items()}
        rows.append({**asdict(cell), "weights": layers[cell.layer].weight.numel(), **accs,
                     "drop": round(base["acc"] - accs["acc"], 6)})

    text = io.StringIO()
    writer = csv.DictWriter(text, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out_dir / CSV_NAME, lambda f: f.write(text.getvalue().encode()))
    what = ("pruned alone (magnitude), the rest dense" if kind == "prune"
            else "quantized alone (" + ", ".join(dict.fromkeys(c.method for c in cells)) + "), the rest full precision")
    title = f"{model.arch}: test accuracy with one layer {what}, no fine-tuning"
    figure = f"sensitivity_{kind}.png"
    summary = {
        "config_hash": digest, "kind": kind, "cells": len(cells), "test_images": n, "baseline": base,
        "eval_s": eval_s, "s_per_cell": eval_s / max(1, len(cells)), "wall_time_s": time.time() - t0,
        "command": shlex.join(["python", "-m", "compress.train", *sys.argv[1:]]), "commit": git_commit(out_dir),
        "hardware": hardware(cfg.trainer.accelerator), "config": OmegaConf.to_container(cfg, resolve=True),
    }
    drew = heatmap(rows, title, base["acc"], out_dir / figure)
    report = [f"# Per-layer sensitivity ({kind}): each layer {what}", "",
              f"- Command: `{summary['command']}` at commit `{summary['commit']}`; wall time "
              f"{duration(summary['wall_time_s'])} ({eval_s / max(1, len(cells)):.2f} s of evaluation per cell); "
              f"{summary['hardware']['device']}, {summary['hardware']['threads']} threads.",
              f"- {model.arch}, {len(cells)} cells ({len({c.layer for c in cells})} layers x "
              f"{len(cells) // max(1, len({c.layer for c in cells}))} settings), no fine-tuning, evaluated on "
              f"{n:,} CIFAR-10 test images (nothing is selected, so the test set reports). `{CSV_NAME}` also has the "
              "accuracy on each seeded half (`acc_search`, `acc_report`); searches rank layers on the search half only.",
              f"- Unchanged model: {base['acc']:.4f} (search half {base['acc_search']:.4f}, report half {base['acc_report']:.4f}).",
              "", "## Most sensitive layers", "",
              "Ranked by the mean accuracy drop over the layer's cells (points from the unchanged model), "
              "then the accuracy in each cell.", "", *table(rows, base["acc"]), ""]
    report += [f"![{figure}]({figure})", "", f"*{title}; rows: layers in network order; colour and number: test accuracy.*"] \
        if drew else ["Heatmap skipped: matplotlib is not installed (`pip install -e .[report]`)."]
    atomic_write(out_dir / "report.md", lambda f: f.write(("\n".join(report) + "\n").encode()))
    atomic_write(summary_path, lambda f: f.write(json.dumps(summary, indent=1).encode()))
    log.info("done in %s: %d cells, unchanged model %.4f; results in %s", duration(summary["wall_time_s"]), len(cells),
             base["acc"], out_dir)
    return summary
