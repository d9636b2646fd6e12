"""Fake quantization with a straight-through estimator (STE), the building block of QAT.

Forward: ``dequantize(quantize(x))``.  Backward (Bengio et al. 2013; the clipped STE of
Jacob et al. 2018): the gradient passes through unchanged where ``x`` lies inside its
group's clipping range ``[lo, hi]`` and is zero outside it.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from quant import ranges
from quant.spec import Spec
from quant.qtensor import _int_spec


def _clip_range_groups(x, spec, axis):
    """Grouped view (G, g, R), per-group scale/zero (G, R), and the clipping range [lo, hi].

    The range is the spec's estimate, made symmetric (sym) or widened to contain 0 (asym),
    exactly the interval the scale is fitted to.
    """
    xg = ranges.to_groups(x.astype(jnp.float32), spec, axis)
    # the range is a constant of the STE (no gradient through min/max/percentile/search)
    lo, hi = jax.lax.stop_gradient(ranges.estimate_range(jax.lax.stop_gradient(xg), spec))
    if spec.symmetric:
        hi = jnp.maximum(-lo, hi)
        lo = -hi
    else:
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale, zero = ranges.scale_zero_from_range(lo, hi, spec, jnp.float32)
    return xg, scale, zero, lo, hi


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fake_quant(x, spec, axis):
    xg, scale, zero, _, _ = _clip_range_groups(x, spec, axis)
    return ranges.from_groups(ranges.fake_quant_groups(xg, scale, zero, spec), x.shape, spec, axis).astype(x.dtype)


def _fake_quant_fwd(x, spec, axis):
    xg, scale, zero, lo, hi = _clip_range_groups(x, spec, axis)
    # the output comes from the custom-vjp function itself, so that higher-order derivatives
    # (which differentiate this fwd rule) still see the STE rather than round()'s zero slope
    y = _fake_quant(x, spec, axis)
    inside = (xg >= lo[:, None, :]) & (xg <= hi[:, None, :])
    return y, ranges.from_groups(inside, x.shape, spec, axis)


def _fake_quant_bwd(spec, axis, inside, g):
    return (jnp.where(inside, g, jnp.zeros_like(g)),)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)
_fake_quant_jit = jax.jit(_fake_quant, static_argnums=(1, 2))


def fake_quant(x, spec: Spec | str, *, axis: int = 0):
    """Quantize-dequantize ``x`` (float32 scales, no packing) with a clipped STE gradient.

    The range comes from the spec's clip method (min-max, percentile or MSE search) and is
    treated as a constant in the backward pass.  Works under ``jit`` and ``grad``.
    """
    spec = _int_spec(spec)
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"fake_quant takes a floating-point array, got {jnp.result_type(x)}")
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an input of rank {x.ndim}")
    return _fake_quant_jit(x, spec, axis % x.ndim)
