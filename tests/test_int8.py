"""int8 export (``compress.export.int8``): onnxruntime runs every convolution on its integer
kernels, a quantized model keeps its own weight codes and activation ranges, accuracy holds,
and the float ONNX of a compressed model is folded to float weights in a default session."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from compress.actquant import activation_quantizers  # noqa: E402
from compress.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from compress.export import main  # noqa: E402
from compress.export.grid import grid_codes  # noqa: E402
from compress.export.int8 import fused_ops, to_int8  # noqa: E402
from compress.export.artifact import quant_meta  # noqa: E402
from compress.export.onnx_model import session, to_onnx  # noqa: E402
from compress.layers import bake, quantizable_layers  # noqa: E402
from compress.models import build  # noqa: E402
from compress.quant import QuantizationCallback, baked_grids  # noqa: E402
from compress.verify import calibration_images  # noqa: E402
from compress.verify import test_set as cifar10_test  # noqa: E402


def pretrained_resnet20(path: Path, calibrate: Callable[..., None] | None = None, quant: tuple | None = None,
                        abits: int | None = None) -> tuple[nn.Module, Checkpoint]:
    """The published ResNet-20, quantized by ``quant`` (and ``abits``-bit activations calibrated
    on random images by ``calibrate``, the ``calibrate_activations`` fixture), baked, with the
    checkpoint compress.train would save."""
    model = build("resnet20")
    model.load_state_dict(load_checkpoint(str(path)).state_dict)
    meta: dict = {}
    if quant:
        QuantizationCallback(*quant).install(model)
    if abits:
        calibrate(model, abits)
    bake(model)
    if quant:
        meta["quant"] = {"mode": quant[0], "nbits": quant[1], "granularity": quant[3] if len(quant) > 3 else "tensor",
                         "grids": baked_grids(model), **({"abits": abits} if abits else {})}
    return model.eval(), Checkpoint(model.state_dict(), {}, meta)


def predictions(source, x: torch.Tensor) -> np.ndarray:
    return session(source).run(["logits"], {"images": x.numpy()})[0].argmax(1)


def test_dense_model_runs_on_integer_kernels_at_float_accuracy(pretrained: Path, data_root: Path) -> None:
    model, ckpt = pretrained_resnet20(pretrained)
    graph = to_int8(ckpt, calibration_images(None, 256, data_root))
    ops = fused_ops(graph.proto)
    assert ops["QLinearConv"] == 19 and ops["QLinearAdd"] == 9 and "Conv" not in ops  # every conv on int8 kernels
    assert len(graph.requantized) == 19 and not graph.exact and not graph.from_model and len(graph.calibrated) == 31
    x, y = (t[:1000] for t in cifar10_test(data_root))
    int8, fp = predictions(graph.proto, x), predictions(to_onnx(ckpt).proto, x)
    assert (int8 == fp).mean() >= 0.97
    assert (int8 == y.numpy()).mean() >= (fp == y.numpy()).mean() - 0.01


def test_sym_weights_keep_their_codes_and_activation_ranges_are_the_models(pretrained: Path, data_root: Path,
                                                                         calibrate_activations) -> None:
    model, ckpt = pretrained_resnet20(pretrained, calibrate_activations, ("sym", 4, "minmax", "channel"), abits=8)
    graph = to_int8(ckpt, calibration_images(None, 128, data_root))
    blocks = [f"{n}.weight" for n in quantizable_layers(model)]
    assert sorted(graph.exact) == sorted(blocks) and graph.requantized == ["conv1.weight"]
    consts = {t.name: numpy_helper.to_array(t) for t in graph.proto.graph.initializer}
    spec = quant_meta(ckpt)
    for key in blocks:  # the model's 4-bit codes, sign-flipped where BatchNorm's scale is negative
        codes = consts[f"{key}.int8"].astype(np.int64)
        assert np.abs(codes).max() <= 7
        ours = grid_codes(key, ckpt.state_dict[key], spec.for_tensor(key)).levels.reshape(codes.shape)
        assert np.array_equal(np.abs(codes), np.abs(ours))
    steps = {f"{name}": float(q.step()) for name, q in activation_quantizers(model).items()}
    assert len(graph.from_model) == 18 == len(steps)
    used = sorted(float(consts[f"{x}.scale"]) for x in graph.from_model)
    assert np.allclose(used, sorted(np.float32(s) for s in steps.values()))
    assert fused_ops(graph.proto)["QLinearConv"] == 19


def test_asym_and_narrow_activations_are_refused_in_one_line(pretrained: Path, data_root: Path, tmp_path: Path, calibrate_activations,
                                                             capsys: pytest.CaptureFixture) -> None:
    model, ckpt = pretrained_resnet20(pretrained, quant=("asym", 4))
    with pytest.raises(ValueError, match="asym weights .* have no integer zero point"):
        to_int8(ckpt, torch.zeros(4, 3, 32, 32))
    _, narrow = pretrained_resnet20(pretrained, calibrate_activations, ("sym", 4), abits=4)
    with pytest.raises(ValueError, match="quant.abits < 8"):
        to_int8(narrow, calibration_images(None, 32, data_root))
    save_checkpoint(tmp_path / "run" / "model.pt", model, ckpt.masks, ckpt.meta)
    assert main([str(tmp_path / "run"), "--int8", str(tmp_path / "m.onnx"), "--data", str(data_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --int8: asym weights") and "\n" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_writes_the_int8_graph_and_reports_it(pretrained: Path, data_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    model, ckpt = pretrained_resnet20(pretrained)
    save_checkpoint(tmp_path / "run" / "model.pt", model, ckpt.masks, ckpt.meta)
    assert main([str(tmp_path / "run"), "--int8", str(tmp_path / "m.onnx"), "--calibration", "128",
                 "--check-images", "500", "--data", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime runs  19 of 19 convs as QLinearConv, 9 QLinearAdd" in out
    assert "on 500 test images (same class" in out and (tmp_path / "m.onnx").stat().st_size < 400_000


def test_a_network_that_is_not_a_resnet_exports_to_int8() -> None:
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    net = mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    ckpt = Checkpoint(net.state_dict(), {}, {"net": {"_target_": "torchvision.models.mobilenet_v2", "num_classes": 10,
                                                     "width_mult": 0.25}})
    graph = to_int8(ckpt, torch.randn(16, 3, 32, 32))
    convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert fused_ops(graph.proto)["QLinearConv"] == convs == len(graph.requantized)


def test_compressed_float_onnx_is_folded_to_float_weights_in_a_default_session(pretrained: Path) -> None:
    """The codes' Cast/Mul/Add and the bit mask's unpacking are constants: a default session folds
    them (and BatchNorm) away, so the compressed file runs the dense graph's kernels."""
    from compress.prune import PruningCallback

    model = build("resnet20")
    model.load_state_dict(load_checkpoint(str(pretrained)).state_dict)
    PruningCallback(0.8, "global").install(model)
    QuantizationCallback("asym", 4).install(model)
    bake(model)
    ckpt = Checkpoint(model.state_dict(), {}, {"quant": {"mode": "asym", "nbits": 4, "granularity": "tensor",
                                                         "grids": baked_grids(model)}})
    graph = to_onnx(ckpt)
    assert "Where(bits)" in graph.describe()
    assert not [t for t in graph.proto.graph.initializer if t.data_type == 9]  # no BOOL (one byte per weight) mask
    ops = fused_ops(graph.proto)
    assert not {"Cast", "Mul", "BitShift", "Where", "BatchNormalization"} & set(ops)
    assert ops == fused_ops(to_onnx(Checkpoint(model.state_dict(), {}, {})).proto)  # the dense file's graph
