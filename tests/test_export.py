"""The packed artifact: bit packing, exact grids, round trips, corruption, sizes, CLI."""

from __future__ import annotations

import runpy
import struct
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from compress.checkpoint import Checkpoint, save_checkpoint
from compress.export import (
    HEADER,
    VERSION,
    delta_bits,
    delta_decode,
    delta_encode,
    dequantize,
    export,
    fit_grid,
    load,
    main,
    pack_bits,
    packed_size,
    size_report,
    unpack_bits,
)
from compress.layers import bake, quantizable_layers, with_parametrization
from compress.lsq import LearnedFakeQuant
from compress.models.resnet import resnet20
from compress.prune import PruningCallback, current_masks
from compress.quant import QuantizationCallback, baked_grids, quantize


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small tensors: one thread is faster, and immune to a busy machine's thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def baked(prune: bool, quant: tuple | None, seed: int = 0, record: bool = False) -> tuple[nn.Module, Checkpoint]:
    """A random ResNet-20 (random BatchNorm statistics too), pruned to 80% and/or quantized
    (``quant``: QuantizationCallback's arguments), baked, with the checkpoint train.py would save
    for it; ``record``: with the grids it was baked with, as train.py records them. Learned
    ranges are moved off their initial (min/max) range first, as training would."""
    torch.manual_seed(seed)
    model = resnet20()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7820)
    masks: dict[str, torch.Tensor] = {}
    if prune:
        PruningCallback(0.8).install(model)
        masks = current_masks(model)
    if quant:
        cb = QuantizationCallback(*quant)
        cb.install(model)
        for lsq in with_parametrization(model, LearnedFakeQuant).values():
            with torch.no_grad():
                lsq.scale.mul_(torch.empty_like(lsq.scale).uniform_(0.6, 1.3))
                if isinstance(lsq.offset, nn.Parameter):  # asym
                    lsq.offset.add_(0.3 * lsq.scale)
    bake(model)
    meta = {"quant": {"mode": cb.mode, "nbits": cb.nbits, "granularity": "channel" if cb.channel else "tensor",
                      **({"grids": baked_grids(model)} if record else {})} if quant else None}
    return model.eval(), Checkpoint(model.state_dict(), masks, meta)


CASES = {  # name: (prune, QuantizationCallback arguments, grids recorded)
    "quant-asym4": (False, ("asym", 4), False),
    "quant-sym3": (False, ("sym", 3), False),
    "prune": (True, None, False),
    "prune+asym4": (True, ("asym", 4), False),
    "prune+sym3": (True, ("sym", 3), False),
    "asym2-mse": (False, ("asym", 2, "mse"), False),  # clipped ranges: the extremes are clipped levels
    "prune+sym2-mse": (True, ("sym", 2, "mse"), False),
    "asym4-recorded": (False, ("asym", 4), True),
    "prune+asym3-channel": (True, ("asym", 3, "minmax", "channel"), True),
    "sym2-mse-channel-fitted": (False, ("sym", 2, "mse", "channel"), False),  # no grids: fitted per channel
    "prune+asym2-learned": (True, ("asym", 2, "minmax", "tensor", True), True),
    "prune+asym2-mse-channel-learned": (True, ("asym", 2, "mse", "channel", True), True),
    "sym3-channel-learned": (False, ("sym", 3, "minmax", "channel", True), True),
}


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[nn.Module, Checkpoint, bytes]]:
    out = {}
    for name, (prune, quant, record) in CASES.items():
        model, ckpt = baked(prune, quant, record=record)
        out[name] = (model, ckpt, export(ckpt))
    return out


@pytest.fixture(scope="module")
def artifact(models: dict) -> bytes:
    return models["prune+asym4"][2]


# ---------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 6, 7, 8, 11, 16])
@pytest.mark.parametrize("size", [0, 1, 7, 13, 1001])
def test_pack_bits_round_trip(nbits: int, size: int) -> None:
    rng = np.random.default_rng(nbits * 1000 + size)
    values = rng.integers(0, 2**nbits, size)
    if size:
        values[0], values[-1] = 0, 2**nbits - 1  # the extremes survive
    buf = pack_bits(values, nbits)
    assert len(buf) == packed_size(size, nbits) == (size * nbits + 7) // 8
    assert np.array_equal(unpack_bits(buf, nbits, size), values)


def test_pack_bits_rejects_values_that_do_not_fit_and_short_buffers() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        pack_bits(np.array([0, 4]), 2)
    with pytest.raises(ValueError, match="do not fit"):
        pack_bits(np.array([-1]), 3)
    with pytest.raises(ValueError, match="truncated"):
        unpack_bits(pack_bits(np.arange(8), 3)[:-1], 3, 8)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.5, 1.0])
def test_delta_index_round_trip(density: float) -> None:
    rng = np.random.default_rng(0)
    numel = 2000
    positions = np.flatnonzero(rng.random(numel) < density)
    for edge in ([], [0], [numel - 1], [0, 1, numel - 1]):  # gaps of 0 and of the whole tensor
        pos = np.union1d(positions, edge).astype(np.int64)
        for width in range(1, 17):
            symbols = delta_encode(pos, width)
            assert symbols.max(initial=0) < 2**width
            assert delta_bits(pos, width) == width * len(symbols)
            assert np.array_equal(delta_decode(symbols, width, numel), pos)


# ------------------------------------------------------------------------ exact grids


@pytest.mark.parametrize("mode", ["sym", "asym"])
@pytest.mark.parametrize("nbits", range(2, 9))
@pytest.mark.parametrize("zeros", [False, True])
def test_fit_grid_reproduces_real_quantized_tensors(mode: str, nbits: int, zeros: bool) -> None:
    """Any tensor compress.quant.quantize bakes, sparse (80% zeros) or not, at any magnitude
    and sign balance, comes back bit for bit from the fitted (scale, offset) and codes."""
    g = torch.Generator().manual_seed(nbits)
    for size, shift, magnitude in [(2304, 0, 0.1), (9216, 0, 1e-3), (576, 3, 20.0), (576, -2, 1.0), (9, 0, 1.0), (1, 0, 0.5)]:
        w = (torch.randn(size, generator=g) + shift) * magnitude
        if zeros:
            w[torch.rand(size, generator=g) < 0.8] = 0
        q = quantize(w, mode, nbits)
        nz = q[q != 0]
        scale, offset = fit_grid(nz, mode, nbits, zeros=bool((q == 0).any()))
        levels = np.round((nz.numpy().astype(np.float64) - offset) / scale)
        lo, hi = (0, 2**nbits - 1) if mode == "asym" else (-(2 ** (nbits - 1) - 1), 2 ** (nbits - 1) - 1)
        assert levels.size == 0 or (lo <= levels.min() and levels.max() <= hi)
        assert torch.equal(dequantize(levels, scale, offset), nz)


def test_fit_grid_rejects_values_off_the_grid() -> None:
    with pytest.raises(ValueError, match="not on a asym 4-bit grid"):
        fit_grid(torch.randn(1000), "asym", 4)


def test_export_refuses_unquantized_weights_claimed_quantized() -> None:
    _, ckpt = baked(prune=False, quant=None)
    ckpt.meta["quant"] = {"mode": "asym", "nbits": 4}
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: .*not on a asym 4-bit grid"):
        export(ckpt)


def test_asym_zero_off_the_grid_round_trips() -> None:
    """An unpruned asym tensor whose exact zeros are not a grid level (kept by the
    zero-preservation rule) cannot be dense: it goes sparse and still comes back exactly."""
    model, _ = baked(prune=False, quant=None)
    sd = model.state_dict()
    w = sd["layer2.1.conv1.weight"]
    w.view(-1)[::5] = 0
    for name in quantizable_layers(model):
        sd[f"{name}.weight"] = quantize(sd[f"{name}.weight"], "asym", 4)
    ckpt = Checkpoint(sd, {}, {"quant": {"mode": "asym", "nbits": 4}})
    back = load(export(ckpt)).state_dict()
    for k, v in sd.items():
        assert torch.equal(back[k].to(v.dtype), v), k
    assert size_report(ckpt)["weight_layouts"]["dense"] == 19


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_reproduces_weights_and_logits(models: dict, case: str) -> None:
    model, ckpt, blob = models[case]
    reloaded = load(blob)
    assert type(reloaded) is type(resnet20()) and not reloaded.training
    state = reloaded.state_dict()
    for k, v in ckpt.state_dict.items():
        assert torch.equal(state[k].to(v.dtype), v), k
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(x) - reloaded(x)).abs().max().item()
    assert diff < 1e-5


def test_per_channel_records_one_grid_per_channel_in_a_version_2_artifact(models: dict) -> None:
    for case, (_, quant, _) in CASES.items():
        _, ckpt, blob = models[case]
        channel = bool(quant) and len(quant) > 3 and quant[3] == "channel"
        assert struct.unpack_from("<H", blob, 4)[0] == (2 if channel else 1), case  # v1 unless it needs v2
    _, ckpt, blob = models["prune+asym3-channel"]
    w = ckpt.state_dict["layer3.0.conv1.weight"]
    assert max(torch.unique(c[c != 0]).numel() for c in w) <= 8 < torch.unique(w[w != 0]).numel()
    per_tensor = size_report(baked(True, ("asym", 3))[1])
    report = size_report(ckpt)
    # the same codes and index; a record head of 6 + 8 * channels bytes instead of 10, and the manifest says so
    extra = sum(8 * ckpt.state_dict[f"{n}.weight"].shape[0] - 4 for n in quantizable_layers(resnet20()))
    assert report["compressed_bytes"] - per_tensor["compressed_bytes"] == pytest.approx(extra, abs=30)


@pytest.mark.parametrize("case", ["prune+asym2-learned", "prune+asym2-mse-channel-learned", "sym3-channel-learned"])
def test_learned_grids_are_exported_as_recorded(models: dict, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A learned range's extremes need not be levels: the grids come from the record (which
    must match bit for bit), not from fitting the values."""
    model, ckpt, blob = models[case]

    def no_fitting(*args: object, **kwargs: object) -> None:
        raise AssertionError("fit_grid called although the grids are recorded")

    monkeypatch.setattr("compress.export.grid.fit_grid", no_fitting)
    assert export(ckpt) == blob
    quant = {k: v for k, v in ckpt.meta["quant"].items() if k != "grids"}
    grids = {n: dict(g) for n, g in ckpt.meta["quant"]["grids"].items()}
    grids["layer1.0.conv1.weight"]["scale"] = [v * 1.001 for v in grids["layer1.0.conv1.weight"]["scale"]]
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: \d+ weights are off their recorded"):
        export(Checkpoint(ckpt.state_dict, ckpt.masks, {"quant": {**quant, "grids": grids}}))


def test_load_reads_a_path(tmp_path: Path, artifact: bytes) -> None:
    (tmp_path / "m.cpk").write_bytes(artifact)
    assert isinstance(load(tmp_path / "m.cpk"), nn.Module)
    assert isinstance(load(str(tmp_path / "m.cpk")), nn.Module)


def test_fp16_mode_is_smaller_and_close(models: dict) -> None:
    model, ckpt, blob = models["prune"]
    half = export(ckpt, fp_dtype="float16")
    assert len(half) < 0.6 * len(blob)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = model(x), load(half)(x)
    assert (ref - out).abs().max().item() < 1e-2 * ref.abs().max().item()
    with pytest.raises(ValueError, match="fp_dtype"):
        export(ckpt, fp_dtype="bfloat16")


def test_export_is_deterministic(models: dict) -> None:
    _, ckpt, blob = models["prune+sym3"]
    assert export(ckpt) == blob


# ----------------------------------------------------------------------------- corruption


def test_every_header_byte_and_sampled_payload_bytes_are_checked(artifact: bytes) -> None:
    rng = np.random.default_rng(0)
    positions = list(range(HEADER.size + 8)) + list(rng.integers(0, len(artifact), 300)) + [len(artifact) - 1]
    for pos in positions:
        for flip in (0x01, 0xFF):
            bad = bytearray(artifact)
            bad[pos] ^= flip
            with pytest.raises(ValueError, match="magic|version|truncated|corrupt|checksum"):
                load(bytes(bad))


@pytest.mark.parametrize("keep", [0, 3, HEADER.size - 1, HEADER.size, HEADER.size + 10, -1])
def test_truncation_is_detected(artifact: bytes, keep: int) -> None:
    with pytest.raises(ValueError, match="truncated"):
        load(artifact[:keep])


def test_wrong_version_and_magic_are_detected(artifact: bytes) -> None:
    newer = artifact[:4] + struct.pack("<H", VERSION + 1) + artifact[6:]
    with pytest.raises(ValueError, match=rf"unsupported artifact version {VERSION + 1} \(this code reads 1, 2\)"):
        load(newer)
    with pytest.raises(ValueError, match="bad magic"):
        load(b"PK\x03\x04" + artifact[4:])
    with pytest.raises(ValueError, match="corrupt"):
        load(artifact + b"\x00")


# ---------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("case", list(CASES))
def test_size_matches_prediction(models: dict, case: str) -> None:
    _, ckpt, blob = models[case]
    report = size_report(ckpt)
    assert report["compressed_bytes"] == len(blob)
    assert abs(report["compressed_bytes"] - report["predicted_bytes"]) <= 0.02 * report["predicted_bytes"]
    assert report["fp32_bytes"] == 4 * sum(t.numel() for t in ckpt.state_dict.values())
    assert report["ratio"] == pytest.approx(report["fp32_bytes"] / len(blob))


def test_sparse_4bit_is_15_to_25x_smaller(models: dict) -> None:
    report = size_report(models["prune+asym4"][1])
    print(report)
    assert 15 <= report["ratio"] <= 25
    assert 1.0 < report["bits_per_weight"] < 2.2
    assert report["weight_layouts"]["dense"] == 0  # every pruned weight tensor went sparse


def test_quant_only_bits_per_weight_close_to_nbits(models: dict) -> None:
    asym = size_report(models["quant-asym4"][1])
    assert 4.0 < asym["bits_per_weight"] < 4.3  # the fp32 stem and classifier add a little
    assert asym["weight_layouts"] == {"dense": 20, "bitmask": 0, "delta": 0}
    assert size_report(models["quant-sym3"][1])["bits_per_weight"] < 3.1


# ------------------------------------------------------------------------------------ CLI


def test_cli_writes_artifact_next_to_checkpoint(tmp_path: Path, models: dict, capsys: pytest.CaptureFixture) -> None:
    model, ckpt, blob = models["prune+asym4"]
    save_checkpoint(tmp_path / "run" / "model.pt", model, ckpt.masks, ckpt.meta)
    assert main([str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "model.cpk").read_bytes() == blob
    out = capsys.readouterr().out
    assert "compressed_bytes" in out and "ratio" in out and "bits_per_weight" in out
    assert main([str(tmp_path / "run" / "model.pt"), "-o", str(tmp_path / "x.cpk"), "--fp16"]) == 0
    assert (tmp_path / "x.cpk").stat().st_size < len(blob)


def test_cli_keeps_a_runs_own_artifact_unless_forced(tmp_path: Path, models: dict, capsys: pytest.CaptureFixture) -> None:
    model, ckpt, blob = models["prune+asym4"]
    save_checkpoint(tmp_path / "run" / "model.pt", model, ckpt.masks, ckpt.meta)
    (tmp_path / "run" / "model.cpk").write_bytes(b"the run's own")
    assert main([str(tmp_path / "run"), "--fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'run' / 'model.cpk'} exists (the run's own artifact): give -o FILE for a new one, or --force to overwrite it"
    assert (tmp_path / "run" / "model.cpk").read_bytes() == b"the run's own"
    assert main([str(tmp_path / "run"), "--force"]) == 0
    assert (tmp_path / "run" / "model.cpk").read_bytes() == blob


def test_cli_bad_paths_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "missing" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "junk.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err

    monkeypatch.setattr(sys, "argv", ["compress.export", str(tmp_path / "nope")])  # python -m compress.export
    monkeypatch.delitem(sys.modules, "compress.export")  # runpy runs a fresh copy as __main__
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("compress.export", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")
