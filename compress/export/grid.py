"""The exact quantization grid of a baked tensor: which float32 ``(scale, offset)`` and integer
codes give back every value bit for bit, as :func:`compress.quant.quantize` computed it.

The grid is one per tensor or, for per-channel quantization, one per output channel (row of
dim 0). Where the checkpoint recorded the grids it was baked with (``meta["quant"]["grids"]``,
see :func:`compress.quant.baked_grids`), they are used: learned ranges cannot be told from the
values. Else each grid is fitted to its values by :func:`fit_grid`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping

import numpy as np
import torch

from compress.quant import code_range

_ULP_RADIUS = 8  # how many float32 neighbours of an estimated scale fit_grid tries each way


def dequantize(levels: np.ndarray, scale: float | np.ndarray, offset: float | np.ndarray) -> torch.Tensor:
    """``levels * scale + offset`` in float32 (elementwise or broadcast), the same two roundings
    as ``compress.quant``."""
    k = torch.from_numpy(np.asarray(levels, dtype=np.float32))
    return k * torch.from_numpy(np.asarray(scale, np.float32)) + torch.from_numpy(np.asarray(offset, np.float32))


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


@dataclass(frozen=True)
class QuantSpec:
    """How a checkpoint's block convs were quantized: ``mode``, ``nbits``, one grid per output
    channel (``channel``) or per tensor, the grids recorded at bake time, by weight name:
    ``(scales, offsets)`` float32 arrays, one entry per grid, and the bit widths of the tensors
    quantized at another width than ``nbits`` (``layer_nbits``, by weight name)."""

    mode: str
    nbits: int
    channel: bool = False
    grids: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    layer_nbits: Mapping[str, int] = field(default_factory=dict)

    def for_tensor(self, name: str) -> QuantSpec:
        """This spec at the bit width of the weight ``name``."""
        return replace(self, nbits=self.layer_nbits.get(name, self.nbits))


@dataclass
class Codes:
    """A quantized tensor as integer ``levels`` (flat, in :func:`compress.quant.code_range`) with
    ``value = levels * scale + offset`` in float32 wherever ``on_grid``, ``scale``/``offset`` the
    entry of ``scales``/``offsets`` of its grid (one, or one per output channel); ``nonzero``
    marks the entries that are not exactly zero (zeros may be off the grid: ``asym`` keeps
    pruned zeros)."""

    levels: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray
    nonzero: np.ndarray
    on_grid: np.ndarray


def _grids(name: str, rows: np.ndarray, nonzero: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, str]:
    """``(scales, offsets, where from)`` of each row of ``rows``: recorded, else fitted."""
    if name in spec.grids:
        scales, offsets = spec.grids[name]
        if not len(scales) == len(offsets) == len(rows):
            raise ValueError(f"{name}: {len(scales)} recorded scales and {len(offsets)} offsets for {len(rows)} grids")
        return scales, offsets, "recorded"
    fitted = []
    for i, (row, nz) in enumerate(zip(rows, nonzero)):
        try:
            fitted.append(fit_grid(torch.from_numpy(row[nz]), spec.mode, spec.nbits, zeros=not nz.all()))
        except ValueError as e:
            raise ValueError(f"{name}{f' channel {i}' if spec.channel else ''}: {e}") from None
    scales, offsets = (np.array(v, dtype=np.float32) for v in zip(*fitted))
    return scales, offsets, "fitted"


def grid_codes(name: str, w: torch.Tensor, spec: QuantSpec) -> Codes:
    """The codes of the float32 tensor ``w`` baked by ``spec``'s quantization; ``ValueError``
    naming ``name`` if it is not float32 or some nonzero weight is off its grid."""
    if w.dtype != torch.float32:
        raise ValueError(f"{name}: quantized tensors must be float32, got {w.dtype}")
    rows = w.detach().cpu().reshape(w.shape[0] if spec.channel else 1, -1).numpy()
    nonzero = rows != 0
    scales, offsets, source = _grids(name, rows, nonzero, spec)
    lo, hi = code_range(spec.mode, spec.nbits)
    levels = np.clip(np.round((rows.astype(np.float64) - offsets[:, None]) / scales[:, None]), lo, hi).astype(np.int64)
    on_grid = dequantize(levels, scales[:, None], offsets[:, None]).numpy() == rows
    if not on_grid[nonzero].all():  # a fitted grid cannot miss; a recorded one must match too
        raise ValueError(f"{name}: {int((~on_grid[nonzero]).sum())} weights are off their {source} "
                         f"{spec.mode} {spec.nbits}-bit grid")
    return Codes(levels.reshape(-1), scales, offsets, nonzero.reshape(-1), on_grid.reshape(-1))
