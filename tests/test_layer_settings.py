"""Per-layer settings: ``prune.layer_sparsity`` and ``quant.layer_nbits`` compose with the global
ones, are validated against the model's layer names, pack into ``model.cpk`` at each layer's
width and are listed in ``metrics.json``; at their default they change no hash."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.checkpoint import Checkpoint
from compress.config import config_hash
from compress.export import export, load, size_report
from compress.layers import bake, quantizable_layers, prunable_layers
from compress.models import resnet20
from compress.prune import PruningCallback, check_layer_sparsity, layer_targets, magnitude_masks, prune_count
from compress.quant import QuantizationCallback, baked_grids, check_layer_nbits, layer_widths
from compress.stats import distinct_values
from compress.verify import main as verify

MIXED = {"layer1.0.conv1": 2, "layer3.2.conv2": 6}


def zeros(model: nn.Module) -> dict[str, int]:
    return {n: int((m.weight == 0).sum()) for n, m in prunable_layers(model).items()}


def test_layer_scope_gives_named_layers_their_own_sparsity(resnet: nn.Module) -> None:
    weights = {n: m.weight.detach() for n, m in prunable_layers(resnet).items()}
    masks = magnitude_masks(weights, 0.5, "layer", {"conv1": 0.9, "linear": 0.0})
    for name, w in weights.items():
        target = {"conv1": 0.9, "linear": 0.0}.get(name, 0.5)
        assert int((~masks[name]).sum()) == prune_count(target, w.numel()), name
    assert magnitude_masks(weights, 0.5, "layer", {}).keys() == weights.keys()
    plain = magnitude_masks(weights, 0.5, "global")
    assert all(torch.equal(plain[n], m) for n, m in magnitude_masks(weights, 0.5, "global", None).items())


def test_global_scope_shares_its_threshold_among_the_other_layers(resnet: nn.Module) -> None:
    weights = {n: m.weight.detach() for n, m in prunable_layers(resnet).items()}
    own = {"layer3.2.conv2": 0.95, "linear": 0.1}
    masks = magnitude_masks(weights, 0.8, "global", own)
    for name, s in own.items():
        assert int((~masks[name]).sum()) == prune_count(s, weights[name].numel())
    rest = [n for n in weights if n not in own]
    pruned = sum(int((~masks[n]).sum()) for n in rest)
    assert pruned == prune_count(0.8, sum(weights[n].numel() for n in rest))  # one threshold over the rest
    threshold = max(weights[n][~masks[n]].abs().max() for n in rest)
    assert all(weights[n][masks[n]].abs().min() >= threshold for n in rest)


def test_pruning_ramp_takes_named_layers_along(resnet: nn.Module) -> None:
    cb = PruningCallback(0.8, "global", ramp_epochs=4, layer_sparsity={"layer2.0.conv1": 0.4})
    assert cb.layer_sparsity_after(1) == {"layer2.0.conv1": pytest.approx(0.1)}
    cb.install(resnet)
    assert int((resnet.layer2[0].conv1.weight == 0).sum()) == 0  # epoch 0 of a ramp: nothing pruned yet
    cb.prune(resnet, cb.sparsity_after(2), cb.layer_sparsity_after(2))
    assert zeros(resnet)["layer2.0.conv1"] == prune_count(0.2, resnet.layer2[0].conv1.weight.numel())
    assert layer_targets(prunable_layers(resnet), 0.8, "global", cb.layer_sparsity)["layer2.0.conv1"] == 0.4
    assert layer_targets(prunable_layers(resnet), 0.8, "global", cb.layer_sparsity)["conv1"] is None
    assert set(layer_targets(prunable_layers(resnet), 0.5, "layer").values()) == {0.5}


def test_unknown_layers_are_rejected_with_the_valid_names(resnet: nn.Module, block_names: set[str]) -> None:
    with pytest.raises(ValueError) as err:
        check_layer_sparsity({"layer9.0.conv1": 0.5}, prunable_layers(resnet))
    message = str(err.value)
    assert message.startswith("prune.layer_sparsity names unknown layer 'layer9.0.conv1': use one of conv1, layer1.0.conv1")
    assert message.endswith("layer3.2.conv2, linear")
    with pytest.raises(ValueError, match=r"quant.layer_nbits names unknown layer 'conv1': use one of layer1\.0\.conv1,"):
        check_layer_nbits({"conv1": 4}, quantizable_layers(resnet))  # the stem is not quantized
    with pytest.raises(ValueError, match=r"prune.layer_sparsity.linear=1.0 is not allowed: it must be a number in \[0, 1\)"):
        check_layer_sparsity({"linear": 1.0}, prunable_layers(resnet))
    with pytest.raises(ValueError, match=r"quant.layer_nbits.layer1.0.conv1=9 is not allowed: nbits must be an integer in 2..8"):
        check_layer_nbits({"layer1.0.conv1": 9}, quantizable_layers(resnet))
    with pytest.raises(ValueError, match=r"quant.layer_nbits=4 is not allowed: use a map of layer name \(or re: pattern\) to value"):
        check_layer_nbits(4, quantizable_layers(resnet))
    with pytest.raises(ValueError, match="names unknown layer"):
        QuantizationCallback("asym", 4, layer_nbits={"linear": 4}).install(resnet)
    assert layer_widths(quantizable_layers(resnet), 4, MIXED) == {n: MIXED.get(n, 4) for n in sorted(block_names, key=list(quantizable_layers(resnet)).index)}


def manifest(artifact: bytes) -> dict:
    """The JSON manifest of an artifact (after the 14-byte header and its u32 length)."""
    length = int.from_bytes(artifact[14:18], "little")
    return json.loads(zlib.decompress(artifact[18:18 + length]))


def mixed_checkpoint(model: nn.Module, nbits: int, layer_nbits: dict[str, int] | None, mode: str = "asym") -> Checkpoint:
    PruningCallback(0.5, "global").install(model)
    QuantizationCallback(mode, nbits, layer_nbits=layer_nbits).install(model)
    bake(model)
    quant = {"mode": mode, "nbits": nbits, "grids": baked_grids(model), **({"layer_nbits": layer_nbits} if layer_nbits else {})}
    return Checkpoint(model.state_dict(), {}, {"quant": quant})


@pytest.mark.parametrize("mode", ("sym", "asym"))
def test_each_layer_is_quantized_and_packed_at_its_own_width(mode: str) -> None:
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(resnet20())
    mixed = mixed_checkpoint(models[0], 4, MIXED, mode)
    distinct = distinct_values(models[0])
    assert distinct["layer1.0.conv1"] <= 4 and distinct["layer3.2.conv2"] <= 64 and distinct["layer2.0.conv1"] <= 16
    assert distinct["layer3.2.conv2"] > 16  # really 6 bits, not the default 4
    data = export(mixed)
    rebuilt = load(data)
    for name, t in mixed.state_dict.items():
        assert torch.equal(rebuilt.state_dict()[name], t.float() if t.is_floating_point() else t), name
    assert manifest(data)["quant"]["layer_nbits"] == MIXED and manifest(data)["quant"]["nbits"] == 4
    uniform6 = mixed_checkpoint(models[1], 6, None, mode)
    assert size_report(mixed)["compressed_bytes"] < size_report(uniform6)["compressed_bytes"]
    assert "layer_nbits" not in manifest(export(uniform6))["quant"]  # uniform artifacts are as before


def test_per_layer_options_at_their_default_keep_the_hash(hydra_compose, prepared) -> None:
    base = ["prune=global", "quant=asym", "nbits=3"]
    default = config_hash(hydra_compose(base))
    assert config_hash(hydra_compose([*base, "prune.layer_sparsity=null", "quant.layer_nbits=null",
                                      "data.test_split=all"])) == default
    other = {config_hash(hydra_compose([*base, o])) for o in ("prune.layer_sparsity={linear:0.5}",
                                                               "quant.layer_nbits={layer1.0.conv1:2}",
                                                               "data.test_split=search")}
    assert len(other) == 3 and default not in other
    prepared(hydra_compose([*base, "quant.layer_nbits={layer1.0.conv1:2,layer3.2.conv2:6}"]))
    with pytest.raises(ValueError, match="prune.layer_sparsity names unknown layer 'fc'"):
        prepared(hydra_compose([*base, "prune.layer_sparsity={fc:0.5}"]))
    with pytest.raises(ValueError, match="quant.layer_nbits names unknown layer 'layer3.5.conv1'"):
        prepared(hydra_compose([*base, "model=resnet32", "quant.layer_nbits={layer3.5.conv1:2}"]))
    prepared(hydra_compose([*base, "model=resnet44", "quant.layer_nbits={layer3.5.conv1:2}"]))


def test_layer_maps_take_patterns(resnet: nn.Module) -> None:
    widths = check_layer_nbits({r"re:layer1\..*": 2, "layer1.0.conv1": 6}, quantizable_layers(resnet))
    assert widths == {n: 6 if n == "layer1.0.conv1" else 2 for n in quantizable_layers(resnet) if n.startswith("layer1.")}
    with pytest.raises(ValueError, match=r"prune.layer_sparsity names unknown layer 're:layer9.*': use one of conv1, "):
        check_layer_sparsity({"re:layer9.*": 0.5}, prunable_layers(resnet))


def test_app_rejects_an_unknown_layer_in_one_line(run_app) -> None:
    proc = run_app("quant=asym", "quant.layer_nbits={conv1:2}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: quant.layer_nbits names unknown layer 'conv1': use one of layer1.0.conv1, ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_mixed_width_run_packs_each_layer_at_its_width(run_app, data_root: Path, pretrained: Path) -> None:
    """Issue 16's check: 2 bits for one layer and 6 for another; the saved model holds at most 4
    and 64 values in them, and its model.cpk is smaller than the uniform 6-bit one."""
    env = {"OMP_NUM_THREADS": "1"}
    mixed = run_app("quant=asym", "nbits=4", "quant.layer_nbits={layer1.0.conv1:2,layer3.2.conv2:6}", "budget=debug",
                    "trainer.max_epochs=0", env=env)
    uniform = run_app("quant=asym", "nbits=6", "budget=debug", "trainer.max_epochs=0", env=env)
    assert mixed.returncode == 0 and uniform.returncode == 0, mixed.stderr[-2000:] + uniform.stderr[-2000:]
    m = json.loads((mixed.run_dir / "metrics.json").read_text())
    assert m["layer_nbits"]["layer1.0.conv1"] == 2 and m["layer_nbits"]["layer3.2.conv2"] == 6
    assert set(m["layer_nbits"].values()) == {2, 4, 6} and len(m["layer_nbits"]) == 18
    saved = torch.load(mixed.run_dir / "model.pt", weights_only=True)["state_dict"]
    for name, n in MIXED.items():
        w = saved[f"{name}.weight"]
        assert 2 < torch.unique(w[w != 0]).numel() <= 2**n, name
    rebuilt = load(mixed.run_dir / "model.cpk")
    assert torch.equal(rebuilt.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    u = json.loads((uniform.run_dir / "metrics.json").read_text())
    assert m["compressed_bytes"] == (mixed.run_dir / "model.cpk").stat().st_size < u["compressed_bytes"]


@pytest.mark.slow
def test_verify_checks_each_layer_against_its_own_width(run_app, data_root: Path, pretrained: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A full-test-set run with per-layer widths and sparsities verifies; a 2-bit layer recorded as more bits still passes, recorded as 2 bits with 6-bit values fails."""
    proc = run_app("prune=oneshot", "prune.sparsity=0.5", "prune.layer_sparsity={linear:0.0,layer3.2.conv2:0.9}",
                   "quant=sym", "nbits=3", "quant.layer_nbits={layer1.0.conv1:2,layer3.2.conv2:6}",
                   "trainer.max_epochs=0", "data.test_split=report", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert verify([str(proc.run_dir), "--data", str(data_root)]) == 0
    assert "distinct <= 2^nbits of each layer (2..6 bits)" in capsys.readouterr().out
    m = json.loads((proc.run_dir / "metrics.json").read_text())
    assert m["sparsity"]["layers"]["linear"] == 0.0 and m["sparsity"]["layers"]["layer3.2.conv2"] >= 0.9
    m["layer_nbits"]["layer3.2.conv2"] = 2
    (proc.run_dir / "metrics.json").write_text(json.dumps(m))
    assert verify([str(proc.run_dir), "--data", str(data_root)]) == 1
    assert "1 tensors with more than 4 values (layer3.2.conv2" in capsys.readouterr().out
