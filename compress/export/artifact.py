"""The artifact file: header, manifest and records; writing it, reading it back, its size report.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"CMPK"
    4       2     format version (u16): 1, or 2 where some record has a grid per output channel
    6       4     payload length in bytes (u32)
    10      4     CRC-32 of the payload (u32, zlib.crc32)
    14      ...   payload:
                    u32 manifest length, zlib-compressed JSON manifest
                      {"arch", "net", "data", "num_classes", "quant", "fp_dtype", "tensors": [[name, shape], ...]}
                      ("quant": {"mode", "nbits"}, plus "granularity": "channel" where per channel,
                      and "layer_nbits": {layer: nbits} where some layers have their own width;
                      each record holds its own nbits, so readers need neither)
                    one record per manifest tensor, in manifest order (see ``records``)

``arch`` names the network (``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``), told from
the checkpoint's parameter names when it is written; any other network has ``arch: null`` and
``net``, the resolved ``_target_`` config that builds it (``meta["net"]``, written by
``compress.train``). ``data`` (where the run recorded it) says what inputs the model expects:
``num_classes``, ``mean``, ``std``, ``image_size``; ``resized: true`` marks a channel-pruned
network (its layers are narrower than its constructor builds them). Readers that predate these
keys ignore them. Version 1 always had the field; before the
model family it could only say ``resnet20``, so every earlier artifact loads as before.
Version 2 adds the per-channel record kind; an artifact without one is written as version 1,
readable by older code, and this code reads both.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from compress.checkpoint import Checkpoint, atomic_write
from compress.export.grid import QuantSpec
from compress.export.records import (FP_DTYPES, LAYOUT_NAMES, QUANT_CHANNEL, Reader, Record, decode_values,
                                     encode_float, encode_int, encode_quant)
from compress.layers import quantizable_layers, prunable_layers
from compress.actquant import check_abits, install
from compress.models import ARCHS, ResNet, arch_of, build
from compress.models.net import build_net
from compress.resize import resize_to
from compress.quant import check_granularity, check_mode, check_nbits

MAGIC = b"CMPK"
VERSIONS = (1, 2)  # what this code reads
VERSION = VERSIONS[-1]  # the newest, written when a record needs it
HEADER = struct.Struct("<4sHII")  # magic, version, payload length, crc32(payload)
SUFFIX = ".cpk"


def quant_meta(ckpt: Checkpoint) -> QuantSpec | None:
    """How the checkpoint's block convs were quantized (mode, nbits, granularity, the grids
    recorded when they were baked: none in checkpoints from before they were; the bit widths
    of single layers, ``layer_nbits``), or None."""
    q = (ckpt.meta or {}).get("quant")
    if not q:
        return None
    try:
        grids = {str(n): tuple(np.asarray(g[k], np.float32).reshape(-1) for k in ("scale", "offset"))
                 for n, g in (q.get("grids") or {}).items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta: malformed quantization grids ({type(e).__name__}: {e})") from None
    channel = check_granularity(q.get("granularity", "tensor")) == "channel"
    widths = {f"{n}.weight": check_nbits(b, f"quant.layer_nbits.{n}") for n, b in (q.get("layer_nbits") or {}).items()}
    return QuantSpec(check_mode(q.get("mode")), check_nbits(q.get("nbits")), channel, grids, widths)


def abits_of(quant: Mapping[str, Any] | None) -> int | None:
    """The activation bit width a checkpoint's ``meta["quant"]`` (or a manifest's ``quant``)
    records: None where activations are full precision (and in files from before ``abits``)."""
    return check_abits((quant or {}).get("abits"))


def with_activation_quant(model: nn.Module, abits: int | None) -> nn.Module:
    """``model`` with activation quantizers in its slots if ``abits`` is set (their ranges come
    with the state dict)."""
    if abits is not None:
        install(model, abits)
    return model


def network_of(state_dict: Mapping[str, torch.Tensor], net: Mapping[str, Any] | None, abits: int | None,
               what: str, arch: str | None = None, resized: bool = False) -> nn.Module:
    """A fresh network for ``state_dict``: the CIFAR ResNet ``arch`` (default: the one its
    parameter names tell; with activation quantizers if ``abits``), else the one the ``net``
    config builds, with the layer widths of ``state_dict`` if it is channel-pruned (``resized``);
    ``ValueError`` naming any mismatch (``what``: the checkpoint or the artifact)."""
    arch = arch or arch_of(state_dict)
    if arch in ARCHS:
        model: nn.Module = with_activation_quant(build(arch, int(state_dict["linear.weight"].shape[0])), abits)
    elif isinstance(net, Mapping) and net.get("_target_"):
        model = build_net(net, f"{what} net")
    else:
        raise ValueError(f"{what} is not one of the CIFAR ResNets ({', '.join(ARCHS)}) and records no network "
                         "config to rebuild it from (meta['net']: written by compress.train since it takes any model)")
    if resized:
        resize_to(model, state_dict)
    _check_matches(model, state_dict, what)
    return model


def reference(ckpt: Checkpoint) -> nn.Module:
    """A fresh network of the architecture the checkpoint holds (a CIFAR ResNet, told by its
    parameter names, with activation quantizers if its meta says so; else the network
    ``meta["net"]`` configures), ``ValueError`` naming any mismatch."""
    meta = ckpt.meta or {}
    return network_of(ckpt.state_dict, meta.get("net"), abits_of(meta.get("quant")), "checkpoint",
                      resized=bool(meta.get("resized")))


def quantized_weights(ckpt: Checkpoint, model: nn.Module) -> set[str]:
    """The weight tensors the checkpoint's quantizer made: those with a recorded grid
    (``meta["quant"]["grids"]``), or for checkpoints from before grids were recorded the
    model's default quantized layers."""
    q = (ckpt.meta or {}).get("quant")
    if not q:
        return set()
    grids = q.get("grids")
    return set(grids) if grids else {f"{n}.weight" for n in quantizable_layers(model)}


def _check_matches(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """``ValueError`` naming the first missing, unexpected and misshapen tensors of ``sd``."""
    ref = model.state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    shapes = [k for k in ref if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape)]
    if missing or unexpected or shapes:
        name = f"{model.arch}({model.linear.out_features})" if isinstance(model, ResNet) else type(model).__name__
        raise ValueError(f"{what} does not match {name}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {shapes[:3]}")


def _encode(ckpt: Checkpoint, fp_dtype: str) -> tuple[bytes, list[Record], int]:
    """The artifact, its records, and the bytes before the first record (header + manifest)."""
    if fp_dtype not in FP_DTYPES:
        raise ValueError(f"fp_dtype={fp_dtype!r} is not allowed: use one of {', '.join(FP_DTYPES)}")
    model = reference(ckpt)
    quant, abits = quant_meta(ckpt), abits_of((ckpt.meta or {}).get("quant"))
    quantized = quantized_weights(ckpt, model)
    records = []
    for name, t in ckpt.state_dict.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            records.append(encode_int(name, t))
        elif name in quantized:
            records.append(encode_quant(name, t, quant.for_tensor(name)))
        else:
            records.append(encode_float(name, t, FP_DTYPES[fp_dtype]))
    meta = ckpt.meta or {}
    resnet = isinstance(model, ResNet)
    manifest = {
        "arch": model.arch if resnet else None,
        **({} if resnet else {"net": meta["net"]}),
        **({"data": meta["data"]} if meta.get("data") else {}),
        **({"resized": True} if meta.get("resized") else {}),
        "num_classes": model.linear.out_features if resnet else (meta.get("data") or {}).get("num_classes"),
        "quant": {"mode": quant.mode, "nbits": quant.nbits, **({"granularity": "channel"} if quant.channel else {}),
                  **({"layer_nbits": {n.removesuffix(".weight"): b for n, b in quant.layer_nbits.items()}}
                     if quant.layer_nbits else {}),
                  **({"abits": abits} if abits is not None else {})}
        if quant else None,
        "fp_dtype": fp_dtype,
        "tensors": [[n, list(t.shape)] for n, t in ckpt.state_dict.items()],
    }
    packed = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    payload = b"".join([struct.pack("<I", len(packed)), packed, *(r.head + r.index + r.values for r in records)])
    version = VERSION if any(r.kind == QUANT_CHANNEL for r in records) else VERSIONS[0]
    artifact = HEADER.pack(MAGIC, version, len(payload), zlib.crc32(payload)) + payload
    _check_round_trip(artifact, ckpt, records)
    return artifact, records, HEADER.size + 4 + len(packed)


def _check_round_trip(artifact: bytes, ckpt: Checkpoint, records: list[Record]) -> None:
    """Fail loudly unless decoding ``artifact`` gives back the checkpoint (fp16: as rounded)."""
    _, tensors = _decode(artifact)
    for rec in records:
        want = ckpt.state_dict[rec.name].detach().cpu()
        want = want.half().float() if rec.lossy else want
        if not torch.equal(tensors[rec.name].to(want.dtype), want):
            raise RuntimeError(f"export bug: {rec.name} does not round-trip exactly")


def export(ckpt: Checkpoint, fp_dtype: str = "float32") -> bytes:
    """The packed artifact of a baked checkpoint (see the module docstring for the layout).

    ``fp_dtype`` ("float32" or "float16") is how unquantized floats are stored; in float32
    mode the reloaded weights equal the checkpoint's exactly. Raises ``ValueError`` if the
    checkpoint is not a CIFAR ResNet or its quantized tensors are not on their grid.
    """
    return _encode(ckpt, fp_dtype)[0]


def _split(data: bytes) -> bytes:
    """Check the header and checksum of ``data``; return its payload."""
    if len(data) < HEADER.size:
        raise ValueError(f"truncated artifact: {len(data)} bytes, the header alone is {HEADER.size}")
    magic, version, length, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r}: not a compress artifact (expected {MAGIC!r})")
    if version not in VERSIONS:
        raise ValueError(f"unsupported artifact version {version} (this code reads {', '.join(map(str, VERSIONS))})")
    payload = data[HEADER.size:]
    if len(payload) < length:
        raise ValueError(f"truncated artifact: header says {length} payload bytes, only {len(payload)} present")
    if len(payload) > length:
        raise ValueError(f"corrupt artifact: header says {length} payload bytes, found {len(payload)}")
    if zlib.crc32(payload) != crc:
        raise ValueError(f"checksum mismatch: the artifact is corrupt (crc32 {zlib.crc32(payload):08x}, header {crc:08x})")
    return payload


def _decode(data: bytes, grids: dict[str, list] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the decoded tensors of an artifact; ``grids`` (if given) receives each
    quantized tensor's ``[scales, offsets, nbits]`` by name."""
    r = Reader(_split(data))
    (mlen,) = r.unpack("<I")
    try:
        manifest = json.loads(zlib.decompress(r.take(mlen)))
        tensors_meta = [(str(n), tuple(int(d) for d in s)) for n, s in manifest["tensors"]]
    except (zlib.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"malformed artifact manifest: {e}") from None
    tensors = {}
    for name, shape in tensors_meta:
        r.what = f"record {name!r}"
        grid: list = []
        tensors[name] = decode_values(int(np.prod(shape, dtype=np.int64)), r, grid).reshape(shape)
        if grid and grids is not None:
            grids[name] = grid
    if r.pos != len(r.data):
        raise ValueError(f"malformed artifact: {len(r.data) - r.pos} bytes left after the last record")
    return manifest, tensors


def load(source: bytes | bytearray | memoryview | str | os.PathLike) -> nn.Module:
    """Rebuild the plain network an artifact records (``manifest["arch"]``, e.g. ``resnet56``;
    artifacts written before the model family say ``resnet20``), in eval mode, from its bytes
    or file path.

    Raises ``ValueError`` with the reason for a corrupt, truncated or wrong-version artifact.
    """
    manifest, tensors = _decode(_bytes(source))
    arch = manifest.get("arch")
    if arch is not None and arch not in ARCHS:
        raise ValueError(f"artifact holds a {arch!r}, this code rebuilds {', '.join(ARCHS)} or a recorded network config")
    try:
        model = network_of(tensors, manifest.get("net"), abits_of(manifest.get("quant")), "artifact", arch,
                           bool(manifest.get("resized")))
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed artifact manifest: net or quant ({e})") from None
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def _bytes(source: bytes | bytearray | memoryview | str | os.PathLike) -> bytes:
    return bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()


def checkpoint_of(source: bytes | bytearray | memoryview | str | os.PathLike) -> Checkpoint:
    """An artifact as the checkpoint it was written from, as far as it holds it: the weights,
    the quantization with every quantized tensor's grid (what ``--onnx`` needs), the network
    and data records; pruned weights (exact zeros of the conv/linear weights) as masks."""
    grids: dict[str, list] = {}
    manifest, tensors = _decode(_bytes(source), grids)
    model = load(source)
    masks = {n: m.weight.detach() != 0 for n, m in prunable_layers(model).items() if bool((m.weight == 0).any())}
    meta = {k: manifest[k] for k in ("net", "data", "resized") if manifest.get(k)}
    quant = manifest.get("quant")
    if quant and grids:
        widths = {n.removesuffix(".weight"): int(g[2]) for n, g in grids.items() if int(g[2]) != quant["nbits"]}
        meta["quant"] = {**quant, "grids": {n: {"scale": g[0].tolist(), "offset": g[1].tolist()} for n, g in grids.items()},
                         **({"layer_nbits": widths} if widths else {})}
    return Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, masks, meta)


def read_manifest(source: bytes | bytearray | memoryview | str | os.PathLike) -> dict[str, Any]:
    """What an artifact says of itself: ``arch`` or ``net`` (how to rebuild it), ``quant``,
    ``fp_dtype``, and ``data`` (``num_classes``, ``mean``, ``std``, ``image_size``: the inputs
    the model expects, where the run recorded them; runs from before: CIFAR-10's)."""
    return _decode(_bytes(source))[0]




def _report(ckpt: Checkpoint, artifact: bytes, records: list[Record], preamble: int, fp_dtype: str) -> dict[str, Any]:
    weights = {f"{n}.weight" for n in prunable_layers(reference(ckpt))}
    wrecs = [r for r in records if r.name in weights]
    fp32_bytes = 4 * sum(t.numel() for t in ckpt.state_dict.values())
    predicted = preamble + sum(r.predicted_bits for r in records) / 8
    layouts = {v: sum(r.layout == k for r in wrecs) for k, v in LAYOUT_NAMES.items()}
    return {
        "fp32_bytes": fp32_bytes,
        "compressed_bytes": len(artifact),
        "ratio": fp32_bytes / len(artifact),
        "bits_per_weight": 8 * sum(r.nbytes for r in wrecs) / sum(r.numel for r in wrecs),
        "predicted_bytes": round(predicted),
        "prediction_error": len(artifact) / predicted - 1,
        "fp_dtype": fp_dtype,
        "weight_layouts": layouts,
    }


def size_report(ckpt: Checkpoint, fp_dtype: str = "float32") -> dict[str, Any]:
    """Sizes of ``ckpt`` as fp32 and as an artifact.

    Keys: ``fp32_bytes`` (every parameter and buffer at 4 bytes), ``compressed_bytes`` (the
    artifact's exact size), ``ratio``, ``bits_per_weight`` (bytes of the conv/linear weight
    records, headers included, * 8 / their weight count), ``predicted_bytes`` (header +
    manifest + per tensor: record header + index bits + stored entries * bits per entry,
    without byte padding), ``prediction_error`` (actual / predicted - 1), ``fp_dtype`` and
    ``weight_layouts`` (how many weight tensors are dense / bitmask / delta).
    """
    artifact, records, preamble = _encode(ckpt, fp_dtype)
    return _report(ckpt, artifact, records, preamble, fp_dtype)


def save(ckpt: Checkpoint, path: str | os.PathLike, fp_dtype: str = "float32") -> dict[str, Any]:
    """Write the artifact of ``ckpt`` to ``path`` atomically; return its :func:`size_report`."""
    artifact, records, preamble = _encode(ckpt, fp_dtype)
    atomic_write(Path(path), lambda f: f.write(artifact))
    return _report(ckpt, artifact, records, preamble, fp_dtype)
