"""Quantization-aware fine-tuning and the prune -> quantize pipeline (seed Tables 3.3 and 3.4)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from compress.batchnorm import BatchNormRecalibration
from compress.data import TensorBatches
from compress.layers import bake, quantizable_layers
from compress.module import Classifier, CompileNetwork
from compress.prune import PruningCallback, current_masks
from compress.quant import QuantizationCallback
from compress.stages import Stage, StageCache, StageResult

REPO = Path(__file__).resolve().parents[1]


def sgd_steps(model: torch.nn.Module, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_qat_updates_latent_weights_while_forward_sees_levels(resnet: torch.nn.Module) -> None:
    QuantizationCallback("asym", 2).install(resnet)
    conv = resnet.layer2.get_submodule("1").conv1
    latent_before = conv.parametrizations.weight.original.detach().clone()
    sgd_steps(resnet)
    latent = conv.parametrizations.weight.original.detach()
    assert not torch.equal(latent, latent_before), "the optimizer moves the FP latent weights"
    assert torch.unique(conv.weight.detach()).numel() <= 4, "forward uses 2-bit weights"
    assert torch.unique(latent).numel() > 100


def test_masks_and_quantization_compose(resnet: torch.nn.Module) -> None:
    PruningCallback(0.8, "global").install(resnet)
    QuantizationCallback("asym", 3).install(resnet)
    masks = current_masks(resnet)
    sgd_steps(resnet)
    bake(resnet)
    zeros = sum(int((resnet.get_submodule(n).weight == 0).sum()) for n in masks)
    assert zeros / sum(m.numel() for m in masks.values()) >= 0.8
    for name, mask in masks.items():
        assert torch.all(resnet.get_submodule(name).weight[~mask] == 0), name
    for name, conv in quantizable_layers(resnet).items():
        w = conv.weight.detach()
        assert torch.unique(w[w != 0]).numel() <= 8, name


def test_compile_network_compiles_the_parametrized_network_once(resnet: torch.nn.Module) -> None:
    module = Classifier(resnet)
    QuantizationCallback("asym", 4).install(resnet)
    CompileNetwork().setup(None, module, "fit")
    compiled = resnet._compiled_call_impl
    assert compiled is not None
    CompileNetwork().setup(None, module, "test")
    assert resnet._compiled_call_impl is compiled, "a second stage reuses the compiled network"


@pytest.mark.slow
def test_compiled_network_computes_what_the_eager_one_does(resnet: torch.nn.Module) -> None:
    QuantizationCallback("asym", 4).install(resnet)
    resnet.eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        eager = resnet(x)
        CompileNetwork().setup(None, Classifier(resnet), "test")
        compiled = resnet(x)
        bake(resnet)  # the guards see the parametrizations go: recompiled, same function
        baked = resnet(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(baked, eager, rtol=1e-4, atol=1e-4)


def test_stage_cache_computes_once_and_restores_the_model(tmp_path: Path, resnet: torch.nn.Module) -> None:
    calls = []

    def compute() -> tuple[StageResult, dict[str, torch.Tensor]]:
        calls.append(1)
        PruningCallback(0.5, "layer").install(resnet)
        masks = current_masks(resnet)
        bake(resnet)
        return StageResult("prune", 0, {"acc": 0.5, "loss": 1.0}, None), masks

    stage = Stage("prune", 0, lambda m: [], cache_key="k1")
    first, masks = StageCache(tmp_path).run(stage, compute, resnet)
    pruned = {k: v.clone() for k, v in resnet.state_dict().items()}

    fresh = type(resnet)()
    second, masks2 = StageCache(tmp_path).run(stage, compute, fresh)
    assert len(calls) == 1, "the second run of the same stage must not recompute it"
    assert (first.cached, second.cached) == (False, True)
    assert second.before == first.before
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in pruned.items())
    assert masks2.keys() == masks.keys() and all(torch.equal(masks2[k], masks[k]) for k in masks)


def test_stage_cache_parallel_jobs_compute_once(tmp_path: Path) -> None:
    """Two jobs wanting the same stage at once: one computes, the other waits and reuses."""
    calls, started = [], threading.Event()

    def compute_into(model: torch.nn.Module):
        def compute() -> tuple[StageResult, dict[str, torch.Tensor]]:
            calls.append(1)
            started.set()
            return StageResult("prune", 0, {"acc": 0.1, "loss": 2.0}, None), {}
        return compute

    from compress.models import resnet20
    models = [resnet20(), resnet20()]
    stage = Stage("prune", 0, lambda m: [], cache_key="k2")
    out: list[StageResult] = []
    threads = [threading.Thread(target=lambda m=m: out.append(StageCache(tmp_path).run(stage, compute_into(m), m)[0]))
               for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1 and len(out) == 2
    assert sorted(r.cached for r in out) == [False, True]
    assert not list(tmp_path.glob(".*.tmp")), "no half-written entry left behind"


@pytest.mark.slow
def test_prune_quant_pipeline_end_to_end(tmp_path: Path, data_root: Path, pretrained: Path) -> None:
    """prune=global quant=asym over two nbits: pruning trained once, masks kept, levels bounded,
    and quantization-aware fine-tuning beats no fine-tuning at 3 and 2 bits."""
    cmd = [sys.executable, "-m", "compress.train", "-m", "prune=global", "quant=asym", "nbits=3,2",
           "trainer.max_epochs=2", "prune.ramp_epochs=1", "data.train_subset=5000",
           f"hydra.sweep.dir={tmp_path}", f"stage_cache={tmp_path}/.stages"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = {json.loads(p.read_text())["choices"]["nbits"]: p for p in tmp_path.glob("*/metrics.json")}
    assert sorted(paths) == [2, 3]
    runs = {n: json.loads(p.read_text()) for n, p in paths.items()}
    assert sorted(m["stages"][0]["cached"] for m in runs.values()) == [False, True]
    for m in runs.values():
        n = m["choices"]["nbits"]
        assert m["sparsity"]["overall"] >= 0.8
        assert m["max_distinct_values"] <= 2**n
        assert m["after_ft"]["acc"] > m["before_ft"]["acc"]
    from compress.checkpoint import load_checkpoint
    ckpt = load_checkpoint(str(paths[2].parent / "model.pt"))
    total = sum(v.numel() for v in ckpt.masks.values())
    zeros = sum(int((ckpt.state_dict[f"{k}.weight"] == 0).sum()) for k in ckpt.masks)
    assert zeros / total >= 0.8


class RandomImages(pl.LightningDataModule):
    """512 random uint8 images served as ``compress.data`` serves CIFAR-10."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=gen)
        self.y = torch.randint(0, 10, (512,), generator=gen)

    def train_dataloader(self) -> TensorBatches:
        return TensorBatches(self.x, self.y, 128, train=True)

    def test_dataloader(self) -> TensorBatches:
        return TensorBatches(self.x, self.y, 128, train=False)


def bn_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def test_bn_recalibration_reestimates_statistics_of_the_quantized_net_once(resnet: torch.nn.Module) -> None:
    dm = RandomImages()
    # reference: the quantized net's batch statistics over the first two training batches, averaged
    reference = copy.deepcopy(resnet)
    QuantizationCallback("asym", 3).install(reference)
    norms = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    reference.train()
    with torch.no_grad():
        for (x, _), _ in zip(dm.train_dataloader(), range(2)):
            reference(x)
    weights = {k: v.clone() for k, v in resnet.state_dict().items() if k not in bn_stats(resnet)}
    fp_stats = bn_stats(resnet)

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[QuantizationCallback("asym", 3), BatchNormRecalibration(200)])
    trainer.test(Classifier(resnet), datamodule=dm, verbose=False)
    stats = bn_stats(resnet)
    assert stats.keys() == bn_stats(reference).keys() and len(stats) == 2 * 19
    for k, v in bn_stats(reference).items():
        torch.testing.assert_close(stats[k], v, msg=k)
        assert not torch.allclose(stats[k], fp_stats[k]), k
    assert all(m.momentum == 0.1 for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)), "momentum restored"
    bake(resnet)
    for k, w in weights.items():  # BN affine and the stem/classifier untouched; block convs as quantized
        if k.endswith(".weight") and k.removesuffix(".weight") in quantizable_layers(resnet):
            assert torch.unique(resnet.state_dict()[k]).numel() <= 8, k
        elif not k.endswith("num_batches_tracked"):
            assert torch.equal(resnet.state_dict()[k], w), k

    trainer.test(Classifier(resnet), datamodule=dm, verbose=False)  # a second test: not again
    assert all(torch.equal(v, stats[k]) for k, v in bn_stats(resnet).items())


def test_bn_recalibration_rejects_a_bad_count() -> None:
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match=f"quant.bn_recalibration={bad!r} is not allowed"):
            BatchNormRecalibration(bad)
