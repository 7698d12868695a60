"""The model family: ResNet-20/32/44/56 build, take their own weights, compose as `model=`
options with their own run dirs, and go through pruning, quantization and export alike."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from compress.checkpoint import Checkpoint, apply_checkpoint
from compress.config import config_hash, validate
from compress.export import HEADER, MAGIC, VERSION, export, load
from compress.layers import bake, quantizable_layers, prunable_layers
from compress.models import ARCHS, arch_of, build
from compress.models.weights import PUBLISHED, URL_BASE, published_weights
from compress.prune import PruningCallback, current_masks
from compress.quant import QuantizationCallback
from compress.reproduce import sweep_dir
from compress.stats import distinct_values
from conftest import Compose, RunApp, app_command

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018}  # shared/README.md
PUBLISHED_ACC = {"resnet32": 0.9263, "resnet44": 0.9310, "resnet56": 0.9339}  # on the 10k CIFAR-10 test images
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as in test_real_data: faster on a busy 2-core machine




@pytest.mark.parametrize("arch", list(ARCHS))
def test_architectures(arch: str) -> None:
    model = build(arch)
    n = (int(arch.removeprefix("resnet")) - 2) // 6
    assert model.arch == arch == arch_of(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]
    assert len(quantizable_layers(model)) == 6 * n and len(prunable_layers(model)) == 6 * n + 2
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert arch_of({"conv1.weight": torch.zeros(1)}) is None
    with pytest.raises(ValueError, match="'resnet18' is not known: use one of resnet20, resnet32, resnet44, resnet56"):
        build("resnet18")


def test_each_model_takes_its_own_published_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMPRESS_WEIGHTS", raising=False)
    monkeypatch.delenv("COMPRESS_PRETRAINED", raising=False)
    assert published_weights("resnet56") == URL_BASE + "resnet56-4bfd9763.th"  # nothing local: the URL
    (tmp_path / PUBLISHED["resnet20"]).write_bytes(b"20")
    monkeypatch.setenv("COMPRESS_PRETRAINED", str(tmp_path / PUBLISHED["resnet20"]))
    assert published_weights("resnet56") == URL_BASE + PUBLISHED["resnet56"]  # never resnet20's file
    (tmp_path / PUBLISHED["resnet56"]).write_bytes(b"56")
    assert published_weights("resnet56") == str(tmp_path / PUBLISHED["resnet56"])  # beside COMPRESS_PRETRAINED
    other = tmp_path / "weights"
    other.mkdir()
    (other / PUBLISHED["resnet56"]).write_bytes(b"56")
    monkeypatch.setenv("COMPRESS_WEIGHTS", str(other))
    assert published_weights("resnet56") == str(other / PUBLISHED["resnet56"])  # COMPRESS_WEIGHTS first
    mine = tmp_path / "mine.pt"  # ResNet-20 takes $COMPRESS_PRETRAINED itself, whatever its name
    monkeypatch.setenv("COMPRESS_PRETRAINED", str(mine))
    assert published_weights("resnet20") == str(mine)
    monkeypatch.setenv("COMPRESS_PRETRAINED", "")  # set but empty: as if unset
    assert published_weights("resnet20") == URL_BASE + PUBLISHED["resnet20"]
    with pytest.raises(ValueError, match="no published weights for 'resnet18'"):
        published_weights("resnet18")


def test_model_options_compose_with_their_own_dirs_and_hashes(hydra_compose: Compose, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_WEIGHTS", str(tmp_path))
    monkeypatch.delenv("COMPRESS_PRETRAINED", raising=False)
    for arch, file in PUBLISHED.items():
        (tmp_path / file).write_bytes(arch.encode())
    hashes = set()
    for arch in ARCHS:
        overrides = ["experiment=table3_2", f"model={arch}", "quant=sym", "nbits=4"]
        sweep = hydra_compose(overrides, return_hydra_config=True).hydra.sweep
        tag = "" if arch == "resnet20" else f"-{arch}"
        assert (sweep.dir, sweep.subdir) == (f"multirun/table3_2{tag}/full", "nbits=4,quant=sym")
        assert sweep.dir == str(sweep_dir("table3_2", "full", [f"model={arch}"]))
        cfg = hydra_compose(overrides)
        validate(cfg)
        assert cfg.model.pretrained == str(tmp_path / PUBLISHED[arch])
        hashes.add(config_hash(cfg))
    assert len(hashes) == len(ARCHS)
    monkeypatch.setenv("COMPRESS_PRETRAINED", str(tmp_path / "mine.pt"))  # ResNet-20's file, as before
    assert hydra_compose(["model=resnet20"]).model.pretrained == str(tmp_path / "mine.pt")
    assert hydra_compose(["model=resnet56"]).model.pretrained == str(tmp_path / PUBLISHED["resnet56"])
    validate(hydra_compose(["model=resnet32", "model.name=vgg"]))  # a free label
    with pytest.raises(ValueError, match="model.name='a/b' is not allowed: use a short label"):
        validate(hydra_compose(["model=resnet32", "model.name=a/b"]))


def test_weights_of_another_model_are_refused() -> None:
    r20 = build("resnet20")
    with pytest.raises(ValueError, match=r"model.pretrained='r20.th' holds resnet20 weights, not resnet56's: "
                                         r"give the weights of resnet56 \(or choose model=resnet20\)"):
        apply_checkpoint(build("resnet56"), Checkpoint(r20.state_dict()), "r20.th")


@pytest.mark.parametrize(("arch", "mode", "nbits"), [("resnet32", "asym", 3), ("resnet56", "sym", 4)])
def test_prune_quantize_export_any_model(arch: str, mode: str, nbits: int) -> None:
    """Global pruning to 80%, then quantization of every residual-block conv: at most 2^n
    values each, stem and classifier full precision; the artifact records the architecture
    and reloads to the same logits."""
    torch.manual_seed(0)
    model = build(arch)
    PruningCallback(0.8, "global").install(model)
    masks = current_masks(model)
    QuantizationCallback(mode, nbits).install(model)
    bake(model)
    distinct = distinct_values(model)
    assert set(distinct) == set(quantizable_layers(model)) and max(distinct.values()) <= 2**nbits
    zeros = sum(int((m.weight == 0).sum()) for m in prunable_layers(model).values())
    assert zeros >= 0.8 * sum(m.weight.numel() for m in prunable_layers(model).values())
    for fp in ("conv1", "linear"):
        w = model.get_submodule(fp).weight
        assert torch.unique(w[w != 0]).numel() > 2**nbits
    blob = export(Checkpoint(model.state_dict(), masks, {"quant": {"mode": mode, "nbits": nbits}}))
    back = load(blob)
    assert back.arch == arch
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))


def family_weights(pretrained: Path, arch: str) -> Path:
    """``arch``'s published file beside the ResNet-20 one (skips the test where it is not)."""
    path = pretrained.parent / PUBLISHED[arch]
    if not path.is_file():
        pytest.skip(f"{path} not found: the {arch} weights are not beside $COMPRESS_PRETRAINED")
    return path


def test_app_refuses_another_models_weights(run_app: RunApp, data_root: Path, pretrained: Path) -> None:
    proc = run_app("model=resnet56", f"model.pretrained={pretrained}", "quant=none", "trainer.max_epochs=0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: model.pretrained='{pretrained}' holds resnet20 weights, not resnet56's: "
                                   "give the weights of resnet56 (or choose model=resnet20)")
    assert not proc.run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(PUBLISHED_ACC))
def test_published_accuracy(run_app: RunApp, data_root: Path, pretrained: Path, arch: str) -> None:
    """``model=<arch>`` alone evaluates its own published weights (found beside
    ``$COMPRESS_PRETRAINED``) at the published accuracy."""
    weights = family_weights(pretrained, arch)
    proc = run_app(f"model={arch}", "quant=none", "trainer.max_epochs=0", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((proc.run_dir / "metrics.json").read_text())
    assert m["config"]["model"]["pretrained"] == str(weights) and m["choices"]["model"] == arch
    assert abs(m["test_acc"] - PUBLISHED_ACC[arch]) <= 0.0005


@pytest.mark.slow
def test_table3_2_multirun_on_resnet32(tmp_path: Path, data_root: Path, pretrained: Path) -> None:
    """Table 3.2 on ResNet-32 (tests on 1,000 images): its sweep dir names the model, every run
    finishes, and every saved artifact, rebuilt independently, is a ResNet-32 with at most 2^n
    values per block conv and a full-precision stem and classifier."""
    family_weights(pretrained, "resnet32")
    cmd = [sys.executable, "-m", "compress.train", "experiment=table3_2", "model=resnet32", "trainer.limit_test_batches=5"]
    env = {**os.environ, **ONE_THREAD, "COMPRESS_RUNS": str(tmp_path), "COMPRESS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "table3_2-resnet32" / "full"
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [r.name for r in runs] == sorted(f"nbits={n},quant={q},trainer.limit_test_batches=5"
                                            for n in range(2, 7) for q in ("sym", "asym"))
    for run in runs:
        nbits = json.loads((run / "metrics.json").read_text())["choices"]["nbits"]
        model = load(run / "model.cpk")
        assert model.arch == "resnet32"
        for name, m in prunable_layers(model).items():
            w = m.weight.detach()
            n = torch.unique(w[w != 0]).numel()
            assert n <= 2**nbits if name in quantizable_layers(model) else n > 2**nbits, (run.name, name, n)
    assert "## ResNet-32, budget `full`" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_pipeline_and_stage_cache_on_resnet32(tmp_path: Path, data_root: Path, pretrained: Path) -> None:
    """Global pruning then 4-bit and 3-bit asym QAT of ResNet-32 (budget=debug): the second run
    reuses the first one's pruning stage from the cache; both artifacts are ResNet-32s with
    80% zeros and at most 2^n values per block conv."""
    family_weights(pretrained, "resnet32")
    for nbits in (4, 3):
        overrides = ["model=resnet32", "prune=global", "quant=asym", f"nbits={nbits}", "budget=debug"]
        cmd, env, run_dir = app_command(overrides, tmp_path, tmp_path / f"nbits{nbits}", ONE_THREAD)  # one stage cache
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = json.loads((run_dir / "metrics.json").read_text())
        assert m["choices"]["model"] == "resnet32" and m["max_distinct_values"] <= 2**nbits
        assert [s["cached"] for s in m["stages"]] == [nbits == 3, False]
        model = load(run_dir / "model.cpk")
        assert model.arch == "resnet32" and max(distinct_values(model).values()) <= 2**nbits
        assert m["sparsity"]["overall"] >= 0.8


def with_arch(blob: bytes, arch: str) -> bytes:
    """``blob`` with its manifest's ``arch`` replaced (header and checksum redone)."""
    payload = blob[HEADER.size:]
    (length,) = struct.unpack_from("<I", payload)
    manifest = json.loads(zlib.decompress(payload[4:4 + length])) | {"arch": arch}
    packed = zlib.compress(json.dumps(manifest).encode())
    payload = struct.pack("<I", len(packed)) + packed + payload[4 + length:]
    return HEADER.pack(MAGIC, VERSION, len(payload), zlib.crc32(payload)) + payload


def test_artifact_records_the_architecture() -> None:
    model = build("resnet44")
    blob = export(Checkpoint(model.state_dict()))
    assert load(blob).arch == "resnet44"
    with pytest.raises(ValueError, match="artifact holds a 'resnet18', this code rebuilds resnet20, resnet32, resnet44"):
        load(with_arch(blob, "resnet18"))
    with pytest.raises(ValueError, match=r"^artifact does not match resnet56\(10\): missing \['layer1.7.conv1.weight', "):
        load(with_arch(blob, "resnet56"))


def test_artifacts_written_before_the_family_load_as_resnet20() -> None:
    published = sorted(REPO.glob("multirun/published/*/runs/*/*/model.cpk"))
    if not published:
        pytest.skip("no published artifacts in this checkout")
    for path in published[:3]:
        assert load(path).arch == "resnet20"
