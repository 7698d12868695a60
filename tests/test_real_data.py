"""End-to-end checks on the real CIFAR-10 test set and the published ResNet-20 checkpoint.

Skipped unless ``COMPRESS_DATA`` and ``COMPRESS_PRETRAINED`` are set. The evaluation-only run
(about 25 s on one CPU core) is in the default suite; the quantized run, checked against an
independent quantizer and an independent evaluation loop, is ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.checkpoint import load_checkpoint
from compress.models import resnet20

PUBLISHED_ACC = 0.9173  # the published checkpoint on the 10k CIFAR-10 test images
# One torch thread in the app: the results do not depend on it, and on a busy 2-core machine
# OpenMP's spinning makes a two-thread evaluation about 3x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
BLOCK_CONVS = [f"layer{s}.{b}.conv{c}.weight" for s in (1, 2, 3) for b in range(3) for c in (1, 2)]


def published_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The published checkpoint read with plain torch (``module.`` prefixes stripped)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}


def spec_asym(w: torch.Tensor, nbits: int) -> torch.Tensor:
    """Asymmetric per-tensor quantizer, from the spec; exact zeros stay zero."""
    lo, hi = w.min(), w.max()
    scale = (hi - lo) / (2**nbits - 1)
    q = torch.round((w - lo) / scale) * scale + lo
    return torch.where(w == 0, torch.zeros_like(w), q)


def same_keys(saved: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """The saved model has the published tensors, plus BatchNorm's ``num_batches_tracked``
    counters, which the (old) published file does not hold."""
    assert set(reference) <= set(saved)
    assert all(k.endswith(".num_batches_tracked") for k in set(saved) - set(reference))


@torch.no_grad()
def plain_accuracy(model: nn.Module, root: Path) -> float:
    """Top-1 accuracy on the CIFAR-10 test set with a plain loop (no Lightning, no compress.data)."""
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(str(root), train=False, download=False)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
    labels = torch.tensor(ds.targets)
    assert len(labels) == 10_000
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    model.eval()
    correct = 0
    for i in range(0, len(labels), 500):
        x = (images[i : i + 500].float() / 255 - mean) / std
        correct += int((model(x).argmax(1) == labels[i : i + 500]).sum())
    return correct / len(labels)


def test_pretrained_accuracy(run_app, data_root: Path, pretrained: Path) -> None:
    proc = run_app("quant=none", "prune=none", "trainer.max_epochs=0", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((proc.run_dir / "metrics.json").read_text())
    assert metrics["test_acc"] == pytest.approx(PUBLISHED_ACC, abs=5e-4)
    assert metrics["before_ft"]["acc"] == metrics["test_acc"] and metrics["after_ft"] is None
    assert metrics["sparsity"]["overall"] == 0.0 and metrics["quantized_tensors"] == 0
    assert set(metrics["sparsity"]["layers"].values()) == {0.0}
    # nothing trained: the saved model is the published one
    saved = load_checkpoint(str(proc.run_dir / "model.pt"))
    reference = published_state_dict(pretrained)
    same_keys(saved.state_dict, reference)
    assert all(torch.equal(saved.state_dict[k], reference[k]) for k in reference)
    assert saved.masks == {}


@pytest.fixture(scope="module")
def asym4(run_apps, data_root: Path, pretrained: Path) -> tuple[Path, dict]:
    proc = run_apps({"asym4": ["quant=asym", "nbits=4", "trainer.max_epochs=0"]}, env=ONE_THREAD)["asym4"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.run_dir, json.loads((proc.run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_asym4_weights(asym4: tuple[Path, dict], pretrained: Path) -> None:
    run_dir, metrics = asym4
    saved = load_checkpoint(str(run_dir / "model.pt")).state_dict
    reference = published_state_dict(pretrained)
    same_keys(saved, reference)
    for name in BLOCK_CONVS:
        w = saved[name]
        assert torch.equal(w, spec_asym(reference[name], 4)), name
        assert torch.unique(w[w != 0]).numel() <= 16, name
    for name in set(reference) - set(BLOCK_CONVS):  # stem conv, BatchNorm, classifier: unchanged
        assert torch.equal(saved[name], reference[name]), name
    assert metrics["quantized_tensors"] == 18 and metrics["max_distinct_values"] <= 16
    assert metrics["choices"]["quant"] == "asym" and metrics["choices"]["nbits"] == 4


@pytest.mark.slow
def test_asym4_accuracy_matches_plain_evaluation(asym4: tuple[Path, dict], data_root: Path) -> None:
    run_dir, metrics = asym4
    model = resnet20()
    model.load_state_dict(load_checkpoint(str(run_dir / "model.pt")).state_dict)
    acc = plain_accuracy(model, data_root)
    assert acc == pytest.approx(metrics["test_acc"], abs=1e-4)
    assert 0.1 < acc < PUBLISHED_ACC + 0.01  # better than chance, not better than full precision


@pytest.mark.slow
def test_bn_recalibration_recovers_3bit_accuracy(run_apps, data_root: Path, pretrained: Path) -> None:
    """At 3 bits per tensor the FP BatchNorm statistics no longer fit; re-estimating them on
    2,000 training images (no training) recovers most of the accuracy."""
    procs = run_apps({
        "seed": ["quant=asym", "nbits=3", "trainer.max_epochs=0"],
        "recal": ["quant=asym", "nbits=3", "trainer.max_epochs=0", "quant.bn_recalibration=2000"],
    }, env=ONE_THREAD)
    acc = {}
    for key, proc in procs.items():
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((proc.run_dir / "metrics.json").read_text())
        assert metrics["max_distinct_values"] <= 8
        acc[key] = metrics["test_acc"]
    assert acc["seed"] < 0.5 and acc["recal"] > 0.8, acc
