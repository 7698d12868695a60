"""Real compression: pack a baked checkpoint into a sparse + n-bit artifact, and reload it.

``python -m compress.export RUN_DIR [-o FILE] [--fp16]`` turns ``RUN_DIR/model.pt`` into
``RUN_DIR/model.cpk`` and prints its size report. The artifact reproduces the checkpoint's
weights exactly (fp32 mode): :func:`load` rebuilds a plain ``resnet20()`` computing the same
logits as the baked model.

Artifact layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"CMPK"
    4       2     format version (u16), currently 1
    6       4     payload length in bytes (u32)
    10      4     CRC-32 of the payload (u32, zlib.crc32)
    14      ...   payload:
                    u32 manifest length, zlib-compressed JSON manifest
                      {"arch", "num_classes", "quant", "fp_dtype", "tensors": [[name, shape], ...]}
                    one record per manifest tensor, in manifest order

    record  size           field
            1              kind: 0 float, 1 quantized codes, 2 integer
            1              layout: 0 dense (every entry), 1 bitmask, 2 delta-coded positions
            5              delta only: symbol width b (u8), symbol count (u32)
            1 | 10 | 1     float: dtype (0 fp32, 1 fp16) | quantized: nbits (u8), code shift
                           (u8), scale (f32), offset (f32) | integer: bytes per entry (1/2/4/8)
            ...            index, bit-packed, byte-aligned: bitmask = 1 bit per entry (1 = stored);
                           delta = the gaps between stored positions as b-bit symbols, where the
                           all-ones symbol M = 2^b - 1 means "M more skipped, gap continues"
            ...            values of the stored entries, byte-aligned: fp32/fp16 raw, quantized
                           codes bit-packed at nbits each, integers raw

Bits are packed least-significant first (``numpy.packbits(bitorder="little")``).

What goes where:

- *Quantized* tensors are the residual-block conv weights when ``meta["quant"]`` is set. Each
  stored entry is an integer code ``c`` with ``value = (c - shift) * scale + offset`` in
  float32, exactly as :func:`compress.quant.quantize` computes it (``shift`` is 0 for
  ``asym``, ``2^(n-1) - 1`` for ``sym`` so the codes fit in n unsigned bits). The baked
  tensor's min/max need not give back the latent tensor's ``scale`` bit for bit, so
  :func:`fit_grid` searches the few float32 neighbours of the estimate for a ``(scale, offset)``
  that reproduces every value, and export fails with ``ValueError`` if none does.
- *Sparse* layouts store only the nonzero entries; zeros come back as zeros. The layout
  (dense / bitmask / delta, and the delta width) is picked per tensor as the smallest, so
  pruned tensors (zeros outside their mask) go sparse and the rest stay dense. Dense is only
  allowed for a quantized tensor if its zeros are grid values (``sym`` code 0); an ``asym``
  tensor with zeros off the grid (kept by the zero-preservation rule) must go sparse.
  (A pruned weight baked as ``-0.0`` comes back as ``+0.0``: equal, and the same logits.)
- Everything else (stem conv, classifier, BatchNorm parameters and buffers) is float32 or,
  with ``fp_dtype="float16"``, float16 (a tensor that would overflow fp16 stays fp32);
  ``num_batches_tracked`` and other integer buffers use the fewest bytes that hold them.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from compress.checkpoint import Checkpoint, atomic_write, load_checkpoint
from compress.layers import block_convs, prunable_layers
from compress.models.resnet import resnet20
from compress.quant import check_mode, check_nbits, code_range

MAGIC = b"CMPK"
VERSION = 1
HEADER = struct.Struct("<4sHII")  # magic, version, payload length, crc32(payload)
SUFFIX = ".cpk"

FLOAT, QUANT, INT = 0, 1, 2
DENSE, BITMASK, DELTA = 0, 1, 2
LAYOUT_NAMES = {DENSE: "dense", BITMASK: "bitmask", DELTA: "delta"}
FP_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_FP_CODES = {np.dtype("<f4"): 0, np.dtype("<f2"): 1}
_FP_BY_CODE = {v: k for k, v in _FP_CODES.items()}
_INT_DTYPES = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}
_DELTA_WIDTHS = range(1, 17)
_ULP_RADIUS = 8  # how many float32 neighbours of an estimated scale fit_grid tries each way


# ----------------------------------------------------------------------------- bit packing


def pack_bits(values: np.ndarray, nbits: int) -> bytes:
    """Pack non-negative integers ``< 2^nbits`` into ``ceil(len * nbits / 8)`` bytes, LSB first."""
    if not 1 <= nbits <= 32:
        raise ValueError(f"nbits={nbits} must be in 1..32")
    v = np.asarray(values).reshape(-1).astype(np.int64)
    if v.size and (v.min() < 0 or v.max() >= 1 << nbits):
        raise ValueError(f"values in {v.min()}..{v.max()} do not fit in {nbits} unsigned bits")
    bits = ((v[:, None] >> np.arange(nbits)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf: bytes, nbits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` ``nbits``-bit integers of ``buf`` (int64)."""
    need = packed_size(count, nbits)
    if len(buf) < need:
        raise ValueError(f"truncated: {count} values of {nbits} bits need {need} bytes, got {len(buf)}")
    raw = np.frombuffer(buf, dtype=np.uint8, count=need)
    bits = np.unpackbits(raw, count=count * nbits, bitorder="little").reshape(count, nbits)
    return (bits.astype(np.int64) << np.arange(nbits)).sum(axis=1)


def packed_size(count: int, nbits: int) -> int:
    """Bytes that :func:`pack_bits` uses for ``count`` values of ``nbits`` bits."""
    return (count * nbits + 7) // 8


# ------------------------------------------------------------------ sparse position index


def _gaps(positions: np.ndarray) -> np.ndarray:
    """Skipped entries before each stored position (the first counts from index 0)."""
    return np.diff(positions, prepend=-1) - 1


def delta_bits(positions: np.ndarray, width: int) -> int:
    """Bits of the delta index of ``positions`` with ``width``-bit symbols."""
    escape = (1 << width) - 1
    return width * int((_gaps(positions) // escape + 1).sum())


def delta_encode(positions: np.ndarray, width: int) -> np.ndarray:
    """Symbols coding the gaps: ``gap // M`` escapes ``M = 2^width - 1``, then ``gap % M``."""
    escape = (1 << width) - 1
    gaps = _gaps(positions)
    counts = gaps // escape + 1
    symbols = np.full(int(counts.sum()), escape, dtype=np.int64)
    symbols[np.cumsum(counts) - 1] = gaps % escape
    return symbols


def delta_decode(symbols: np.ndarray, width: int, numel: int) -> np.ndarray:
    """Positions coded by :func:`delta_encode` (``ValueError`` if they do not fit ``numel``)."""
    escape = (1 << width) - 1
    ends = np.flatnonzero(symbols < escape)
    if len(symbols) and (not len(ends) or ends[-1] != len(symbols) - 1):
        raise ValueError("malformed delta index: it ends inside a gap")
    escapes = np.diff(ends, prepend=-1) - 1
    positions = np.cumsum(escapes * escape + symbols[ends] + 1) - 1
    if len(positions) and positions[-1] >= numel:
        raise ValueError(f"malformed delta index: position {positions[-1]} in a tensor of {numel}")
    return positions


# ------------------------------------------------------------------------ quantization grid


def dequantize(levels: np.ndarray, scale: float, offset: float) -> torch.Tensor:
    """``levels * scale + offset`` in float32, the same two roundings as ``compress.quant``."""
    k = torch.from_numpy(np.asarray(levels, dtype=np.float32))
    return k * torch.tensor(scale, dtype=torch.float32) + torch.tensor(offset, dtype=torch.float32)


def _float32_neighbours(x: float, radius: int) -> list[float]:
    """``x`` (positive) and its float32 neighbours, nearest first: x, x+1ulp, x-1ulp, ..."""
    bits = int(np.array(x, dtype=np.float32).view(np.int32))
    steps = [0] + [s for j in range(1, radius + 1) for s in (j, -j)]
    out = [float(np.array(bits + s, dtype=np.int32).view(np.float32)) for s in steps if bits + s > 0]
    return [v for v in out if np.isfinite(v)]


def _try_grid(values: np.ndarray, scale: float, offset: float, lo: int, hi: int) -> np.ndarray | None:
    """Levels that reproduce ``values`` exactly with ``(scale, offset)``, or None."""
    levels = np.round((values.astype(np.float64) - offset) / scale)
    if levels.size and (levels.min() < lo or levels.max() > hi):
        return None
    back = dequantize(levels, scale, offset).numpy()
    return levels.astype(np.int64) if np.array_equal(back, values) else None


def _grid_candidates(u: np.ndarray, mode: str, nbits: int, zeros: bool) -> Iterator[tuple[float, float]]:
    """``(offset, scale estimate)`` pairs to try, most likely first (``u``: sorted distinct
    nonzero float32 values; ``zeros``: whether the tensor also holds zeros)."""
    top = code_range(mode, nbits)[1]
    f32 = np.float32
    if mode == "sym":
        for k in range(top, 0, -1):  # largest |value| on level k (k < top: odd tensors only)
            yield 0.0, float(f32(np.abs(u).max()) / f32(k))
        return
    # What compress.quant computed from the latent tensor, whose min/max are the baked
    # extremes, or 0 where the extreme was a (pruned) zero.
    lo = min(u[0], f32(0)) if zeros else u[0]
    hi = max(u[-1], f32(0)) if zeros else u[-1]
    yield float(lo), float((f32(hi) - f32(lo)) / f32(top))
    for k in range(top, 0, -1):  # fallback: the largest value on level k, either offset
        for offset in (u[0], f32(0)):
            yield float(offset), float((f32(u[-1]) - f32(offset)) / f32(k))


def fit_grid(values: torch.Tensor, mode: str, nbits: int, zeros: bool = False) -> tuple[float, float]:
    """A float32 ``(scale, offset)`` whose ``mode``/``nbits`` grid holds every value exactly.

    ``values`` are the nonzero entries of a tensor baked by :func:`compress.quant.quantize`
    (``zeros``: whether that tensor has zeros too). The offset is the code-0 level (``asym``:
    the tensor's minimum, or 0 when the minimum was a zero; ``sym``: 0) and the scale is
    re-derived from the extremes as ``compress.quant`` does. The baked extremes can differ
    from the latent ones by float rounding, so each estimate's float32 neighbours are tried
    too, nearest first. Raises ``ValueError`` if no candidate reproduces all values bit for bit.
    """
    u = np.unique(values.detach().cpu().numpy().astype(np.float32).reshape(-1))
    lo, hi = code_range(mode, nbits)
    if u.size == 0:
        return 1.0, 0.0
    for offset, estimate in _grid_candidates(u, mode, nbits, zeros):
        scales = _float32_neighbours(estimate, _ULP_RADIUS) if estimate > 0 else [1.0]  # one level: any scale
        for scale in scales:
            if _try_grid(u, scale, offset, lo, hi) is not None:
                return scale, offset
    raise ValueError(
        f"the values ({u.size} distinct, {u.min():.6g}..{u.max():.6g}) are not on a {mode} {nbits}-bit grid: "
        "they cannot be stored exactly as codes (is this checkpoint baked with this quantization?)"
    )


# ------------------------------------------------------------------------------- records


@dataclass
class Record:
    """One tensor, encoded: ``head`` (record header), ``index`` and ``values`` bytes, plus the
    unpadded bit count of index + values used for the size prediction."""

    name: str
    kind: int
    layout: int
    head: bytes
    index: bytes
    values: bytes
    numel: int
    stored: int
    bits: int
    lossy: bool = False  # floats rounded to fp16

    @property
    def nbytes(self) -> int:
        return len(self.head) + len(self.index) + len(self.values)

    @property
    def predicted_bits(self) -> int:
        return 8 * len(self.head) + self.bits


def _choose_layout(present: np.ndarray, value_bits: int, dense_ok: bool) -> tuple[int, int, int]:
    """Smallest layout for a tensor whose ``present`` entries must be stored (each
    ``value_bits`` bits): ``(layout, index_bits, delta_width)``."""
    numel, nnz = present.size, int(present.sum())
    positions = np.flatnonzero(present)
    width, dbits = min(((b, delta_bits(positions, b)) for b in _DELTA_WIDTHS), key=lambda wb: wb[1])
    options = {  # layout: (total bits incl. its header, index bits, delta width)
        BITMASK: (numel + nnz * value_bits, numel, 0),
        DELTA: (40 + dbits + nnz * value_bits, dbits, width),
    }
    if dense_ok:
        options[DENSE] = (numel * value_bits, 0, 0)
    layout = min(options, key=lambda k: (options[k][0], k))
    return layout, options[layout][1], options[layout][2]


def _index(present: np.ndarray, layout: int, width: int) -> tuple[bytes, bytes]:
    """``(layout header bytes, index bytes)`` for the chosen layout."""
    if layout == DENSE:
        return b"", b""
    if layout == BITMASK:
        return b"", pack_bits(present.astype(np.int64), 1)
    symbols = delta_encode(np.flatnonzero(present), width)
    return struct.pack("<BI", width, len(symbols)), pack_bits(symbols, width)


def _record(name: str, kind: int, present: np.ndarray, dense_ok: bool, value_bits: int,
            kind_head: bytes, encode_values: Any) -> Record:
    """Pick the layout, then assemble the record (``encode_values(mask_or_None) -> bytes``)."""
    layout, index_bits, width = _choose_layout(present, value_bits, dense_ok)
    layout_head, index = _index(present, layout, width)
    stored = present.size if layout == DENSE else int(present.sum())
    values = encode_values(None if layout == DENSE else present)
    head = struct.pack("<BB", kind, layout) + layout_head + kind_head
    return Record(name, kind, layout, head, index, values, present.size, stored, index_bits + stored * value_bits)


def _encode_quant(name: str, w: torch.Tensor, mode: str, nbits: int) -> Record:
    """Codes of a quantized float32 tensor (``ValueError`` if some weight is off every grid)."""
    if w.dtype != torch.float32:
        raise ValueError(f"{name}: quantized tensors must be float32, got {w.dtype}")
    flat = w.reshape(-1)
    nonzero = (flat != 0).numpy()
    try:
        scale, offset = fit_grid(flat[torch.from_numpy(nonzero)], mode, nbits, zeros=not nonzero.all())
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    lo, hi = code_range(mode, nbits)
    arr = flat.numpy()
    levels = np.clip(np.round((arr.astype(np.float64) - offset) / scale), lo, hi).astype(np.int64)
    on_grid = dequantize(levels, scale, offset).numpy() == arr  # zeros may be off the grid (asym)
    if not on_grid[nonzero].all():  # cannot happen after fit_grid; the round trip re-checks anyway
        raise ValueError(f"{name}: {int((~on_grid[nonzero]).sum())} weights are off the {mode} {nbits}-bit grid")

    def values(present: np.ndarray | None) -> bytes:
        return pack_bits((levels if present is None else levels[present]) - lo, nbits)

    return _record(name, QUANT, nonzero, bool(on_grid.all()), nbits,
                   struct.pack("<BBff", nbits, -lo, scale, offset), values)


def _encode_float(name: str, w: torch.Tensor, dtype: np.dtype) -> Record:
    """Raw float values (fp32, or fp16 unless the tensor overflows it)."""
    arr = w.detach().reshape(-1).to(torch.float32).numpy()
    if dtype == FP_DTYPES["float16"] and not np.isfinite(arr.astype(dtype)[np.isfinite(arr)]).all():
        dtype = FP_DTYPES["float32"]
    present = arr != 0

    def values(mask: np.ndarray | None) -> bytes:
        return (arr if mask is None else arr[mask]).astype(dtype).tobytes()

    rec = _record(name, FLOAT, present, True, 8 * dtype.itemsize, struct.pack("<B", _FP_CODES[dtype]), values)
    rec.lossy = dtype != FP_DTYPES["float32"]
    return rec


def _encode_int(name: str, w: torch.Tensor) -> Record:
    """Integers (e.g. ``num_batches_tracked``) in the fewest bytes that hold them."""
    arr = w.detach().reshape(-1).to(torch.int64).numpy()
    width = next(n for n, dt in _INT_DTYPES.items()
                 if not arr.size or (np.iinfo(dt).min <= arr.min() and arr.max() <= np.iinfo(dt).max))
    data = arr.astype(_INT_DTYPES[width]).tobytes()
    head = struct.pack("<BBB", INT, DENSE, width)
    return Record(name, INT, DENSE, head, b"", data, arr.size, arr.size, 8 * len(data))


# ------------------------------------------------------------------------------- decoding


class _Reader:
    """A cursor over bytes whose reads past the end raise ``ValueError`` ("truncated")."""

    def __init__(self, data: bytes, what: str = "artifact") -> None:
        self.data, self.pos, self.what = memoryview(data), 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"truncated or malformed {self.what}: needs {n} bytes at offset {self.pos}, "
                             f"{len(self.data) - self.pos} left")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def _decode_values(numel: int, r: _Reader) -> torch.Tensor:
    """Decode one record from ``r`` into a flat float32 (or int64) tensor of ``numel`` entries."""
    kind, layout = r.unpack("<BB")
    if kind not in (FLOAT, QUANT, INT) or layout not in LAYOUT_NAMES:
        raise ValueError(f"malformed {r.what}: record kind {kind}, layout {layout}")
    width = nsym = 0
    if layout == DELTA:
        width, nsym = r.unpack("<BI")
        if width not in _DELTA_WIDTHS:
            raise ValueError(f"malformed {r.what}: delta width {width}")
    if kind == FLOAT:
        (code,) = r.unpack("<B")
        if code not in _FP_BY_CODE:
            raise ValueError(f"malformed {r.what}: float dtype code {code}")
    elif kind == QUANT:
        nbits, shift, scale, offset = r.unpack("<BBff")
        if not 1 <= nbits <= 8:
            raise ValueError(f"malformed {r.what}: nbits {nbits}")
    else:
        (nbytes,) = r.unpack("<B")
        if nbytes not in _INT_DTYPES or layout != DENSE:
            raise ValueError(f"malformed {r.what}: integer width {nbytes}, layout {layout}")
        return torch.from_numpy(np.frombuffer(r.take(numel * nbytes), dtype=_INT_DTYPES[nbytes]).astype(np.int64))

    if layout == DENSE:
        positions = None
        count = numel
    elif layout == BITMASK:
        positions = np.flatnonzero(unpack_bits(r.take(packed_size(numel, 1)), 1, numel))
        count = len(positions)
    else:
        positions = delta_decode(unpack_bits(r.take(packed_size(nsym, width)), width, nsym), width, numel)
        count = len(positions)

    if kind == FLOAT:
        dtype = _FP_BY_CODE[code]
        vals = torch.from_numpy(np.frombuffer(r.take(count * dtype.itemsize), dtype=dtype).astype(np.float32))
    else:
        codes = unpack_bits(r.take(packed_size(count, nbits)), nbits, count)
        vals = dequantize(codes - shift, scale, offset)
    if positions is None:
        return vals
    out = torch.zeros(numel, dtype=torch.float32)
    out[torch.from_numpy(positions)] = vals
    return out


# ------------------------------------------------------------------------------ artifact


def _quant_meta(ckpt: Checkpoint) -> tuple[str, int] | None:
    q = (ckpt.meta or {}).get("quant")
    if not q:
        return None
    return check_mode(q.get("mode")), check_nbits(q.get("nbits"))


def _reference(ckpt: Checkpoint) -> tuple[nn.Module, int]:
    """A fresh ``resnet20`` matching the checkpoint (``ValueError`` naming any mismatch)."""
    sd = ckpt.state_dict
    if "linear.weight" not in sd:
        raise ValueError("checkpoint is not a ResNet-20: it has no 'linear.weight'")
    num_classes = int(sd["linear.weight"].shape[0])
    ref = resnet20(num_classes).state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    shapes = [k for k in ref if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint does not match resnet20({num_classes}): missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {shapes[:3]}")
    return resnet20(num_classes), num_classes


def _encode(ckpt: Checkpoint, fp_dtype: str) -> tuple[bytes, list[Record], int]:
    """The artifact, its records, and the bytes before the first record (header + manifest)."""
    if fp_dtype not in FP_DTYPES:
        raise ValueError(f"fp_dtype={fp_dtype!r} is not allowed: use one of {', '.join(FP_DTYPES)}")
    model, num_classes = _reference(ckpt)
    quant = _quant_meta(ckpt)
    quantized = {f"{n}.weight" for n in block_convs(model)} if quant else set()
    records = []
    for name, t in ckpt.state_dict.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            records.append(_encode_int(name, t))
        elif name in quantized:
            records.append(_encode_quant(name, t, *quant))
        else:
            records.append(_encode_float(name, t, FP_DTYPES[fp_dtype]))
    manifest = {
        "arch": "resnet20",
        "num_classes": num_classes,
        "quant": {"mode": quant[0], "nbits": quant[1]} if quant else None,
        "fp_dtype": fp_dtype,
        "tensors": [[n, list(t.shape)] for n, t in ckpt.state_dict.items()],
    }
    packed = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    payload = b"".join([struct.pack("<I", len(packed)), packed, *(r.head + r.index + r.values for r in records)])
    artifact = HEADER.pack(MAGIC, VERSION, len(payload), zlib.crc32(payload)) + payload
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
    checkpoint is not a ResNet-20 or its quantized tensors are not on their grid.
    """
    return _encode(ckpt, fp_dtype)[0]


def _split(data: bytes) -> bytes:
    """Check the header and checksum of ``data``; return its payload."""
    if len(data) < HEADER.size:
        raise ValueError(f"truncated artifact: {len(data)} bytes, the header alone is {HEADER.size}")
    magic, version, length, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r}: not a compress artifact (expected {MAGIC!r})")
    if version != VERSION:
        raise ValueError(f"unsupported artifact version {version} (this code reads {VERSION})")
    payload = data[HEADER.size:]
    if len(payload) < length:
        raise ValueError(f"truncated artifact: header says {length} payload bytes, only {len(payload)} present")
    if len(payload) > length:
        raise ValueError(f"corrupt artifact: header says {length} payload bytes, found {len(payload)}")
    if zlib.crc32(payload) != crc:
        raise ValueError(f"checksum mismatch: the artifact is corrupt (crc32 {zlib.crc32(payload):08x}, header {crc:08x})")
    return payload


def _decode(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the decoded tensors of an artifact."""
    r = _Reader(_split(data))
    (mlen,) = r.unpack("<I")
    try:
        manifest = json.loads(zlib.decompress(r.take(mlen)))
        tensors_meta = [(str(n), tuple(int(d) for d in s)) for n, s in manifest["tensors"]]
    except (zlib.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"malformed artifact manifest: {e}") from None
    tensors = {}
    for name, shape in tensors_meta:
        r.what = f"record {name!r}"
        tensors[name] = _decode_values(int(np.prod(shape, dtype=np.int64)), r).reshape(shape)
    if r.pos != len(r.data):
        raise ValueError(f"malformed artifact: {len(r.data) - r.pos} bytes left after the last record")
    return manifest, tensors


def load(source: bytes | bytearray | memoryview | str | os.PathLike) -> nn.Module:
    """Rebuild a plain ``resnet20()`` (in eval mode) from an artifact's bytes or file path.

    Raises ``ValueError`` with the reason for a corrupt, truncated or wrong-version artifact.
    """
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    manifest, tensors = _decode(data)
    if manifest.get("arch") != "resnet20":
        raise ValueError(f"artifact holds a {manifest.get('arch')!r}, this code rebuilds only 'resnet20'")
    try:
        model = resnet20(int(manifest["num_classes"]))
        model.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"artifact does not match resnet20: {e}") from None
    return model.eval()


# --------------------------------------------------------------------------------- report


def _report(ckpt: Checkpoint, artifact: bytes, records: list[Record], preamble: int, fp_dtype: str) -> dict[str, Any]:
    weights = {f"{n}.weight" for n in prunable_layers(resnet20(int(ckpt.state_dict["linear.weight"].shape[0])))}
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


# ------------------------------------------------------------------------------------ CLI


def _resolve(source: str) -> Path:
    """The checkpoint file of a run dir (``model.pt``) or the file itself."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such checkpoint (give a run dir holding model.pt, or a .pt file)")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m compress.export SOURCE [-o FILE] [--fp16]``; 2 on a user error."""
    parser = argparse.ArgumentParser(prog="python -m compress.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run dir (holding model.pt) or checkpoint file")
    parser.add_argument("-o", "--output", help=f"artifact path (default: next to the checkpoint, *{SUFFIX})")
    parser.add_argument("--fp16", action="store_true", help="store unquantized floats as float16")
    args = parser.parse_args(argv)
    try:
        path = _resolve(args.source)
        try:
            ckpt = load_checkpoint(str(path))
        except ValueError as e:
            reason = str(e).splitlines()[0]  # torch's unpickling errors run over many lines
            raise ValueError(f"{path}: cannot read the checkpoint ({reason})") from None
        out = Path(args.output) if args.output else path.with_suffix(SUFFIX)
        report = save(ckpt, out, "float16" if args.fp16 else "float32")
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    print(f"  fp32_bytes        {report['fp32_bytes']:>10,}")
    print(f"  compressed_bytes  {report['compressed_bytes']:>10,}")
    print(f"  ratio             {report['ratio']:>10.2f}x")
    print(f"  bits_per_weight   {report['bits_per_weight']:>10.3f}")
    print(f"  predicted_bytes   {report['predicted_bytes']:>10,}  (actual {report['prediction_error']:+.2%})")
    print(f"  weight layouts    {report['weight_layouts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
