"""Grouped views of a tensor and range estimation (min-max, percentile, MSE search).

A tensor is quantized along one *reduction axis* (the axis a matmul contracts).  For range
estimation it is viewed as ``(G, g, R)``: ``G`` groups of ``g`` consecutive values along the
reduction axis, for each of the ``R`` channels (all other axes flattened).  A last group shorter
than ``g`` is padded with NaN and every statistic ignores NaN, so short groups are exact.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cascade.quant.spec import IntSpec, clip_percentile

# MSE clipping search, as GPTQ's ``Quantizer.find_params(mse=True)``: shrink the range by
# ratios 1.00, 0.99, ..., 0.21 and keep, per group, the ratio with the lowest error.
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.0


def group_geometry(shape: tuple[int, ...], spec: IntSpec, axis: int) -> tuple[int, int, int]:
    """(G groups, g values per group, R channels) of the grouped view."""
    k = shape[axis]
    rest = math.prod(shape) // k if k else 0
    if spec.granularity == "tensor":
        return 1, math.prod(shape), 1
    if spec.granularity == "channel":
        return 1, k, rest
    g = min(spec.group_size, k)  # a group longer than the axis is the whole axis
    return math.ceil(k / g), g, rest


def scale_shape(shape: tuple[int, ...], spec: IntSpec, axis: int) -> tuple[int, ...]:
    """Shape of the stored scale (and zero point): the reduction axis holds one entry per group."""
    if spec.granularity == "tensor":
        return (1,) * len(shape)
    axis %= len(shape)
    n_groups, _, _ = group_geometry(shape, spec, axis)
    return tuple(n_groups if i == axis else d for i, d in enumerate(shape))


def to_groups(x: jnp.ndarray, spec: IntSpec, axis: int) -> jnp.ndarray:
    """View ``x`` as (G, g, R), NaN-padding a short last group."""
    n_groups, g, r = group_geometry(x.shape, spec, axis)
    if spec.granularity == "tensor":
        return x.reshape(1, g, 1)
    k = x.shape[axis]
    x2 = jnp.moveaxis(x, axis, 0).reshape(k, r)
    if n_groups * g != k:
        x2 = jnp.pad(x2, ((0, n_groups * g - k), (0, 0)), constant_values=jnp.nan)
    return x2.reshape(n_groups, g, r)


def from_groups(xg: jnp.ndarray, shape: tuple[int, ...], spec: IntSpec, axis: int) -> jnp.ndarray:
    """Inverse of :func:`to_groups` (drops the padding)."""
    if spec.granularity == "tensor":
        return xg.reshape(shape)
    k = shape[axis]
    moved = (k,) + tuple(d for i, d in enumerate(shape) if i != axis)
    x2 = xg.reshape(-1, xg.shape[-1])[:k]
    return jnp.moveaxis(x2.reshape(moved), 0, axis)


def groups_to_scale_layout(stat: jnp.ndarray, shape: tuple[int, ...], spec: IntSpec, axis: int) -> jnp.ndarray:
    """A per-group statistic of shape (G, R) laid out as :func:`scale_shape`."""
    if spec.granularity == "tensor":
        return stat.reshape(scale_shape(shape, spec, axis))
    rest = tuple(d for i, d in enumerate(shape) if i != axis)
    return jnp.moveaxis(stat.reshape((stat.shape[0],) + rest), 0, axis)


def scale_layout_to_groups(param: jnp.ndarray, spec: IntSpec, axis: int) -> jnp.ndarray:
    """Inverse of :func:`groups_to_scale_layout`: (G, R) from the stored layout."""
    if spec.granularity == "tensor":
        return param.reshape(1, 1)
    p = jnp.moveaxis(param, axis, 0)
    return p.reshape(p.shape[0], -1)


def fitted_range(lo, hi, spec: IntSpec):
    """The interval a scale is fitted to: ``[-a, a]`` with ``a = max(|lo|, |hi|)`` (symmetric), or
    ``[min(lo, 0), max(hi, 0)]`` (asymmetric: widened to contain 0, so 0 is exact)."""
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    if spec.symmetric:
        a = jnp.maximum(-lo, hi)
        return -a, a
    return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)


def scale_zero_from_range(lo, hi, spec: IntSpec, scale_dtype=jnp.float16):
    """Scale and zero point covering [lo, hi] (arrays of equal shape).

    Symmetric: ``s = max(|lo|, |hi|) / qmax`` (``/ (qmax + 0.5)`` on the full grid), ``z = 0``.  Asymmetric: the range is widened to
    contain 0 (so 0 is exact), ``s = (hi - lo) / (2**bits - 1)``, ``z = round(-lo / s)``.
    The scale is rounded *up* to ``scale_dtype`` so that the range still fits the integer grid
    with the stored scale; that keeps the rounding error at most ``s/2`` inside the range.
    An all-zero group gets ``s = 1``.  Returns ``(scale, zero)`` with ``zero`` None if symmetric.
    """
    lo, hi = fitted_range(lo, hi, spec)
    if spec.symmetric:
        s = hi / spec.scale_divisor
    else:  # hi - lo overflows float32 for ranges wider than ~3.4e38; the scale itself is far below that
        levels = spec.qmax - spec.qmin
        width = hi - lo
        s = jnp.where(jnp.isfinite(width), width / levels, hi / levels - lo / levels)
    s = jnp.where(s > 0, s, 1.0)
    stored = s.astype(scale_dtype)
    stored = jnp.where(stored.astype(jnp.float32) < s, jnp.nextafter(stored, jnp.asarray(jnp.inf, scale_dtype)), stored)
    if spec.symmetric:
        return stored, None
    z = jnp.clip(jnp.round(-lo / stored.astype(jnp.float32)), spec.qmin, spec.qmax)
    return stored, z.astype(scale_dtype)


def quantize_groups(xg, scale, zero, spec: IntSpec):
    """``q = clip(round(x / s) + z, qmin, qmax)`` on a grouped view (G, g, R), params (G, R)."""
    s = scale.astype(jnp.float32)[:, None, :]
    z = 0.0 if zero is None else zero.astype(jnp.float32)[:, None, :]
    return jnp.clip(jnp.round(xg / s) + z, spec.qmin, spec.qmax)


def dequantize_groups(qg, scale, zero):
    """``x_hat = (q - z) * s`` on a grouped view (G, g, R), params (G, R), in float32."""
    z = 0.0 if zero is None else zero.astype(jnp.float32)[:, None, :]
    return (qg - z) * scale.astype(jnp.float32)[:, None, :]


def fake_quant_groups(xg, scale, zero, spec: IntSpec):
    """Quantize-dequantize a grouped view (G, g, R) with per-group (G, R) params, in float32."""
    return dequantize_groups(quantize_groups(xg, scale, zero, spec), scale, zero)


def _minmax(xg):
    return jnp.nanmin(xg, axis=1), jnp.nanmax(xg, axis=1)


def _percentile(xg, pct: float, symmetric: bool):
    if symmetric:
        a = jnp.nanpercentile(jnp.abs(xg), pct, axis=1)
        return -a, a
    return jnp.nanpercentile(xg, 100.0 - pct, axis=1), jnp.nanpercentile(xg, pct, axis=1)


def mse_shrink_ratios() -> jnp.ndarray:
    """The candidate range-shrink ratios of the MSE search: 1.00, 0.99, ..., 0.21."""
    return 1.0 - jnp.arange(int(MSE_MAX_SHRINK * MSE_GRID), dtype=jnp.float32) / MSE_GRID


def _mse_search(xg, spec: IntSpec):
    lo0, hi0 = _minmax(xg)
    if spec.symmetric:
        a = jnp.maximum(-lo0, hi0)
        lo0, hi0 = -a, a
    xg32 = xg.astype(jnp.float32)
    ratios = mse_shrink_ratios()

    def step(best, ratio):
        best_err, best_ratio = best
        scale, zero = scale_zero_from_range(ratio * lo0, ratio * hi0, spec, jnp.float32)
        err = jnp.abs(fake_quant_groups(xg32, scale, zero, spec) - xg32) ** MSE_NORM
        err = jnp.nansum(err, axis=1)
        better = err < best_err
        return (jnp.where(better, err, best_err), jnp.where(better, ratio, best_ratio)), None

    init = (jnp.full(lo0.shape, jnp.inf, jnp.float32), jnp.ones(lo0.shape, jnp.float32))
    (_, ratio), _ = jax.lax.scan(step, init, ratios)
    return ratio * lo0, ratio * hi0


def estimate_range(xg: jnp.ndarray, spec: IntSpec) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-group (lo, hi) of a grouped view (G, g, R) with the spec's clip method, each (G, R)."""
    pct = clip_percentile(spec.clip)
    if pct is not None:
        return _percentile(xg, pct, spec.symmetric)
    if spec.clip == "mse":
        return _mse_search(xg, spec)
    return _minmax(xg)
