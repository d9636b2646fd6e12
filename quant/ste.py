"""Fake quantization with a straight-through estimator (STE), the building block of QAT.

Forward: ``dequantize(quantize(x))`` (for a ``-had`` spec, of the rotated tensor, rotated back:
the rotation is linear, so the gradient passes through it exactly).  Backward (Bengio et al. 2013; the clipped STE of
Jacob et al. 2018): the gradient passes through unchanged where ``x`` lies inside its
group's clipping range ``[lo, hi]`` and is zero outside it.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from cascade.quant import hadamard, ranges
from cascade.quant.qtensor import _int_spec, validate_input
from cascade.quant.spec import IntSpec, Spec


def clip_range(xg, spec: IntSpec):
    """Per-group clipping range of a grouped view: the spec's estimate, made symmetric (sym)
    or widened to contain 0 (asym), i.e. exactly the interval the scale is fitted to."""
    return ranges.fitted_range(*ranges.estimate_range(xg, spec), spec)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ste(xg, lo, hi, spec):
    scale, zero = ranges.scale_zero_from_range(lo, hi, spec, jnp.float32)
    return ranges.fake_quant_groups(xg, scale, zero, spec)


def _ste_fwd(xg, lo, hi, spec):
    # The output comes from the custom-vjp function itself, so higher-order derivatives
    # (which differentiate this rule) still see the STE rather than round()'s zero slope.
    inside = (xg >= lo[:, None, :]) & (xg <= hi[:, None, :])
    return _ste(xg, lo, hi, spec), (inside, lo, hi)


def _ste_bwd(spec, residuals, g):
    inside, lo, hi = residuals
    # The range is a constant of the STE: no gradient flows to it.
    return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(lo), jnp.zeros_like(hi)


_ste.defvjp(_ste_fwd, _ste_bwd)


@partial(jax.jit, static_argnums=(1, 2))
def _fake_quant(x, spec: IntSpec, axis: int):
    v = hadamard.rotate(x, axis) if spec.rotate else x.astype(jnp.float32)  # -had: what is stored
    xg = ranges.to_groups(v, spec, axis)
    lo, hi = jax.lax.stop_gradient(clip_range(jax.lax.stop_gradient(xg), spec))
    y = ranges.from_groups(_ste(xg, lo, hi, spec), x.shape, spec, axis)
    return (hadamard.unrotate(y, axis) if spec.rotate else y).astype(x.dtype)


def fake_quant(x, spec: Spec | str, *, axis: int = 0):
    """Quantize-dequantize ``x`` (float32 scales, no packing) with a clipped STE gradient.

    The range comes from the spec's clip method (min-max, percentile or MSE search) and is
    treated as a constant in the backward pass.  Works under ``jit``, ``vmap`` and reverse-mode
    ``grad`` of any order; forward mode (``jvp``, ``jacfwd``) is not defined for a custom VJP.
    """
    spec = _int_spec(spec)
    x, axis = validate_input(x, axis, "fake_quant input")
    return _fake_quant(x, spec, axis)
