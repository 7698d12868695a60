"""Activation fake quantization (``quant.abits``): the levels, the two range modes, the slots
in the residual blocks, calibration, and a model that leaves PyTorch (artifact, ONNX) intact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from compress.actquant import ActFakeQuant, activation_quantizers, check_abits, install
from compress.checkpoint import Checkpoint, load_checkpoint
from compress.export import export, load
from compress.layers import bake
from compress.models import build
from compress.quant import QuantizationCallback, baked_grids


def settled(nbits: int, learn: bool, value: float = 1.0) -> ActFakeQuant:
    q = ActFakeQuant(nbits, learn)
    q.settle(torch.tensor(value))
    return q


def test_levels_are_unsigned_multiples_of_the_step_clipped_at_the_range() -> None:
    q = settled(2, learn=False).eval()
    x = torch.tensor([-1.0, 0.0, 0.1, 0.2, 0.5, 0.9, 1.0, 7.0])
    y = q(x)
    assert torch.allclose(y, torch.tensor([0, 0, 0, 1 / 3, 2 / 3, 1, 1, 1]))
    assert len(torch.unique(q(torch.rand(10_000) * 2))) == 4


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_learned_and_fixed_ranges_compute_the_same_values(nbits: int) -> None:
    x = torch.rand(4, 16, 8, 8) * 3
    fixed, learned = settled(nbits, False, 2.5).eval(), settled(nbits, True, 2.5).eval()
    assert torch.equal(fixed(x), learned(x))
    assert len(torch.unique(fixed(x))) <= 2**nbits


def test_gradients_straight_through_inside_zero_where_clipped_and_to_a_learned_range() -> None:
    x = torch.tensor([0.2, 0.4, 3.0], requires_grad=True)
    q = settled(3, learn=True, value=1.0).train()
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]
    assert q.range.grad is not None and q.range.grad != 0


def test_a_fixed_range_follows_the_batch_maxima_while_training() -> None:
    q = settled(4, learn=False, value=1.0).train()
    q(torch.full((8,), 2.0))
    assert float(q.range) == pytest.approx(1.1)  # 0.9 * 1 + 0.1 * 2
    q.eval()(torch.full((8,), 5.0))
    assert float(q.range) == pytest.approx(1.1)  # evaluation leaves it alone
    with torch.no_grad():  # nor does a no-grad pass in training mode (BatchNorm re-estimation)
        q.train()(torch.full((8,), 5.0))
    assert float(q.range) == pytest.approx(1.1)


def test_a_learned_range_moves_its_step_as_lsq_moves_a_learned_step() -> None:
    """LSQ's step gradient is dL/ds * g, g = 1/sqrt(N * top); the range r = s * top gets
    dL/dr * g * top^2 = dL/ds * g * top, so an SGD step on r moves s = r / top by LSQ's amount."""
    x = torch.rand(2, 4, 3, 3) * 2
    q = settled(4, learn=True, value=1.0).train()
    q(x).sum().backward()
    s = torch.tensor(1.0 / 15, requires_grad=True)  # LSQ on the step itself, same forward
    (torch.round((x / s).clamp(0, 15)) * s + ((x / s).clamp(0, 15) - (x / s).clamp(0, 15).detach()) * s).sum().backward()
    g = 1 / (x[0].numel() * 15) ** 0.5
    assert float(q.range.grad) / 15 == pytest.approx(float(s.grad) * g, rel=1e-4)


def test_slots_are_identities_until_installed(block_names: set[str]) -> None:
    model = build("resnet20")
    plain = set(model.state_dict())
    assert not activation_quantizers(model)
    found = install(model, 4)
    assert len(found) == 18 and {n.rpartition(".")[0] for n in found} == {n.rpartition(".")[0] for n in block_names}
    assert install(model, 2) == found  # already there: left alone
    assert set(model.state_dict()) - plain == {f"{n}.range" for n in found}


@pytest.mark.parametrize(("value", "ok"), [(None, True), (2, True), (8, True), (1, False), (9, False), (True, False),
                                           ("4", False)])
def test_abits_checked(value: object, ok: bool) -> None:
    if ok:
        assert check_abits(value) == value
    else:
        with pytest.raises(ValueError, match=r"quant.abits=.* is not allowed"):
            check_abits(value)


def calibrated_resnet(calibrate: Callable[..., None], learn: bool = False) -> tuple[nn.Module, Checkpoint]:
    """A random ResNet-20 with 4-bit asym weights and 4-bit activations calibrated on random
    images through the callback (``calibrate``: the ``calibrate_activations`` fixture), baked,
    with the checkpoint compress.train would save."""
    torch.manual_seed(0)
    model = build("resnet20")
    for m in model.modules():  # BatchNorm statistics of random images: a trained net's scale
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(64, 3, 32, 32))
    QuantizationCallback("asym", 4).install(model)
    calibrate(model, 4, learn, batches=3)
    bake(model)
    meta = {"quant": {"mode": "asym", "nbits": 4, "granularity": "tensor", "grids": baked_grids(model), "abits": 4}}
    return model.eval(), Checkpoint(model.state_dict(), {}, meta)


def test_calibration_sets_every_range_once_from_the_training_batches(
        calibrate_activations: Callable[..., None]) -> None:
    model, _ = calibrated_resnet(calibrate_activations)
    ranges = {n: float(q.range) for n, q in activation_quantizers(model).items()}
    assert all(r > 0 for r in ranges.values())
    assert not any(q.observing or q.observed for q in activation_quantizers(model).values())


def test_artifact_reloads_the_activation_quantizers_to_the_same_logits(
        calibrate_activations: Callable[..., None]) -> None:
    model, ckpt = calibrated_resnet(calibrate_activations, learn=True)
    reloaded = load(export(ckpt))
    assert len(activation_quantizers(reloaded)) == 18
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert not torch.equal(reloaded(x), load(export(Checkpoint(
        {k: v for k, v in ckpt.state_dict.items() if not k.endswith(".range")}, {},
        {"quant": {k: v for k, v in ckpt.meta["quant"].items() if k != "abits"}}))).eval()(x))


def test_onnx_quantizes_the_activations_as_pytorch_does(calibrate_activations: Callable[..., None]) -> None:
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import helper

    from compress.export.onnx_model import compare, session, to_onnx

    model, ckpt = calibrated_resnet(calibrate_activations)
    graph = to_onnx(ckpt)
    assert sum(n.op_type == "Round" for n in graph.proto.graph.node) == 18
    x = torch.randn(64, 3, 32, 32)
    agreement = compare(graph.proto, model, x, batch=32)
    assert agreement.activation_quantizers == 18 and agreement.ok and agreement.argmax_agreement == 1.0
    # the quantizer itself is the same arithmetic: fed identical inputs, ORT's levels are PyTorch's
    mid = "layer2.1.act_mid"
    (relu,) = [n.input[0] for n in graph.proto.graph.node if n.name == f"{mid}.scaled"]
    probe = onnx.ModelProto()
    probe.CopyFrom(graph.proto)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in (relu, mid))
    before, after = session(probe).run([relu, mid], {"images": x.numpy()})
    with torch.no_grad():
        assert torch.equal(model.get_submodule(mid)(torch.from_numpy(before)), torch.from_numpy(after))


def test_the_onnx_check_allows_a_few_level_flips_per_activation_quantizer() -> None:
    """A last-bit difference can move an activation a level; each quantizer may cost 0.01% of the
    classes, no more (the published W8A8 ResNet-56: 54 quantizers, 99.84% the same class)."""
    pytest.importorskip("onnxruntime")
    from compress.export.onnx_model import Agreement

    resnet56 = Agreement(10_000, 0.81, 0.9984, activation_quantizers=54)
    assert resnet56.ok and resnet56.min_agreement == pytest.approx(0.9936)
    assert "FAILED" in Agreement(10_000, 0.81, 0.99, activation_quantizers=54).describe()
    assert not Agreement(10_000, 1e-5, 0.9984).ok  # float activations: 99.9% the same class stands


@pytest.mark.slow  # an end-to-end run of half a minute or more: .ci/run runs it with -m slow
def test_a_w4a4_run_saves_what_it_computed(run_app, data_root: Path, pretrained: Path) -> None:
    proc = run_app("budget=debug", "quant=asym", "nbits=4", "quant.abits=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((proc.run_dir / "metrics.json").read_text())
    assert metrics["choices"]["abits"] == 4 and metrics["max_distinct_values"] <= 16
    saved = load_checkpoint(str(proc.run_dir / "model.pt"))
    assert saved.meta["quant"]["abits"] == 4
    reloaded = load(proc.run_dir / "model.cpk")
    ranges = {n: float(q.range) for n, q in activation_quantizers(reloaded).items()}
    assert len(ranges) == 18 and all(r > 0 for r in ranges.values())
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in saved.state_dict.items())


def test_abits_out_of_range_is_one_line(run_app) -> None:
    proc = run_app("quant=asym", "quant.abits=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: quant.abits=1 is not allowed: use null (weights only) or an integer in 2..8"]
