"""Slow, obvious float64 numpy references for the quantization core (test-only).

Written from the documented formulas and bit layout, without importing the code under test.
"""

from __future__ import annotations

import math

import numpy as np

RUNS = {8: (1, 1), 4: (2, 1), 3: (8, 3), 2: (4, 1)}  # the table in quant/packing.py's docstring


def unpack(packed: np.ndarray, bits: int, length: int, axis: int = 0) -> np.ndarray:
    """Bytes -> unsigned codes, run by run, straight from the documented layout."""
    n_codes, n_bytes = RUNS[bits]
    p = np.moveaxis(np.asarray(packed), axis, 0).astype(np.int64)
    out = []
    for r in range(p.shape[0] // n_bytes):
        word = sum(p[r * n_bytes + i] << (8 * i) for i in range(n_bytes))
        for j in range(n_codes):
            out.append((word >> (bits * j)) & ((1 << bits) - 1))
    return np.moveaxis(np.stack(out)[:length], 0, axis)


def groups(shape, granularity: str, group_size: int | None, axis: int):
    """Yield index tuples, one per quantization group."""
    k = shape[axis]
    if granularity == "tensor":
        yield tuple(slice(None) for _ in shape)
        return
    size = k if granularity == "channel" else group_size
    others = [range(d) for i, d in enumerate(shape) if i != axis]
    for start in range(0, k, size):
        for idx in np.ndindex(*[len(o) for o in others]):
            full = list(idx)
            full.insert(axis, slice(start, min(start + size, k)))
            yield tuple(full)


def dequantize(u: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, symmetric: bool,
               granularity: str, group_size: int | None, axis: int) -> np.ndarray:
    """x_hat = (q - z) * s per group, in float64, from unsigned codes and stored params."""
    q = u.astype(np.float64) - (2 ** (bits - 1) if symmetric else 0)
    out = np.empty(u.shape, np.float64)
    for gi, idx in enumerate(groups(u.shape, granularity, group_size, axis)):
        pidx = _param_index(idx, granularity, group_size, axis)
        s = float(np.asarray(scale, np.float64)[pidx])
        z = 0.0 if zero is None else float(np.asarray(zero, np.float64)[pidx])
        out[idx] = (q[idx] - z) * s
    return out


def _param_index(idx, granularity, group_size, axis):
    """Index of a group's scale in the stored layout (the reduction axis counts groups)."""
    if granularity == "tensor":
        return (0,) * len(idx)
    group = idx[axis].start // group_size if granularity == "group" else 0
    return tuple(group if i == axis else v for i, v in enumerate(idx))


def minmax_scale(x_group: np.ndarray, bits: int, symmetric: bool, full: bool = False) -> float:
    """The exact (float64, unrounded) min-max scale of one group: absmax / (2^(b-1) - 1) on the
    narrow symmetric grid, absmax / (2^(b-1) - 1/2) on the full one, range / (2^b - 1) asymmetric."""
    if symmetric:
        s = np.abs(x_group).max() / (2 ** (bits - 1) - (0.5 if full else 1))
    else:
        s = (max(x_group.max(), 0.0) - min(x_group.min(), 0.0)) / (2**bits - 1)
    return s if s > 0 else 1.0


def n_groups(k: int, granularity: str, group_size: int | None) -> int:
    return {"tensor": 1, "channel": 1}.get(granularity) or math.ceil(k / group_size)


def dequantize_ref(w) -> np.ndarray:
    """float64 values of a 2-D QuantizedTensor (duck-typed: packed, scale, zero, spec, shape,
    axis), from its bytes by the documented layout."""
    spec = w.spec
    u = unpack(np.asarray(w.packed), spec.bits, w.shape[w.axis], w.axis)
    zero = None if w.zero is None else np.asarray(w.zero, np.float64)
    return dequantize(u, np.asarray(w.scale, np.float64), zero, spec.bits, w.zero is None, spec.granularity,
                      spec.group_size, w.axis)


def expand_params(w) -> tuple[np.ndarray, np.ndarray | None]:
    """A 2-D QuantizedTensor's scale and zero point per element (float64, the tensor's shape)."""
    spec = w.spec
    s_full = np.empty(w.shape, np.float64)
    z_full = None if w.zero is None else np.empty(w.shape, np.float64)
    for idx in groups(w.shape, spec.granularity, spec.group_size, w.axis):
        pidx = _param_index(idx, spec.granularity, spec.group_size, w.axis)
        s_full[idx] = float(np.asarray(w.scale, np.float64)[pidx])
        if z_full is not None:
            z_full[idx] = float(np.asarray(w.zero, np.float64)[pidx])
    return s_full, z_full


def stored_scale_zero(lo: np.ndarray, hi: np.ndarray, spec):
    """Scale and zero point covering [lo, hi] by the documented formulas, float64: the range widened to
    hold 0 (asymmetric) or to [-a, a] (symmetric), the scale stored in float16 rounded up so the range
    fits, the zero point rounded (zeros for symmetric specs)."""
    if spec.symmetric:  # narrow grid: absmax / qmax; full grid (-full, the 2-4-bit default): absmax / (qmax + 1/2)
        s = np.maximum(-lo, hi) / (spec.qmax + 0.5 if spec.full_range else spec.qmax)
    else:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        s = (hi - lo) / (spec.qmax - spec.qmin)
    s = np.where(s > 0, s, 1.0)
    s16 = s.astype(np.float16)
    s = np.where(s16.astype(np.float64) < s, np.nextafter(s16, np.float16(np.inf)), s16).astype(np.float64)
    z = np.zeros_like(s) if spec.symmetric else np.clip(np.round(-lo / s), spec.qmin, spec.qmax)
    return s, z
