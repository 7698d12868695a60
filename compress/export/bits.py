"""Bit packing and the delta-coded sparse position index of the artifact.

Bits are packed least-significant first (``numpy.packbits(bitorder="little")``). A delta index
stores the gaps between stored positions as ``b``-bit symbols, where the all-ones symbol
``M = 2^b - 1`` means "M more skipped, the gap continues".
"""

from __future__ import annotations

import numpy as np

DELTA_WIDTHS = range(1, 17)  # symbol widths the encoder tries


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
