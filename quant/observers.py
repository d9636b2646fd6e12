"""Calibration observers: activation statistics collected over calibration batches.

Observers are pure: ``state = obs.update(state, batch)`` (``state=None`` starts one), and
``lo, hi = obs.range(state, spec)`` turns the statistics into a quantization range for a
spec, honouring its clip method.  ``channel_axis`` keeps one statistic per index of that axis
(per-channel activation ranges, as SmoothQuant's per-channel absmax); ``None`` is per-tensor.

* :class:`MinMaxObserver`: running min / max (and absmax).
* :class:`HistogramObserver`: a running histogram (re-binned when the range grows, as
  PyTorch's ``HistogramObserver``) from which percentile and MSE-optimal clipping ranges are
  read (TensorRT's percentile and MSE calibrators).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from cascade.quant import ranges
from cascade.quant.spec import IntSpec, Spec, clip_percentile, parse_spec


def _channels_last(x, channel_axis):
    """(N, C) view: rows are observations, columns channels (C=1 per-tensor)."""
    x = jnp.asarray(x, jnp.float32)
    if channel_axis is None:
        return x.reshape(-1, 1)
    if not -x.ndim <= channel_axis < x.ndim:
        raise ValueError(f"channel_axis {channel_axis} is out of range for a batch of rank {x.ndim}")
    return jnp.moveaxis(x, channel_axis, -1).reshape(-1, x.shape[channel_axis])


def _check_batch(x, channel_axis):
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError("observer batches must be floating-point arrays")
    if x.size == 0:
        raise ValueError(f"observer got an empty batch (shape {tuple(x.shape)})")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.isfinite(x).all()):
        raise ValueError("observer batch has NaN/Inf values")
    return _channels_last(x, channel_axis)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMaxObserver:
    """Running per-tensor or per-channel min and max."""

    channel_axis: int | None = None  # axis whose indices keep separate statistics

    def update(self, state, x):
        xs = _check_batch(x, self.channel_axis)
        lo, hi = xs.min(axis=0), xs.max(axis=0)
        if state is None:
            return {"min": lo, "max": hi}
        if state["min"].shape != lo.shape:
            raise ValueError(f"batch has {lo.shape[0]} channels, observer state has {state['min'].shape[0]}")
        return {"min": jnp.minimum(state["min"], lo), "max": jnp.maximum(state["max"], hi)}

    @staticmethod
    def absmax(state):
        return jnp.maximum(-state["min"], state["max"])

    def range(self, state, spec: Spec | str):
        spec = parse_spec(spec)
        if not isinstance(spec, IntSpec):
            raise ValueError(f"{spec} is a float spec; ranges are for integer specs")
        if spec.clip != "minmax":
            raise ValueError(f"MinMaxObserver gives min-max ranges only; use HistogramObserver for {spec.clip}")
        return ranges.fitted_range(state["min"], state["max"], spec)


@partial(jax.jit, static_argnames=("bins",))
def _histogram_update(counts, lo, hi, xs, bins: int):
    """Re-bin ``counts`` (C, bins) over [lo, hi] onto the range grown to cover ``xs``, add ``xs``."""
    new_lo = jnp.minimum(lo, xs.min(axis=0))
    new_hi = jnp.maximum(hi, xs.max(axis=0))
    # a constant channel still needs a positive width; relative, so it survives float32 rounding
    new_hi = jnp.where(new_hi > new_lo, new_hi, new_lo + jnp.maximum(jnp.abs(new_lo) * 1e-5, 1e-12))
    width_old = (hi - lo) / bins
    width_new = (new_hi - new_lo) / bins
    centers = lo[:, None] + (jnp.arange(bins) + 0.5)[None, :] * width_old[:, None]
    idx_old = jnp.clip(jnp.floor((centers - new_lo[:, None]) / width_new[:, None]), 0, bins - 1).astype(jnp.int32)
    rows = jnp.arange(counts.shape[0])[:, None]
    rebinned = jnp.zeros_like(counts).at[rows, idx_old].add(counts)
    idx_new = jnp.clip(jnp.floor((xs - new_lo[None, :]) / width_new[None, :]), 0, bins - 1).astype(jnp.int32)
    cols = jnp.broadcast_to(jnp.arange(xs.shape[1])[None, :], xs.shape)
    return rebinned.at[cols, idx_new].add(1), new_lo, new_hi


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistogramObserver:
    """Running histogram of the values (or of |values| when ``symmetric``), per tensor or channel."""

    channel_axis: int | None = None  # axis whose indices keep separate histograms
    symmetric: bool = True  # histogram |x| over [0, absmax]; else x over [min, max]
    bins: int = 2048

    def __post_init__(self):
        if not isinstance(self.bins, int) or isinstance(self.bins, bool) or self.bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {self.bins!r}")

    def update(self, state, x):
        xs = _check_batch(x, self.channel_axis)
        if self.symmetric:
            xs = jnp.abs(xs)
        if state is None:
            c = xs.shape[1]
            first = xs.min(axis=0) if not self.symmetric else jnp.zeros((c,), jnp.float32)
            # int32 counts: float32 would stop counting at 2**24 per bin
            state = {"counts": jnp.zeros((c, self.bins), jnp.int32), "lo": first, "hi": first}
        elif state["counts"].shape[0] != xs.shape[1]:
            raise ValueError(f"batch has {xs.shape[1]} channels, observer state has {state['counts'].shape[0]}")
        counts, lo, hi = _histogram_update(state["counts"], state["lo"], state["hi"], xs, self.bins)
        return {"counts": counts, "lo": lo, "hi": hi}

    def _centers(self, state):
        width = (state["hi"] - state["lo"]) / self.bins
        return state["lo"][:, None] + (jnp.arange(self.bins) + 0.5)[None, :] * width[:, None]

    def percentile(self, state, pct: float, *, upper: bool = True):
        """The ``pct``-th percentile per channel from the cumulative histogram: the upper edge
        of the first bin reaching ``pct`` (``upper=False``: its lower edge, for lower tails)."""
        counts = state["counts"].astype(jnp.float32)
        cdf = jnp.cumsum(counts, axis=1) / counts.sum(axis=1, keepdims=True)
        idx = jnp.argmax(cdf >= pct / 100.0 - 1e-9, axis=1)
        width = (state["hi"] - state["lo"]) / self.bins
        return state["lo"] + (idx + (1 if upper else 0)) * width

    def range(self, state, spec: Spec | str):
        spec = parse_spec(spec)
        if not isinstance(spec, IntSpec):
            raise ValueError(f"{spec} is a float spec; ranges are for integer specs")
        if spec.symmetric != self.symmetric:
            raise ValueError(f"observer symmetric={self.symmetric} does not match spec {spec}")
        pct = clip_percentile(spec.clip)
        if pct is not None:
            lo, hi = self.percentile(state, 100.0 - pct, upper=False), self.percentile(state, pct)
        elif spec.clip == "mse":
            lo, hi = self._mse_range(state, spec)
        else:
            lo, hi = state["lo"], state["hi"]
        return (-hi, hi) if self.symmetric else (lo, hi)

    def _mse_range(self, state, spec: IntSpec):
        """Shrink ratio minimizing the histogram-weighted squared error (TensorRT's MSE calibrator)."""
        centers = self._centers(state)  # (C, bins)
        counts = state["counts"].astype(jnp.float32)
        lo0, hi0 = (-state["hi"], state["hi"]) if self.symmetric else (state["lo"], state["hi"])
        ratios = ranges.mse_shrink_ratios()

        def error(ratio):
            scale, zero = ranges.scale_zero_from_range(ratio * lo0, ratio * hi0, spec, jnp.float32)
            xg = centers.T[None]  # (1, bins, C) grouped view with one group per channel
            fq = ranges.fake_quant_groups(xg, scale[None], None if zero is None else zero[None], spec)[0].T
            return (counts * (fq - centers) ** 2).sum(axis=1)

        errs = jax.lax.map(error, ratios)  # (n, C)
        best = ratios[jnp.argmin(errs, axis=0)]
        return best * lo0, best * hi0
