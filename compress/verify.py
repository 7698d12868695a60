"""Re-check published runs from their artifacts: ``python -m compress.verify multirun/published/full``.

For every run dir under the given paths (a dir holding ``metrics.json``) it rebuilds the model
from the packed ``model.cpk``, evaluates it in fp32 on its test set, and checks it against the
run's ``metrics.json``. A CIFAR-10 run (``data._target_: compress.data.CIFAR10Data``, every
published run) is tested on the CIFAR-10 test set read straight from the official pickle file
(``--data`` or ``$COMPRESS_DATA``; no code of the training pipeline); any other run
(``data=cifar100``, ``data=imagefolder``, a user's datamodule, importable from ``PYTHONPATH``)
on the test set its own data config builds (:func:`test_tensors`; root: ``--data`` if given,
else the config's). Checked:

- test accuracy within ``--tol`` (default 0.001), on the test images the run tested on (all,
  or the seeded half of ``data.test_split``); a run that tested on fewer batches
  (``trainer.limit_test_batches``, ``budget=debug``) has its accuracy printed, not compared;
- per-layer sparsity as recorded, and at least the target the run recorded for each pruned layer
  (``layer_sparsity``: its own for layer scope or ``prune.layer_sparsity``; the layers under the
  one global threshold together at least ``prune.sparsity``);
- per quantized tensor, the distinct nonzero values as recorded, and the most of any output
  channel as recorded (runs from before that was recorded: not checked); at most ``2^nbits``
  per tensor, or per output channel for ``quant.granularity=channel`` runs
  (``choices.granularity``; runs without it are per tensor), ``nbits`` being the layer's own
  (``layer_nbits`` in ``metrics.json``; runs without it: ``choices.nbits``).

With ``--report-half`` each line also gives the accuracy on the seeded *report* half of the test
set (``data.test_split=report``), which no search in this project selects on: the number to
read for a recipe chosen on the other half (``recipe=best``, chosen by ``experiment=ablation``).

One line per run, then a summary; exit 1 if any run fails a check, 2 on bad input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.data import (CIFAR10_FORMAT, MEAN, STD, InMemoryData, concat_batches, is_cifar10, normalize, read_pickles,
                           split_mask)
from compress.export import load

# Keys of our datamodules set for a test pass: every test image in file order, on the CPU.
TEST_OVERRIDES = {"test_split": "all", "device": "cpu", "train_subset": 0}

Tensors = tuple[torch.Tensor, torch.Tensor]


def test_set(root: Path, mean: Any = MEAN, std: Any = STD) -> Tensors:
    """The 10k CIFAR-10 test images (normalized float32, NCHW) and labels from ``test_batch``."""
    path = root / "cifar-10-batches-py" / "test_batch"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no CIFAR-10 test batch (set COMPRESS_DATA or --data to a torchvision CIFAR-10 root)")
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    x = torch.from_numpy(np.asarray(batch["data"], dtype=np.float32).reshape(-1, 3, 32, 32) / 255.0)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, torch.tensor(batch["labels"])


def cifar10_root(root: str | Path | None) -> Path:
    """The CIFAR-10 root: ``root``, else ``$COMPRESS_DATA``, else ``data/cifar10`` (not the run's own
    ``data.root``: published runs name the machine they ran on)."""
    return Path(root if root is not None else os.environ.get("COMPRESS_DATA", "data/cifar10")).expanduser()


def check_importable(target: object) -> None:
    """``ValueError`` in one line unless ``target`` (``data._target_``) names an importable class."""
    module, _, name = str(target).rpartition(".")
    try:
        found = bool(module) and hasattr(importlib.import_module(module), name)
    except ImportError as e:
        found, why = False, f"{type(e).__name__}: {e}"
    else:
        why = f"no {name!r} in module {module!r}" if module else "not a dotted module.Class path"
    if not found:
        raise ValueError(f"data._target_={target!r} cannot be imported ({why}): put its module on PYTHONPATH")


def test_tensors(data_cfg: dict[str, Any], root: str | Path | None = None) -> Tensors:
    """A run's test set, every image in file order, as normalized float32 NCHW images and int64
    labels, from its data config (``metrics.json``'s ``config.data``); ``root`` (if not None)
    replaces ``data.root``.

    CIFAR-10 runs read the official pickle (:func:`test_set`, root: ``root`` or
    :func:`cifar10_root`; with the config's mean/std if it has them). Any other datamodule is
    instantiated (``hydra.utils.instantiate``; ours on the CPU, ``test_split: all``): ours read
    and normalize their test images as their test loader does; a user's is set up for ``test``
    and its test loader's batches are concatenated."""
    if is_cifar10(data_cfg):
        cfg = data_cfg or {}
        return test_set(cifar10_root(root), cfg.get("mean", MEAN), cfg.get("std", STD))
    datamodule = _datamodule(data_cfg, root)
    if isinstance(datamodule, InMemoryData):  # what its test loader yields, without reading the training set
        x, y = datamodule.read(train=False)
        return normalize(x, datamodule.mean, datamodule.std).contiguous(), y
    datamodule.setup("test")
    return concat_batches(datamodule.test_dataloader())


def _datamodule(data_cfg: dict[str, Any], root: str | Path | None) -> Any:
    """A run's datamodule (ours on the CPU, every test image), ``root`` replacing ``data.root``, data prepared."""
    from compress.inputs import instantiate_data

    check_importable(data_cfg.get("_target_"))
    cfg = dict(data_cfg) | {k: v for k, v in TEST_OVERRIDES.items() if k in data_cfg}
    if root is not None:
        cfg["root"] = str(root)
    datamodule = instantiate_data(cfg)
    datamodule.prepare_data()
    return datamodule


def calibration_images(data_cfg: dict[str, Any] | None, count: int, root: str | Path | None = None) -> torch.Tensor:
    """``count`` training images of a run's dataset (a seeded random choice, normalized float32
    NCHW, no augmentation): what activation ranges are calibrated on. Training images, as the
    checkpoint has seen them: calibrating fits ranges, it selects nothing. CIFAR-10 from its
    pickles (root as :func:`test_tensors`); our other datamodules by their ``read``; a user's
    from the first batches of its training loader (as it yields them)."""
    if is_cifar10(data_cfg):
        cfg = data_cfg or {}
        x, _ = read_pickles(cifar10_root(root), CIFAR10_FORMAT, train=True)
        mean, std = cfg.get("mean", MEAN), cfg.get("std", STD)
    else:
        datamodule = _datamodule(data_cfg, root)
        if not isinstance(datamodule, InMemoryData):
            datamodule.setup("fit")
            images, seen = [], 0
            for batch in datamodule.train_dataloader():
                images.append(batch[0].cpu())
                seen += len(images[-1])
                if seen >= count:
                    break
            return torch.cat(images)[:count].float().contiguous()
        x, _ = datamodule.read(train=True)
        mean, std = datamodule.mean, datamodule.std
    chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:count]
    return normalize(x[chosen], mean, std).contiguous()


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` (eval mode, fp32) on ``x, y``."""
    model.eval().float()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / len(y)


def _distinct(w: torch.Tensor) -> int:
    return int(torch.unique(w[w != 0]).numel())


def layer_stats(model: nn.Module) -> tuple[dict[str, float], dict[str, int], dict[str, int], int]:
    """Per conv/linear layer: fraction of zero weights, distinct nonzero values, the most
    distinct nonzero values of any output channel; and the total weight count."""
    zeros, distinct, per_channel, total = {}, {}, {}, 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            zeros[name] = float((w == 0).sum()) / w.numel()
            distinct[name] = _distinct(w)
            per_channel[name] = max(_distinct(c) for c in w)
            total += w.numel()
    return zeros, distinct, per_channel, total


def run_data(run: Path) -> dict[str, Any]:
    """The data config a run recorded in its ``metrics.json`` (empty for a run without one)."""
    return (json.loads((run / "metrics.json").read_text()).get("config") or {}).get("data") or {}


def data_key(data_cfg: dict[str, Any], root: Path | None) -> str:
    """Runs with the same key test on the same tensors."""
    if is_cifar10(data_cfg):
        return json.dumps(["cifar10", str(cifar10_root(root)), data_cfg.get("mean", MEAN), data_cfg.get("std", STD)])
    ours = str(data_cfg.get("_target_")).startswith("compress.data.")  # their test set depends on none of these
    dropped = (*TEST_OVERRIDES, *(("seed", "batch_size", "eval_batch_size") if ours else ()))
    kept = {k: v for k, v in data_cfg.items() if k not in dropped}
    return json.dumps([kept, str(root) if root is not None else None], sort_keys=True, default=str)


def check_run(run: Path, x: torch.Tensor, y: torch.Tensor, tol: float, report_half: bool = False) -> tuple[bool, str]:
    """Re-check one run on its full test set ``x, y``; returns (passed, a one-line summary with
    what failed), the summary with the accuracy on the report half of the test set if ``report_half``."""
    m: dict[str, Any] = json.loads((run / "metrics.json").read_text())
    if not (run / "model.cpk").is_file():
        return False, "no model.cpk"
    model = load(run / "model.cpk")
    problems = []
    split = split_mask(len(y), ((m.get("config") or {}).get("data") or {}).get("test_split", "all"))
    xs, ys = x[split], y[split]
    tested = tested_images(m, len(ys))
    if tested is not None and not 0 < tested <= len(ys):
        problems.append(f"test_images {m['test_images']!r} is not a count of 1..{len(ys)} test images")
        tested = len(ys)
    acc = accuracy(model, xs[:tested], ys[:tested])
    if tested is not None and abs(acc - m["test_acc"]) > tol:
        problems.append(f"test acc {acc:.4f} != metrics {m['test_acc']:.4f}")
    on = (f" on trainer.limit_test_batches={limited_test_batches(m)}: not compared" if tested is None
          else f" on the first {tested} of {len(ys)} test images" if tested < len(ys) else "")
    zeros, distinct, per_channel, total = layer_stats(model)
    recorded = (m.get("sparsity") or {}).get("layers") or {}
    if recorded and any(abs(zeros[n] - s) > 1e-9 for n, s in recorded.items()):
        problems.append("per-layer sparsity differs from metrics.json")
    prune = m["config"]["prune"]
    numel = {n: model.get_submodule(n).weight.numel() for n in zeros}
    overall = sum(zeros[n] * numel[n] for n in zeros) / total
    if "sparsity" in prune:  # a pruning method ran
        targets = pruning_targets(m, zeros)
        short = [n for n, t in targets.items() if t is not None and zeros[n] < t]
        if short:
            problems.append(f"{len(short)} layers under their target sparsity ({short[0]} {zeros[short[0]]:.4f} "
                            f"< {targets[short[0]]})")
        shared = [n for n, t in targets.items() if t is None]  # global: under the one threshold
        pooled = sum(zeros[n] * numel[n] for n in shared) / max(1, sum(numel[n] for n in shared))
        if shared and pooled < prune["sparsity"]:
            problems.append(f"{'overall' if len(shared) == len(zeros) else 'pooled'} sparsity {pooled:.4f} < {prune['sparsity']}")
    quant = m["choices"]["quant"]
    nbits = m["choices"]["nbits"]
    worst, mixed = None, False
    channel = m["choices"].get("granularity") == "channel"
    if quant != "none":
        recorded_q = m.get("distinct_values") or {}
        widths = {n: (m.get("layer_nbits") or {}).get(n, nbits) for n in recorded_q}
        bounded, what = (per_channel, "tensors with a channel of") if channel else (distinct, "tensors with")
        over = {n: bounded[n] for n in recorded_q if bounded[n] > 2 ** widths[n]}
        if over:
            first = next(iter(over))
            bound = f"{2 ** widths[first]}" if len({widths[n] for n in over}) == 1 else "2^(their nbits)"
            problems.append(f"{len(over)} {what} more than {bound} values ({first} {over[first]})")
        if any(distinct[n] != v for n, v in recorded_q.items()):
            problems.append("distinct values differ from metrics.json")
        if any(per_channel[n] != v for n, v in (m.get("distinct_values_per_channel") or {}).items()):
            problems.append("distinct values per channel differ from metrics.json")
        worst = max((bounded[n] for n in recorded_q), default=0)
        mixed = len(set(widths.values())) > 1
    half = split_mask(len(y), "report")
    line = (f"acc {acc:.4f} (metrics {m['test_acc']:.4f}{on})"
            + (f"  report half {accuracy(model, x[half], y[half]):.4f}" if report_half else "")
            + f"  sparsity {overall:.3f}"
            + (f"  max distinct {worst}/{2**nbits}{' per channel' if channel else ''}" if worst is not None and not mixed else "")
            + (f"  distinct <= 2^nbits of each layer ({min(widths.values())}..{max(widths.values())} bits)"
               if worst is not None and mixed else ""))
    return not problems, line + ("  FAIL: " + "; ".join(problems) if problems else "")


def pruning_targets(metrics: dict[str, Any], layers: dict[str, float]) -> dict[str, float | None]:
    """The target sparsity of every pruned layer, as the run recorded it (``layer_sparsity`` in
    ``metrics.json``: None where the layer is under the one global threshold); runs from before
    that record: from the config, every conv/linear layer (``layers``) at ``prune.sparsity`` for
    ``layer`` scope or under the one threshold for ``global`` scope, but their own ``layer_sparsity``."""
    recorded = metrics.get("layer_sparsity")
    if isinstance(recorded, dict) and recorded:
        return recorded
    prune = metrics["config"]["prune"]
    own = prune.get("layer_sparsity") or {}
    return {n: own.get(n, prune["sparsity"] if prune.get("scope") == "layer" else None) for n in layers}


def tested_images(metrics: dict[str, Any], n: int) -> int | None:
    """How many of the ``n`` images of its test split (the first ones) a run's accuracy is over:
    its recorded ``test_images`` (-1 if that is not an int); for a run from before that field,
    ``n`` if it tested on every batch, None if ``trainer.limit_test_batches`` limited the pass
    (e.g. ``budget=debug``: then which images it tested is unknown and its accuracy not comparable)."""
    recorded = metrics.get("test_images")
    if recorded is not None:
        return recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else -1
    limit = limited_test_batches(metrics)
    return n if limit is None or (isinstance(limit, float) and limit == 1.0) else None  # an int 1 is one batch


def limited_test_batches(metrics: dict[str, Any]) -> Any:
    """The run's ``trainer.limit_test_batches`` (None if unset)."""
    return ((metrics.get("config") or {}).get("trainer") or {}).get("limit_test_batches")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run dirs (holding ``metrics.json``) under ``paths``, sorted."""
    runs = set()
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory")
        runs |= {f.parent for f in ([p / "metrics.json"] if (p / "metrics.json").is_file() else p.rglob("metrics.json"))}
    return sorted(runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.verify", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", type=Path, help="published reproductions or run dirs")
    p.add_argument("--data", type=Path, default=None,
                   help="data root: CIFAR-10 runs' torchvision root (default: $COMPRESS_DATA), other runs' "
                        "data.root (default: the run's own)")
    p.add_argument("--tol", type=float, default=0.001, help="allowed |accuracy - metrics.json test_acc|")
    p.add_argument("--report-half", action="store_true",
                   help="also print each model's accuracy on the seeded report half of the test set")
    a = p.parse_args(argv)
    try:
        runs = find_runs(a.paths)
        if not runs:
            raise FileNotFoundError(f"no run dir (with metrics.json) under {', '.join(map(str, a.paths))}")
        keys = {run: data_key(run_data(run), a.data) for run in runs}
        tensors = {}
        for run, key in keys.items():
            if key not in tensors:
                tensors[key] = test_tensors(run_data(run), a.data)
    except (FileNotFoundError, OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    common = Path(os.path.commonpath([r.resolve() for r in runs])) if len(runs) > 1 else runs[0].resolve().parent
    for run in runs:
        try:
            ok, line = check_run(run, *tensors[keys[run]], a.tol, a.report_half)
        except (OSError, ValueError, KeyError, TypeError) as e:
            ok, line = False, f"FAIL: {type(e).__name__}: {e}"
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {run.resolve().relative_to(common)}  {line}", flush=True)
    print(f"{len(runs) - failed} of {len(runs)} runs verified" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
