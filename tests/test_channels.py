"""Channel pruning (prune=channel): a smaller dense network that trains, saves, reloads and exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

pytest.importorskip("torch_pruning")

from compress.channels import ChannelPruning, count_macs  # noqa: E402
from compress.checkpoint import Checkpoint, apply_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from compress.export import export, load  # noqa: E402
from compress.models import resnet20  # noqa: E402

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def pruned(model: nn.Module, **kw) -> ChannelPruning:
    method = ChannelPruning(**kw)
    method.prepare(model)
    method.prune(model)
    return method


def test_resnet_loses_only_block_internal_channels_to_half_the_macs(resnet: nn.Module) -> None:
    dense_macs = count_macs(resnet, X[:1])[0]
    method = pruned(resnet, macs_speedup=2.0)
    macs, params = count_macs(resnet, X[:1])
    assert macs * 2 <= dense_macs and method.after == (macs, params) and method.before[0] == dense_macs
    for stage, width in (("layer1", 16), ("layer2", 32), ("layer3", 64)):
        for block in resnet.get_submodule(stage):
            assert block.conv2.out_channels == width and block.bn2.num_features == width  # the residual stream
            assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels < width
    assert resnet(X).shape == (2, 10)
    record = method.record(resnet)
    assert record["macs"]["speedup"] >= 2.0 and set(record["channels"]) == {
        f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)}


def test_a_pruned_network_reloads_from_model_pt_and_model_cpk(resnet: nn.Module, tmp_path: Path) -> None:
    pruned(resnet, ratio=0.5)
    resnet.eval()
    save_checkpoint(tmp_path / "model.pt", resnet, {}, {"resized": True})
    fresh = resnet20()
    apply_checkpoint(fresh, load_checkpoint(str(tmp_path / "model.pt")), "model.pt")
    assert torch.equal(fresh.eval()(X), resnet(X))
    (tmp_path / "model.cpk").write_bytes(export(Checkpoint(resnet.state_dict(), {}, {"resized": True})))
    assert torch.equal(load(tmp_path / "model.cpk")(X), resnet(X))
    with pytest.raises(ValueError, match="wrong shape"):  # without the mark, narrower weights are refused
        apply_checkpoint(resnet20(), Checkpoint(resnet.state_dict()), "plain.th")


def test_round_to_keeps_channel_counts_a_multiple(resnet: nn.Module) -> None:
    dense_macs = count_macs(resnet, X[:1])[0]
    method = pruned(resnet, macs_speedup=2.0, round_to=8)
    assert count_macs(resnet, X[:1])[0] * 2 <= dense_macs
    widths = method.record(resnet)["channels"]
    assert all(w % 8 == 0 and w > 0 for w in widths.values()) and method.record(resnet)["round_to"] == 8
    assert resnet(X).shape == (2, 10)


def test_layer_ratio_gives_named_layers_their_own_fraction(resnet: nn.Module) -> None:
    method = pruned(resnet, ratio=0.5, round_to=8, layer_ratio={"re:layer3\\..*": 0.625, "layer3.2.conv1": 0.75})
    widths = method.record(resnet)["channels"]
    assert [widths[f"layer{s}.{b}.conv1"] for s in (1, 2, 3) for b in range(3)] == [8, 8, 8, 16, 16, 16, 24, 24, 16]
    assert method.record(resnet)["layer_ratio"] == {"layer3.0.conv1": 0.625, "layer3.1.conv1": 0.625,
                                                    "layer3.2.conv1": 0.75}
    assert resnet(X).shape == (2, 10)


def test_layer_ratio_composes_from_the_command_line_and_keeps_old_hashes(hydra_compose, prepared) -> None:
    from compress.config import config_hash

    base = ["prune=channel", "prune.macs_speedup=null"]
    assert config_hash(hydra_compose([*base, "prune.layer_ratio=null"])) == config_hash(hydra_compose(base))
    cfg = hydra_compose([*base, r"prune.layer_ratio={re\:layer3.*:0.625,layer3.2.conv1:0.75}"])  # re\: in a key
    assert dict(cfg.prune.layer_ratio) == {"re:layer3.*": 0.625, "layer3.2.conv1": 0.75}
    assert config_hash(cfg) != config_hash(hydra_compose(base))
    prepared(cfg)
    with pytest.raises(ValueError, match="prune.layer_ratio names unknown layer 'fc'"):
        prepared(hydra_compose([*base, "prune.layer_ratio={fc:0.5}"]))


def test_mobilenet_keeps_depthwise_layers_depthwise() -> None:
    torch.manual_seed(0)
    net = {"_target_": "torchvision.models.mobilenet_v2", "num_classes": 10, "width_mult": 0.5}
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5).eval()
    pruned(model, ratio=0.3)
    depthwise = model.features[2].conv[1][0]
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels
    assert model.classifier[1].out_features == 10
    blob = export(Checkpoint(model.state_dict(), {}, {"resized": True, "net": net}))
    assert torch.equal(load(blob)(X), model(X))


@pytest.mark.parametrize(("kw", "message"), [
    ({"ratio": 1.0}, r"prune.ratio=1.0 is not allowed: use a number in \(0, 1\)"),
    ({"macs_speedup": 0.5}, "prune.macs_speedup=0.5 is not allowed: use a number > 1"),
    ({"importance": "l3"}, "prune.importance='l3' is not allowed: use one of l1, bn, random"),
    ({"scope": "layer"}, "prune.scope='layer' is not allowed for prune=channel"),
    ({"round_to": 0}, r"prune.round_to=0 is not allowed: use a positive integer \(8, 16\) or null"),
    ({"layer_ratio": [0.5]}, r"prune.layer_ratio=\[0.5\] is not allowed: use a map of layer name"),
    ({"layer_ratio": {"layer1.0.conv1": 0.5}}, "prune.layer_ratio sets fractions, prune.macs_speedup a MAC target"),
])
def test_bad_arguments_are_named(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChannelPruning(**({"macs_speedup": 2.0} | kw))


def test_app_channel_prunes_quantizes_and_verifies(run_app, data_root: Path) -> None:
    proc = run_app("prune=channel", "quant=asym", "nbits=4", "budget=debug", "progress=none",
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((proc.run_dir / "metrics.json").read_text())
    assert m["choices"]["prune"] == "channel" and m["methods"]["prune"]["macs"]["speedup"] >= 2.0
    assert m["max_distinct_values"] <= 16
    model = load(proc.run_dir / "model.cpk")
    assert model.layer1[0].conv1.out_channels < 16 and model.layer1[0].conv2.out_channels == 16
    from compress.verify import main as verify

    assert verify([str(proc.run_dir)]) == 0


def test_app_channel_prunes_a_mobilenet_that_loads_and_exports(run_app, data_root: Path, tmp_path: Path) -> None:
    """A network that is not a CIFAR ResNet: the pruned MobileNetV2 is smaller, reloads from
    model.cpk, and exports to float ONNX (checked) and int8 ONNX (every conv an integer kernel)."""
    pytest.importorskip("onnxruntime")
    proc = run_app("model=mobilenet_v2_cifar", "model.pretrained=null", "prune=channel", "budget=debug",
                   "trainer.precision=32-true", "progress=none", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((proc.run_dir / "metrics.json").read_text())["methods"]["prune"]
    assert m["macs"]["after"] * 2 <= m["macs"]["before"] and m["params"]["after"] < m["params"]["before"]
    model = load(proc.run_dir / "model.cpk")
    dense = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5)
    assert sum(p.numel() for p in model.parameters()) == m["params"]["after"] < sum(p.numel() for p in dense.parameters())
    from compress.export import main as export_main

    assert export_main([str(proc.run_dir), "--onnx", str(tmp_path / "m.onnx"), "--int8", str(tmp_path / "m8.onnx"),
                        "--calibration", "64", "--check-images", "200", "--data", str(data_root)]) == 0
