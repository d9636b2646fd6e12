"""HQQ on one tensor (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning
Models"): calibration-free optimisation of each group's zero point (asymmetric specs) or scale
(symmetric specs), in pure JAX.

RTN picks each group's parameters from its min and max; one outlier then stretches the grid for
the whole group.  HQQ keeps the grid step and instead fits the parameters to minimise a *sparse*
error, ``||W - W_hat||_p^p`` with ``p < 1`` (default 0.7): a few large errors (the outliers) cost
little, so the grid moves to fit the bulk of the weights.  The non-convex problem is split with an
auxiliary error variable ``W_e`` (half-quadratic splitting) and solved by alternating closed
forms, as ``optimize_weights_proximal_legacy`` of the reference code (github mobiusml/hqq,
``hqq/core/optimize.py``).  With our convention ``W_hat = (Q - z) * s`` (the reference stores the
inverse scale and has the same sign for ``z``), one iteration on a group is::

    Q   = clip(round(W / s + z), qmin, qmax)
    W_r = (Q - z) * s
    W_e = shrink_lp(W - W_r, beta, p)        # sign(x) * relu(|x| - |x|^(p-1) / beta)
    z   = mean(Q - (W - W_e) / s)            # asymmetric: the zero point moves, s is fixed
    beta *= kappa

Defaults are the reference's: ``iters=20``, ``p=0.7``, ``beta=10``, ``kappa=1.01``.  Conventions:

* **start**: the spec's RTN scale and zero point (:func:`cascade.quant.ranges.estimate_range`
  with the spec's clip method, then :func:`cascade.quant.ranges.scale_zero_from_range`);
* **real zero point**: the optimised ``z`` is not rounded to an integer; it is stored in
  ``scale_dtype`` like every zero point, and every dequantization path (:func:`dequantize`, the
  CPU and Pallas kernels) computes ``(q - z) * s`` with a real ``z``.  The final codes are
  ``clip(round(W / s + z), qmin, qmax)`` with the *stored* (``scale_dtype``-rounded) ``s`` and ``z``,
  packed here rather than by :func:`cascade.quant.qtensor._assemble`, whose encoder computes
  ``round(W / s) + z`` (the same thing only for an integer ``z``);
* **symmetric specs** have no zero point, so the same loop optimises the scale instead, by least
  squares of the shrunk target on the codes: ``s = <Q, W - W_e> / <Q, Q>`` per group, then
  ``Q = clip(round(W / s), qmin, qmax)``, with ``s`` kept at least at the group's largest
  weight over ``qmax + 1/2`` (and its most negative over ``-qmin + 1/2``), so the largest weights
  stay within half a step of the grid.  Unconstrained, the sparse objective clips them: on
  SmolLM2-135M at int4-g128 the largest error in a ``down_proj`` group went from RTN's 0.21 to
  1.39 and perplexity from 12.45 to 18.58, while the Frobenius error went down; outliers carry
  more of a model's function than their share of the error.  The floor still lets the scale
  shrink below RTN's ``absmax / qmax`` (by 1/15 at int4, 1/7 at int3).  A group whose codes are
  all zero (or whose update is not a finite number) keeps its scale.  The scale is stored rounded to nearest in
  ``scale_dtype`` (no round-up is needed: values beyond the grid are clipped like any others);
* **best iterate, per group**: every iterate (the start included) is scored by its group's
  ``sum |W - W_hat|^p`` and each group keeps its best one, so the result never scores worse than
  RTN on that objective.  (The reference stops the whole tensor at the first iteration whose mean
  ``|W - W_hat|`` does not improve, returning the zero point after that iteration's update;
  groups are independent, so per-group selection is the same idea without one group's stall
  stopping the others.)  After rounding the chosen parameters to
  ``scale_dtype`` a group that would score worse than its RTN start falls back to it;
* **grouped view**: the tensor is optimised as :func:`cascade.quant.ranges.to_groups`'s
  ``(G, g, R)`` view, which covers per-tensor, per-channel and grouped specs; a short last group
  (NaN-padded there) is masked out of every sum and mean.

The objective is the ``l_p`` weight error, not the Frobenius (MSE) error, but the fitted grid
lowers the Frobenius error too: by 3-8% for grouped specs and ~6% for per-channel symmetric int4
on Student-t weights (``tests/quant/test_hqq.py``, which also checks the result against a float64
numpy transcription of the loop).  Moving only the zero point cannot shrink a range stretched by
outliers, so per-tensor and per-channel asymmetric specs gain little.  ``iters``, ``lp_norm``,
``beta`` and ``kappa`` are traced: one compile per spec, shape and axis.  The result is a
:class:`cascade.quant.QuantizedTensor` in the same storage format RTN produces.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cascade.quant import ranges
from cascade.quant.qtensor import (
    QuantizedTensor, _int_spec, _scale_dtype, check_scales, from_grouped_codes, refuse_rotated, validate_input,
)
from cascade.quant.spec import IntSpec

DEFAULT_ITERS = 20
DEFAULT_LP_NORM = 0.7
DEFAULT_BETA = 10.0
DEFAULT_KAPPA = 1.01


def shrink_lp(x, beta, p):
    """Generalised soft threshold, the proximal step of ``|x|^p / beta``:
    ``sign(x) * relu(|x| - |x|^(p-1) / beta)`` (0 at ``x = 0``; ``p = 1`` is soft thresholding)."""
    ax = jnp.abs(x)
    safe = jnp.where(ax > 0, ax, 1.0)  # |0|^(p-1) is inf for p < 1: the result there is 0 anyway
    return jnp.where(ax > 0, jnp.sign(x) * jnp.maximum(ax - safe ** (p - 1.0) / beta, 0.0), 0.0)


def _codes(w, s, z, spec: IntSpec):
    """``Q = clip(round(W / s + z))`` on a grouped view (G, g, R), params (G, R) float32."""
    zz = 0.0 if z is None else z[:, None, :]
    return jnp.clip(jnp.round(w / s[:, None, :] + zz), spec.qmin, spec.qmax)


def _deq(q, s, z):
    zz = 0.0 if z is None else z[:, None, :]
    return (q - zz) * s[:, None, :]


def _lp_error(w, mask, s, z, spec: IntSpec, p):
    """Per-group ``sum |W - W_hat|^p`` over the real (unpadded) entries, (G, R)."""
    r = _deq(_codes(w, s, z, spec), s, z)
    return jnp.sum(jnp.where(mask, jnp.abs(w - r) ** p, 0.0), axis=1)


@partial(jax.jit, static_argnames=("spec", "axis", "sdt"))
def _hqq_core(x, iters, lp_norm, beta, kappa, spec: IntSpec, axis: int, sdt):
    """The loop on the grouped view: returns the stored (G, R) scale and zero (None if symmetric)
    and the (G, g, R) codes made with them.  ``iters`` is traced (a while loop), so a sweep over
    it, or over ``lp_norm``/``beta``/``kappa``, compiles once per spec and shape."""
    wg = ranges.to_groups(x.astype(jnp.float32), spec, axis)
    lo, hi = ranges.estimate_range(wg, spec)
    scale0, zero0 = ranges.scale_zero_from_range(lo, hi, spec, sdt)
    mask = ~jnp.isnan(wg)
    w = jnp.where(mask, wg, 0.0)
    n = jnp.maximum(jnp.sum(mask, axis=1), 1).astype(jnp.float32)  # (G, R) real entries per group
    s0 = scale0.astype(jnp.float32)
    z0 = None if spec.symmetric else zero0.astype(jnp.float32)
    p = jnp.asarray(lp_norm, jnp.float32)
    param0 = s0 if spec.symmetric else z0  # the optimised parameter: the scale (sym) or the zero (asym)
    # symmetric: the smallest scale that keeps each sign's largest weight within half a step of the grid
    floor = jnp.maximum(jnp.max(w, axis=1) / (spec.qmax + 0.5), -jnp.min(w, axis=1) / (-spec.qmin + 0.5))

    def split(param):
        return (param, None) if spec.symmetric else (s0, param)

    def update(param, beta):
        s, z = split(param)
        q = _codes(w, s, z, spec)
        w_e = shrink_lp(w - _deq(q, s, z), beta, p)
        target = jnp.where(mask, w - w_e, 0.0)
        if spec.symmetric:
            num = jnp.sum(q * target, axis=1)
            den = jnp.sum(jnp.where(mask, q * q, 0.0), axis=1)
            new = num / jnp.where(den > 0, den, 1.0)
            return jnp.where((den > 0) & jnp.isfinite(new), jnp.maximum(new, floor), s)
        return jnp.sum(jnp.where(mask, q - target / s[:, None, :], 0.0), axis=1) / n

    def step(_, carry):
        param, beta, best, best_err = carry
        param = update(param, beta)
        err = _lp_error(w, mask, *split(param), spec, p)
        better = err < best_err
        return param, beta * kappa, jnp.where(better, param, best), jnp.where(better, err, best_err)

    err_start = _lp_error(w, mask, *split(param0), spec, p)
    init = (param0, jnp.asarray(beta, jnp.float32), param0, err_start)
    _, _, best, _ = jax.lax.fori_loop(0, iters, step, init)  # iterates 0 (the start) to iters compete

    # store in scale_dtype; a group that the rounding makes worse than its RTN start keeps the start
    stored = best.astype(sdt)
    ok = jnp.isfinite(stored) & ((stored > 0) if spec.symmetric else True)
    stored = jnp.where(ok, stored, (scale0 if spec.symmetric else zero0))
    err_stored = _lp_error(w, mask, *split(stored.astype(jnp.float32)), spec, p)
    stored = jnp.where(err_stored <= err_start, stored, scale0 if spec.symmetric else zero0)
    scale_g, zero_g = (stored, None) if spec.symmetric else (scale0, stored)
    zf = None if zero_g is None else zero_g.astype(jnp.float32)
    q = _codes(w, scale_g.astype(jnp.float32), zf, spec)
    return scale_g, zero_g, q


def hqq_quantize(w, spec, *, axis: int = 0, iters: int = DEFAULT_ITERS, lp_norm: float = DEFAULT_LP_NORM,
                 beta: float = DEFAULT_BETA, kappa: float = DEFAULT_KAPPA, scale_dtype="float16") -> QuantizedTensor:
    """HQQ-quantize ``w`` along ``axis`` (no calibration data); see the module docs.

    ``iters`` half-quadratic iterations (0: the RTN parameters), ``lp_norm`` the ``p`` in (0, 1] of
    the sparse error, ``beta`` > 0 its initial penalty and ``kappa`` >= 1 the penalty's growth per
    iteration.  Same storage format as :func:`cascade.quant.quantize` with the same ``spec``.
    """
    spec = _int_spec(spec)
    refuse_rotated(spec, "HQQ")
    x, axis = validate_input(w, axis, "weight")
    sdt = _scale_dtype(scale_dtype)
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    if not 0.0 < lp_norm <= 1.0:
        raise ValueError(f"lp_norm must be in (0, 1], got {lp_norm}")
    if not (beta > 0.0 and np.isfinite(beta)):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    if not (kappa >= 1.0 and np.isfinite(kappa)):
        raise ValueError(f"kappa must be a finite number >= 1, got {kappa}")
    scale_g, zero_g, q = _hqq_core(x, np.int32(iters), np.float32(lp_norm), np.float32(beta), np.float32(kappa),
                                   spec, axis, sdt)
    check_scales(scale_g, x, spec, zero_g=zero_g)
    return from_grouped_codes(q, scale_g, zero_g, spec=spec, shape=tuple(x.shape), axis=axis, dtype=x.dtype)
