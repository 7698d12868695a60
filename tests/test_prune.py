"""Magnitude pruning: masks against torch.nn.utils.prune, the schedule, and zeros that stay zero."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as tprune

from compress.layers import bake, prunable_layers, with_parametrization
from compress.prune import Mask, PruningCallback, check_sparsity, current_masks, magnitude_masks, prune_count
from compress.quant import FakeQuant, QuantizationCallback
from compress.stats import distinct_values, sparsity

SPARSITIES = (0.0, 0.1, 0.37, 0.5, 0.8, 0.95)


def small_layers(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"fc": nn.Linear(20, 30), "conv": nn.Conv2d(4, 8, 3), "conv_b": nn.Conv2d(8, 6, 1), "head": nn.Linear(7, 3)}


def prunable_numels(model: nn.Module) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in prunable_layers(model).items()}


def zero_counts(model: nn.Module) -> dict[str, int]:
    return {n: int((m.weight == 0).sum()) for n, m in prunable_layers(model).items()}


@pytest.mark.parametrize("amount", SPARSITIES)
def test_layer_masks_match_torch_l1_unstructured(amount: float) -> None:
    for name, layer in small_layers().items():
        ours = magnitude_masks({name: layer.weight.detach()}, amount, "layer")[name]
        tprune.l1_unstructured(layer, "weight", amount=prune_count(amount, layer.weight.numel()))
        assert ours.dtype == torch.bool and ours.shape == layer.weight.shape
        assert torch.equal(ours, layer.weight_mask.bool()), name


@pytest.mark.parametrize("amount", SPARSITIES)
def test_global_masks_match_torch_global_unstructured(amount: float) -> None:
    layers = small_layers(seed=1)
    ours = magnitude_masks({n: m.weight.detach() for n, m in layers.items()}, amount, "global")
    total = sum(m.weight.numel() for m in layers.values())
    tprune.global_unstructured([(m, "weight") for m in layers.values()], pruning_method=tprune.L1Unstructured,
                               amount=prune_count(amount, total))
    for name, layer in layers.items():
        assert torch.equal(ours[name], layer.weight_mask.bool()), name
    assert sum(int((~k).sum()) for k in ours.values()) == prune_count(amount, total)
    assert sum(int((~k).sum()) for k in ours.values()) >= amount * total


def test_global_masks_differ_per_layer() -> None:
    """One threshold for all: a layer of large weights keeps more of them than one of small ones."""
    torch.manual_seed(2)
    weights = {"big": torch.randn(400) * 10, "small": torch.randn(400) * 0.1}
    masks = magnitude_masks(weights, 0.5, "global")
    assert masks["big"].float().mean() > 0.9 and masks["small"].float().mean() < 0.1


def test_magnitude_masks_rejects_bad_scope() -> None:
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks({"w": torch.randn(4)}, 0.5, "channel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scope"):
        PruningCallback(0.5, "channel")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "a", "0.5", None, True])
def test_check_sparsity_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"prune\.sparsity"):
        check_sparsity(bad)
    with pytest.raises(ValueError, match=r"prune\.sparsity"):
        PruningCallback(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("ok", [0, 0.0, 0.5, 0.8, 0.999])
def test_check_sparsity_accepts(ok: float) -> None:
    assert check_sparsity(ok) == ok and isinstance(check_sparsity(ok), float)


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_ramp_epochs_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="ramp_epochs"):
        PruningCallback(0.8, "layer", bad)  # type: ignore[arg-type]


def test_schedule_oneshot() -> None:
    cb = PruningCallback(0.8, "layer", ramp_epochs=0)
    assert [cb.sparsity_after(e) for e in range(21)] == [0.8] * 21


def test_schedule_iterative() -> None:
    cb = PruningCallback(0.8, "layer", ramp_epochs=10)
    for e in range(21):
        assert cb.sparsity_after(e) == pytest.approx(min(0.08 * e, 0.8), abs=1e-12), e
    assert cb.sparsity_after(0) == 0.0 and cb.sparsity_after(10) == pytest.approx(0.8)


@pytest.mark.parametrize("scope", ("layer", "global"))
def test_epoch_end_follows_cumulative_ramp(resnet: nn.Module, scope: str) -> None:
    cb = PruningCallback(0.8, scope, ramp_epochs=10)
    cb.setup(None, resnet, "fit")  # type: ignore[arg-type]
    numels = prunable_numels(resnet)
    total = sum(numels.values())
    assert sum(zero_counts(resnet).values()) == 0  # epoch 0 of a ramp: nothing pruned yet
    previous = current_masks(resnet)
    for done in range(1, 13):
        cb.on_train_epoch_end(SimpleNamespace(current_epoch=done - 1), resnet)  # type: ignore[arg-type]
        target = min(0.08 * done, 0.8)
        zeros = zero_counts(resnet)
        if scope == "layer":
            for n, k in zeros.items():
                assert abs(k - target * numels[n]) <= 1, (done, n)
        else:
            assert abs(sum(zeros.values()) - target * total) <= 1, done
        masks = current_masks(resnet)
        for n in masks:  # already pruned weights stay pruned
            assert not (masks[n] & ~previous[n]).any()
        previous = masks
    assert sparsity(resnet)["overall"] == pytest.approx(0.8, abs=1e-4)


def test_oneshot_install_layer_scope(resnet: nn.Module) -> None:
    PruningCallback(0.8, "layer", ramp_epochs=0).install(resnet)
    zeros, numels = zero_counts(resnet), prunable_numels(resnet)
    assert len(numels) == 20  # stem conv + 18 block convs + linear
    for n, k in zeros.items():
        # ceil(0.8 * numel) weights: every layer reaches 80.0%, by less than one weight more
        assert k == math.ceil(0.8 * numels[n] - 1e-6), n
        assert 0.8 <= k / numels[n] < 0.8 + 1 / numels[n], n
    assert sparsity(resnet)["overall"] >= 0.8 - 1e-4
    assert set(with_parametrization(resnet, Mask)) == set(numels)


def test_oneshot_install_global_scope(resnet: nn.Module) -> None:
    PruningCallback(0.8, "global", ramp_epochs=0).install(resnet)
    total = sum(prunable_numels(resnet).values())
    assert sum(zero_counts(resnet).values()) == math.ceil(0.8 * total - 1e-6)
    assert sparsity(resnet)["overall"] >= 0.8
    # the layer sparsities differ: one threshold over all of them
    assert len({round(v, 3) for v in sparsity(resnet)["layers"].values()}) > 1


@pytest.mark.parametrize("scope", ("layer", "global"))
def test_pruning_is_cumulative_not_compounding(resnet: nn.Module, scope: str) -> None:
    cb = PruningCallback(0.4, scope, ramp_epochs=0)
    cb.install(resnet)
    first = current_masks(resnet)
    cb.prune(resnet, 0.8)
    total = sum(prunable_numels(resnet).values())
    zeros = sum(zero_counts(resnet).values())
    assert abs(zeros - 0.8 * total) <= len(first)  # 0.8 of all weights (rounding per layer), not 1-0.6*0.2=0.88
    assert sparsity(resnet)["overall"] == pytest.approx(0.8, abs=1e-3)
    second = current_masks(resnet)
    assert all(not (second[n] & ~first[n]).any() for n in first)


def test_initial_masks_are_kept(resnet: nn.Module) -> None:
    torch.manual_seed(3)
    masks = {n: torch.rand_like(m.weight) > 0.3 for n, m in prunable_layers(resnet).items()}
    PruningCallback(0.0, masks=masks).install(resnet)
    for n, m in prunable_layers(resnet).items():
        assert torch.equal(m.weight == 0, ~masks[n]), n
    assert all(torch.equal(current_masks(resnet)[n], masks[n]) for n in masks)


def test_initial_mask_shape_mismatch(resnet: nn.Module) -> None:
    with pytest.raises(ValueError, match="shape"):
        PruningCallback(0.0, masks={"conv1": torch.ones(3, 3, dtype=torch.bool)}).install(resnet)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=5e-4),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("scope", ("layer", "global"))
def test_zeros_survive_optimizer_steps(resnet: nn.Module, opt: str, scope: str) -> None:
    PruningCallback(0.8, scope, ramp_epochs=0).install(resnet)
    masks = current_masks(resnet)
    before = {n: m.weight.detach().clone() for n, m in prunable_layers(resnet).items()}
    optimizer = OPTIMIZERS[opt](resnet.parameters())
    for step in range(3):
        train_steps(resnet, optimizer, steps=2, seed=step)
        for n, m in prunable_layers(resnet).items():
            assert (m.weight[~masks[n]] == 0).all(), (step, n)
    # training did change the kept weights
    assert any(not torch.equal(m.weight.detach(), before[n]) for n, m in prunable_layers(resnet).items())
    PruningCallback.remove(resnet)
    for n, m in prunable_layers(resnet).items():
        assert not parametrize.is_parametrized(m)
        assert (m.weight[~masks[n]] == 0).all(), n
    assert sparsity(resnet)["overall"] >= 0.8 - 1e-4


@pytest.mark.parametrize("mode", ("sym", "asym"))
def test_prune_then_quant_keeps_zeros(resnet: nn.Module, block_names: set[str], mode: str) -> None:
    nbits = 3
    PruningCallback(0.8, "global", ramp_epochs=0).install(resnet)
    QuantizationCallback(mode, nbits).install(resnet)
    # the mask comes first, so the quantizer sees the masked weights
    for n in block_names:
        chain = resnet.get_submodule(n).parametrizations.weight
        assert [type(p) for p in chain] == [Mask, FakeQuant], n
    masks = current_masks(resnet)
    optimizer = torch.optim.SGD(resnet.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train_steps(resnet, optimizer, steps=4)
    bake(resnet)
    assert not with_parametrization(resnet, Mask) and not with_parametrization(resnet, FakeQuant)
    for n, m in prunable_layers(resnet).items():
        assert (m.weight[~masks[n]] == 0).all(), n
    limit = 2**nbits if mode == "asym" else 2**nbits - 2
    counts = distinct_values(resnet)
    assert set(counts) == block_names
    assert all(0 < c <= limit for c in counts.values()), counts
    # stem conv and linear are pruned but not quantized
    for n in ("conv1", "linear"):
        w = resnet.get_submodule(n).weight.detach()
        assert torch.unique(w[w != 0]).numel() > limit
    assert sparsity(resnet)["overall"] >= 0.8 - 1e-4


def test_plan_builds_configured_schedules() -> None:
    """The composed prune configs give the documented schedules (oneshot at once, iterative ramp)."""
    from hydra import compose, initialize_config_dir

    from compress.methods import build
    from compress.stages import plan

    expected = {"oneshot": [0.8] * 21, "iterative": [min(0.08 * e, 0.8) for e in range(21)]}
    expected["global"] = expected["iterative"]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        for method, schedule in expected.items():
            cfg = compose("config", overrides=[f"prune={method}"])
            (stage,) = plan(cfg, [build(cfg.prune, "prune")], "test")
            (cb,) = stage.callbacks({})
            assert isinstance(cb, PruningCallback)
            assert cb.scope == ("global" if method == "global" else "layer")
            assert [cb.sparsity_after(e) for e in range(21)] == pytest.approx(schedule), method
            assert stage.epochs == 20 and cb.choices() == {"prune": method}
