"""One tensor of the artifact as a record: its kind, its layout, and how it is encoded and decoded.

    record  size           field
            1              kind: 0 float, 1 quantized codes, 2 integer, 3 quantized codes with
                           a grid per output channel (artifact version 2)
            1              layout: 0 dense (every entry), 1 bitmask, 2 delta-coded positions
            5              delta only: symbol width b (u8), symbol count (u32)
            1 | 10 | 1     float: dtype (0 fp32, 1 fp16) | quantized: nbits (u8), code shift
                           (u8), scale (f32), offset (f32) | integer: bytes per entry (1/2/4/8)
            6 + 8C         per-channel: nbits (u8), code shift (u8), channel count C (u32), C
                           scales (f32), C offsets (f32); entry i is in channel i // (numel / C)
            ...            index, bit-packed, byte-aligned: bitmask = 1 bit per entry (1 = stored);
                           delta = the gaps between stored positions (see ``bits``)
            ...            values of the stored entries, byte-aligned: fp32/fp16 raw, quantized
                           codes bit-packed at nbits each, integers raw

The layout is picked per tensor as the smallest; dense is allowed for a quantized tensor only
if its zeros are grid values (``sym`` code 0).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compress.export.bits import DELTA_WIDTHS, delta_bits, delta_decode, delta_encode, pack_bits, packed_size, unpack_bits
from compress.export.grid import QuantSpec, dequantize, grid_codes
from compress.quant import code_range

FLOAT, QUANT, INT, QUANT_CHANNEL = 0, 1, 2, 3
DENSE, BITMASK, DELTA = 0, 1, 2
LAYOUT_NAMES = {DENSE: "dense", BITMASK: "bitmask", DELTA: "delta"}
FP_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_FP_CODES = {np.dtype("<f4"): 0, np.dtype("<f2"): 1}
_FP_BY_CODE = {v: k for k, v in _FP_CODES.items()}
_INT_DTYPES = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}


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
    width, dbits = min(((b, delta_bits(positions, b)) for b in DELTA_WIDTHS), key=lambda wb: wb[1])
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


def encode_quant(name: str, w: torch.Tensor, spec: QuantSpec) -> Record:
    """Codes of a quantized float32 tensor with its grid, or one per output channel
    (``ValueError`` if some weight is off its grid)."""
    codes = grid_codes(name, w, spec)
    nbits, lo = spec.nbits, code_range(spec.mode, spec.nbits)[0]
    if spec.channel:
        kind = QUANT_CHANNEL
        grid_head = (struct.pack("<BBI", nbits, -lo, len(codes.scales))
                     + codes.scales.astype("<f4").tobytes() + codes.offsets.astype("<f4").tobytes())
    else:
        kind, grid_head = QUANT, struct.pack("<BBff", nbits, -lo, codes.scales[0], codes.offsets[0])

    def values(present: np.ndarray | None) -> bytes:
        return pack_bits((codes.levels if present is None else codes.levels[present]) - lo, nbits)

    return _record(name, kind, codes.nonzero, bool(codes.on_grid.all()), nbits, grid_head, values)


def encode_float(name: str, w: torch.Tensor, dtype: np.dtype) -> Record:
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


def encode_int(name: str, w: torch.Tensor) -> Record:
    """Integers (e.g. ``num_batches_tracked``) in the fewest bytes that hold them."""
    arr = w.detach().reshape(-1).to(torch.int64).numpy()
    width = next(n for n, dt in _INT_DTYPES.items()
                 if not arr.size or (np.iinfo(dt).min <= arr.min() and arr.max() <= np.iinfo(dt).max))
    data = arr.astype(_INT_DTYPES[width]).tobytes()
    head = struct.pack("<BBB", INT, DENSE, width)
    return Record(name, INT, DENSE, head, b"", data, arr.size, arr.size, 8 * len(data))




class Reader:
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


def decode_values(numel: int, r: Reader, grid: list | None = None) -> torch.Tensor:
    """Decode one record from ``r`` into a flat float32 (or int64) tensor of ``numel`` entries;
    for a quantized record, ``grid`` (if given) receives its ``(scales, offsets, nbits)``."""
    kind, layout = r.unpack("<BB")
    if kind not in (FLOAT, QUANT, INT, QUANT_CHANNEL) or layout not in LAYOUT_NAMES:
        raise ValueError(f"malformed {r.what}: record kind {kind}, layout {layout}")
    width = nsym = 0
    if layout == DELTA:
        width, nsym = r.unpack("<BI")
        if width not in DELTA_WIDTHS:
            raise ValueError(f"malformed {r.what}: delta width {width}")
    if kind == FLOAT:
        (code,) = r.unpack("<B")
        if code not in _FP_BY_CODE:
            raise ValueError(f"malformed {r.what}: float dtype code {code}")
    elif kind == QUANT:
        nbits, shift, scale, offset = r.unpack("<BBff")
        scales, offsets = np.array([scale], np.float32), np.array([offset], np.float32)
    elif kind == QUANT_CHANNEL:
        nbits, shift, channels = r.unpack("<BBI")
        if not channels or numel % channels:
            raise ValueError(f"malformed {r.what}: {channels} channels for {numel} entries")
        scales, offsets = (np.frombuffer(r.take(4 * channels), dtype="<f4") for _ in range(2))
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
        if not 1 <= nbits <= 8:
            raise ValueError(f"malformed {r.what}: nbits {nbits}")
        codes = unpack_bits(r.take(packed_size(count, nbits)), nbits, count)
        if grid is not None:
            grid.extend([scales.astype(np.float32), offsets.astype(np.float32), nbits])
        channel = (np.arange(numel) if positions is None else positions) // (numel // len(scales))
        vals = dequantize(codes - shift, scales[channel], offsets[channel])
    if positions is None:
        return vals
    out = torch.zeros(numel, dtype=torch.float32)
    out[torch.from_numpy(positions)] = vals
    return out
