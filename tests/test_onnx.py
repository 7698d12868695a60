"""ONNX export: the graph holds the baked weights exactly (codes + Cast+Mul for the
quantized convs), onnxruntime reproduces PyTorch's logits, and the CLI checks it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import helper  # noqa: E402

from compress.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from compress.export import main  # noqa: E402
from compress.export.onnx_model import MAX_LOGIT_DIFF, compare, session, to_onnx  # noqa: E402
from compress.layers import bake, quantizable_layers  # noqa: E402
from compress.models import build  # noqa: E402
from compress.prune import PruningCallback, current_masks  # noqa: E402
from compress.quant import QuantizationCallback, baked_grids  # noqa: E402


def baked(arch: str, prune: bool, quant: tuple | None, seed: int = 0) -> tuple[nn.Module, Checkpoint]:
    """A random ``arch``, pruned to 80% and/or quantized, baked, with the checkpoint
    compress.train would save for it. Its BatchNorm statistics are estimated on random images,
    so activations and logits have a trained network's scale (a deep net with made-up
    statistics has logits in the thousands, where float32 rounding alone exceeds 1e-4)."""
    torch.manual_seed(seed)
    model = build(arch)
    masks: dict[str, torch.Tensor] = {}
    if prune:
        PruningCallback(0.8, "global").install(model)
        masks = current_masks(model)
    if quant:
        QuantizationCallback(*quant).install(model)
    bake(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        model.train()(torch.randn(64, 3, 32, 32))
    granularity = quant[3] if quant and len(quant) > 3 else "tensor"
    meta = {"quant": {"mode": quant[0], "nbits": quant[1], "granularity": granularity, "grids": baked_grids(model)}
            if quant else None}
    return model.eval(), Checkpoint(model.state_dict(), masks, meta)


CASES = {  # (arch, prune, quant): how the quantized convs are stored
    ("resnet20", True, ("sym", 4)): "INT4 codes + Cast+Mul",
    ("resnet20", False, ("asym", 3)): "UINT4 codes + Cast+Mul+Add",
    ("resnet20", False, ("sym", 6)): "INT8 codes + Cast+Mul",
    ("resnet32", True, ("asym", 6)): "UINT8 codes + Cast+Mul+Add+Where(bits)",
    ("resnet56", True, ("asym", 4)): "UINT4 codes + Cast+Mul+Add+Where(bits)",
    ("resnet44", True, None): None,
    # QuantizationCallback(mode, nbits, clip, granularity, learn_range)
    ("resnet20", True, ("asym", 3, "minmax", "channel")): "UINT4 codes + Cast+Mul(axis=0)+Add+Where(bits)",
    ("resnet20", False, ("sym", 4, "mse", "channel", True)): "INT4 codes + Cast+Mul(axis=0)",
    ("resnet32", True, ("asym", 2, "mse", "tensor", True)): "UINT4 codes + Cast+Mul+Add+Where(bits)",
}


def weight_values(proto: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """What onnxruntime computes for the weight inputs of the convolutions ``names``."""
    convs = {n.name.removesuffix(".out"): n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(convs[n], onnx.TensorProto.FLOAT, None) for n in names)
    sess = session(probe)
    return dict(zip(names, sess.run([convs[n] for n in names], {"images": np.zeros((1, 3, 32, 32), np.float32)})))


@pytest.mark.parametrize(("arch", "prune", "quant"), list(CASES))
def test_onnx_holds_the_weights_and_matches_pytorch(arch: str, prune: bool, quant: tuple | None) -> None:
    model, ckpt = baked(arch, prune, quant)
    graph = to_onnx(ckpt)
    assert graph.proto.graph.name == arch
    convs = list(quantizable_layers(model))
    if quant:
        assert set(graph.coded) == {f"{n}.weight" for n in convs}
        assert graph.describe().startswith(f"{len(convs)} block convs as {CASES[arch, prune, quant]};")
    else:
        assert not graph.coded and "no quantized weights" in graph.describe()
    values = weight_values(graph.proto, ["conv1", *convs])
    for name, v in values.items():  # bit for bit, zeros included
        assert np.array_equal(v, model.get_submodule(name).weight.detach().numpy()), name
    if prune:
        assert all((v == 0).any() for v in values.values())
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    agreement = compare(graph.proto, model, x, batch=32)
    assert agreement.max_abs_diff <= MAX_LOGIT_DIFF and agreement.argmax_agreement == 1.0
    assert agreement.ok and agreement.images == 64


def test_codes_make_the_file_small() -> None:
    _, dense = baked("resnet20", False, None)
    _, sym4 = baked("resnet20", False, ("sym", 4))
    fp32 = len(to_onnx(dense).proto.SerializeToString())
    assert fp32 > 4 * sum(t.numel() for t in dense.state_dict.values())
    assert len(to_onnx(sym4).proto.SerializeToString()) < 0.2 * fp32  # 4-bit codes, fp32 stem/classifier/BN


def test_cli_writes_and_checks_onnx(tmp_path: Path, capsys: pytest.CaptureFixture, data_root: Path) -> None:
    model, ckpt = baked("resnet56", True, ("asym", 4))
    save_checkpoint(tmp_path / "run" / "model.pt", model, ckpt.masks, ckpt.meta)
    assert main([str(tmp_path / "run"), "--onnx", str(tmp_path / "m.onnx"), "--check-images", "1000",
                 "--data", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "model.cpk").is_file() and (tmp_path / "m.onnx").is_file()
    assert f"onnx_bytes        {(tmp_path / 'm.onnx').stat().st_size:>10,}  (model.cpk " in out
    assert "54 block convs as UINT4 codes + Cast+Mul+Add+Where(bits)" in out
    assert "onnxruntime vs PyTorch on 1000 images" in out and out.rstrip().endswith(": ok")


def test_cli_onnx_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, ckpt = baked("resnet20", False, None)
    save_checkpoint(tmp_path / "run" / "model.pt", model, ckpt.masks, ckpt.meta)
    args = [str(tmp_path / "run"), "--onnx", str(tmp_path / "m.onnx")]
    assert main([*args, "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "nowhere" in err
    assert not (tmp_path / "run" / "model.cpk").exists()  # nothing written before the inputs are checked
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--check-images", "-3"])
    assert exit_.value.code == 2 and "'-3' is not allowed: use an integer >= 0" in capsys.readouterr().err
    assert main([*args, "--check-images", "0"]) == 0  # no check, no data needed
    assert (tmp_path / "m.onnx").is_file()


def test_a_published_run_dir_with_only_model_cpk_exports(tmp_path: Path, data_root: Path, capsys) -> None:
    """A published run keeps model.cpk and metrics.json, no model.pt: --onnx works from those."""
    from compress.export.cli import main

    published = sorted(Path(__file__).resolve().parents[1].glob(
        "multirun/published/best-full/runs/table3_4_best/nbits=2,prune=global,quant=asym"))
    if not published:
        pytest.skip("no published run in this checkout")
    for name in ("metrics.json", "model.cpk"):
        (tmp_path / name).write_bytes((published[0] / name).read_bytes())
    assert main([str(tmp_path), "--onnx", str(tmp_path / "m.onnx"), "--check-images", "200",
                 "--data", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "18 block convs as UINT4 codes + Cast+Mul(axis=0)+Add+Where(bits)" in out and ": ok" in out
    assert (tmp_path / "model.cpk").read_bytes() == (published[0] / "model.cpk").read_bytes()  # kept as it is
