"""ONNX export of networks other than the CIFAR ResNets (MobileNetV2, a small user CNN): torch
exports the graph, every quantized weight is stored as integer codes + Cast+Mul that give
back the baked weight bit for bit, and onnxruntime reproduces PyTorch's logits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torchvision = pytest.importorskip("torchvision")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

import compress.verify  # noqa: E402
from compress.data import is_cifar10  # noqa: E402
from compress.checkpoint import Checkpoint  # noqa: E402
from compress.export import cli, onnx_model  # noqa: E402
from compress.export.artifact import quant_meta  # noqa: E402
from compress.export.onnx_model import (MAX_LOGIT_DIFF, OPSET, OnnxModel, compare,  # noqa: E402
                                        module_to_onnx, session, to_onnx, traced)
from compress.layers import bake, baked_grid  # noqa: E402
from compress.models import build  # noqa: E402
from compress.quant import QuantizationCallback  # noqa: E402


class SmallCNN(nn.Module):
    """A user-style CNN: conv-bn-relu twice, global pooling, linear-relu, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))))


NETS = {"cnn": SmallCNN, "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
        "resnet20": lambda: build("resnet20")}


def middle_layers(model: nn.Module) -> list[str]:
    """Every conv/linear layer but the first and the last (the generic default of compress.selection)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1:-1]


def compressed(net: str, quant: tuple | None, layer_nbits: dict[str, int] | None = None,
               shape: tuple[int, int, int] = (3, 32, 32),
               layers: list[str] | None = None) -> tuple[nn.Module, Checkpoint]:
    """A random ``net`` whose middle layers (or ``layers``) are half pruned (smallest magnitudes
    zeroed) and quantized with ``QuantizationCallback(*quant)``'s quantizer (``layer_nbits``:
    their own widths), baked, with BatchNorm statistics estimated on random images; and its
    checkpoint, whose ``meta["quant"]["grids"]`` name the quantized weights as ``compress.train``
    records them."""
    torch.manual_seed(0)
    model = NETS[net]()
    layers = (middle_layers(model) if layers is None else layers) if quant else []
    for name in layers:
        m = model.get_submodule(name)
        with torch.no_grad():
            w = m.weight
            w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
        quantizer = QuantizationCallback(*quant).quantizer(m.weight.detach(), (layer_nbits or {}).get(name))
        parametrize.register_parametrization(m, "weight", quantizer)
    bake(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(32, *shape))
    grids = {f"{n}.weight": {"scale": g[0].flatten().tolist(), "offset": g[1].flatten().tolist()}
             for n in layers if (g := baked_grid(model.get_submodule(n))) is not None}
    meta: dict[str, Any] = {"quant": None}
    if quant:
        meta["quant"] = {"mode": quant[0], "nbits": quant[1], "granularity": quant[3] if len(quant) > 3 else "tensor",
                         "grids": grids, **({"layer_nbits": layer_nbits} if layer_nbits else {})}
    return model.eval(), Checkpoint(model.state_dict(), {}, meta)


def export(net: str, model: nn.Module, ckpt: Checkpoint) -> OnnxModel:
    """``module_to_onnx`` of a fresh ``net`` with the checkpoint's weights and quantized names."""
    quant = quant_meta(ckpt)
    return module_to_onnx(NETS[net](), ckpt.state_dict, quant, quant.grids if quant else (), (3, 32, 32), net)


def graph_values(proto: onnx.ModelProto, names: list[str], shape: tuple[int, ...] = (1, 3, 32, 32)) -> list[np.ndarray]:
    """What onnxruntime computes for the values ``names`` of the graph."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return session(probe).run(names, {"images": np.zeros(shape, np.float32)})


CASES = {  # (net, QuantizationCallback args, layer_nbits pairs): how the quantized weights are stored
    ("cnn", ("sym", 4), None): {"INT4 codes + Cast+Mul": 3},
    ("cnn", ("sym", 4), (("fc1", 8),)): {"INT4 codes + Cast+Mul": 2, "INT8 codes + Cast+Mul": 1},
    ("cnn", ("asym", 3, "minmax", "channel"), None): {"UINT4 codes + Cast+Mul(axis=0)+Add+Where(bits)": 3},
    ("cnn", ("sym", 8, "mse", "channel"), None): {"INT8 codes + Cast+Mul(axis=0)": 3},
    ("cnn", ("asym", 2, "mse", "tensor", True), None): {"UINT4 codes + Cast+Mul+Add+Where(bits)": 3},
    ("mobilenet_v2", ("asym", 4, "minmax", "channel"), None): {"UINT4 codes + Cast+Mul(axis=0)+Add+Where(bits)": 51},
    ("mobilenet_v2", ("sym", 6), None): {"INT8 codes + Cast+Mul": 51},
}
CODE_TYPES = {"INT4": TensorProto.INT4, "UINT4": TensorProto.UINT4, "INT8": TensorProto.INT8}


@pytest.mark.parametrize(("net", "quant", "layer_nbits"), list(CASES))
def test_codes_give_back_the_baked_weights_and_logits(net: str, quant: tuple, layer_nbits: tuple | None) -> None:
    model, ckpt = compressed(net, quant, dict(layer_nbits or ()))
    graph = export(net, model, ckpt)
    names = [f"{n}.weight" for n in middle_layers(model)]
    assert sorted(graph.coded) == sorted(names) == sorted(ckpt.meta["quant"]["grids"])
    assert graph.proto.opset_import[0].version == OPSET and graph.proto.graph.name == net

    kinds = CASES[net, quant, layer_nbits]
    assert graph.describe() == "; ".join([*(f"{n} quantized weights as {k}" for k, n in sorted(kinds.items())),
                                          "the rest float32"])
    inits = {t.name: t for t in graph.proto.graph.initializer}
    for name in names:  # codes in the graph, no float32 copy left
        assert name not in inits
        assert inits[f"{name}.codes"].data_type == CODE_TYPES[graph.coded[name].onnx_type], name
    floats = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name in (f"{floats[0]}.weight", f"{floats[-1]}.weight"):  # unquantized layers stay float32
        assert inits[name].data_type == TensorProto.FLOAT
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(n.op_type == "BatchNormalization" for n in graph.proto.graph.node) == bns  # none folded

    readers = {n.input[1]: n.op_type for n in graph.proto.graph.node if n.op_type in ("Conv", "Gemm")}
    values = graph_values(graph.proto, [graph.weights[n] for n in names])
    for name, v in zip(names, values):  # what the layer reads is the baked weight, bit for bit
        assert readers[graph.weights[name]] in ("Conv", "Gemm"), name
        baked = model.state_dict()[name].numpy()
        assert v.dtype == np.float32 and np.array_equal(v.view(np.uint32), baked.view(np.uint32)), name
        assert (v == 0).any(), name  # pruned zeros survive

    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    agreement = compare(graph.proto, model, x, batch=5)  # batches of 5 and 2: the batch is dynamic
    assert agreement.max_abs_diff <= MAX_LOGIT_DIFF and agreement.argmax_agreement == 1.0 and agreement.ok


def test_unquantized_network_exports_float32() -> None:
    model, ckpt = compressed("cnn", None)
    graph = export("cnn", model, ckpt)
    assert not graph.coded and graph.describe() == "every weight float32 (no quantized weights)"
    assert all(t.data_type in (TensorProto.FLOAT, TensorProto.INT64) for t in graph.proto.graph.initializer)
    assert {t.name for t in graph.proto.graph.initializer} >= {"features.0.weight", "fc1.weight", "fc2.bias"}
    agreement = compare(graph.proto, model, torch.randn(8, 3, 32, 32), batch=8)
    assert agreement.max_abs_diff <= MAX_LOGIT_DIFF and agreement.argmax_agreement == 1.0


def test_to_onnx_exports_any_network_from_its_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """``to_onnx`` takes what is quantized from the recorded grids, the input size from
    ``meta["data"]``, the name from ``meta["net"]``, the network from ``reference``."""
    model, ckpt = compressed("cnn", ("asym", 4), shape=(3, 40, 40))
    ckpt.meta |= {"net": {"_target_": "tests.test_onnx_any.SmallCNN", "num_classes": 10},
                  "data": {"num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 40}}
    monkeypatch.setattr(onnx_model, "reference", lambda c: SmallCNN(c.meta["net"]["num_classes"]))
    graph = to_onnx(ckpt)
    assert graph.proto.graph.name == "SmallCNN"
    assert sorted(graph.coded) == ["fc1.weight", "features.3.weight", "features.6.weight"]
    dims = [d.dim_param or d.dim_value for d in graph.proto.graph.input[0].type.tensor_type.shape.dim]
    assert graph.proto.graph.input[0].name == "images" and dims == ["batch", 3, 40, 40]
    assert graph.proto.graph.output[0].name == "logits"
    agreement = compare(graph.proto, model, torch.randn(4, 3, 40, 40))
    assert agreement.max_abs_diff <= MAX_LOGIT_DIFF and agreement.argmax_agreement == 1.0
    del ckpt.meta["quant"]["grids"]
    with pytest.raises(ValueError, match="no grids recorded"):
        to_onnx(ckpt)


def test_resnet_with_its_own_layer_selection_keeps_the_hand_written_graph() -> None:
    """A CIFAR ResNet whose stem and classifier were quantized too (``quant.layers``): the
    hand-written graph, with the weights the recorded grids name as codes."""
    layers = ["conv1", "layer1.0.conv1", "layer3.2.conv2", "linear"]
    model, ckpt = compressed("resnet20", ("asym", 4, "minmax", "channel"), layers=layers)
    graph = to_onnx(ckpt)
    names = [f"{n}.weight" for n in layers]
    assert graph.proto.graph.name == "resnet20" and sorted(graph.coded) == sorted(names)
    assert graph.describe() == "4 quantized weights as UINT4 codes + Cast+Mul(axis=0)+Add+Where(bits); the rest float32"
    readers = {n.input[1]: n.name for n in graph.proto.graph.node if n.op_type in ("Conv", "Gemm")}
    assert readers[graph.weights["linear.weight"]] == "logits" and readers[graph.weights["conv1.weight"]] == "conv1.out"
    for name, v in zip(names, graph_values(graph.proto, [graph.weights[n] for n in names])):
        assert np.array_equal(v, model.state_dict()[name].numpy()), name
    agreement = compare(graph.proto, model, torch.randn(8, 3, 32, 32), batch=8)
    assert agreement.max_abs_diff <= MAX_LOGIT_DIFF and agreement.argmax_agreement == 1.0
    ckpt.meta["quant"]["grids"]["bn1.weight"] = {"scale": [1.0], "offset": [0.0]}
    with pytest.raises(ValueError, match=r"grids recorded for \['bn1.weight'\], which are no conv or linear weights"):
        to_onnx(ckpt)


def test_off_grid_weight_and_changed_initializer_raise() -> None:
    model, ckpt = compressed("cnn", ("sym", 4))
    sd = dict(ckpt.state_dict)
    sd["fc1.weight"] = sd["fc1.weight"] + 1e-3
    with pytest.raises(ValueError, match="fc1.weight: .* off their recorded sym 4-bit grid"):
        module_to_onnx(SmallCNN(), sd, quant_meta(ckpt), ["fc1.weight"])
    graph = traced(model, (3, 32, 32)).graph
    w = ckpt.state_dict["fc1.weight"]
    assert onnx_model._initializer_of(graph, "fc1.weight", w) == "fc1.weight"
    with pytest.raises(RuntimeError, match=r"export bug: fc1\.weight .*\(changed by the exporter\)"):
        onnx_model._initializer_of(graph, "fc1.weight", w * 2)
    next(t for t in graph.initializer if t.name == "fc1.weight").name = "renamed"
    assert onnx_model._initializer_of(graph, "fc1.weight", w) == "renamed"  # found by its values


def test_cli_test_images_follow_the_checkpoint_dataset(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    cifar_yaml = "data:\n  _target_: compress.data.CIFAR10Data\n  root: null\n  batch_size: 128\n"
    assert is_cifar10(cli.data_config(Checkpoint({}, {}, {"config": cifar_yaml})))
    assert is_cifar10(cli.data_config(Checkpoint({}, {}, {"quant": None})))  # older checkpoints
    cifar_meta = {"num_classes": 10, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "image_size": 32}
    assert is_cifar10(cli.data_config(Checkpoint({}, {}, {"data": cifar_meta})))
    other_meta = {**cifar_meta, "num_classes": 100, "image_size": 48}
    bare = Checkpoint({}, {}, {"data": other_meta})  # no data config naming its dataset
    assert not is_cifar10(cli.data_config(bare))
    assert cli._test_images(1000, None, bare).shape == (cli.RANDOM_IMAGES, 3, 48, 48)
    assert "note: no test images of this dataset (ValueError: the checkpoint's data config names no _target_)" \
        in capsys.readouterr().out

    other_cfg = {"_target_": "compress.data.CIFAR100Data", "root": None, **other_meta}
    other = Checkpoint({}, {}, {"data": other_meta, "config": {"seed": 0, "data": other_cfg}})
    assert cli.data_config(other) == other_cfg and not is_cifar10(other_cfg)

    def missing(cfg: dict, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise FileNotFoundError(f"{root}: no test split")

    monkeypatch.setattr(compress.verify, "test_tensors", missing, raising=False)
    assert cli._test_images(1000, "/nowhere", other).shape == (cli.RANDOM_IMAGES, 3, 48, 48)
    assert "FileNotFoundError: /nowhere: no test split); checking onnxruntime on 256 random 3x48x48 inputs" \
        in capsys.readouterr().out
    seen = []

    def found(cfg: dict, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((cfg, root))
        return torch.zeros(50, 3, 48, 48), torch.zeros(50, dtype=torch.long)

    monkeypatch.setattr(compress.verify, "test_tensors", found, raising=False)
    assert cli._test_images(20, "/data", other).shape == (20, 3, 48, 48)
    assert cli._test_images(20, None, other).shape == (20, 3, 48, 48)
    assert seen == [(other_cfg, "/data"), (other_cfg, None)]  # None: the config's own root
