"""Learned rounding and clipping by signed gradient descent, on one weight matrix (Cheng et al.
2023, "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs", the
AutoRound method), in pure JAX.

RTN rounds every weight to its nearest grid point and fits each group's range to its min and max.
Neither choice looks at what the layer computes.  AutoRound makes both learnable, per weight and
per group, and trains them on calibration data to reproduce a float output:

    lo = a * min(W_g),   hi = b * max(W_g)                  # a, b in [0, 1]: learned clipping
    s, z = the spec's scale (and zero point) for [lo, hi]   # as RTN computes them from a range
    Q = clip(round(W / s + V) + z, qmin, qmax)              # V in [-0.5, 0.5]: learned rounding
    W_hat = (Q - z) * s

``round`` passes its gradient straight through (the STE), so ``V``, ``a`` and ``b`` get gradients
from any loss on ``W_hat``.  The optimiser is the paper's: **signed** gradient descent,
``p <- p - lr_t * sign(grad)``, with ``lr`` decaying linearly from ``1 / iters`` to 0 over
``iters`` steps, so every parameter moves at most ``1/2`` in all: ``V`` can flip a rounding
decision but not move a weight by more than one step, and ``a``, ``b`` stay in ``[1/2, 1]``.
The parameters with the lowest loss seen are kept (the paper's "best" iterate).  Starting point:
``V = 0``, ``a = b = 1``, i.e. RTN with the spec's range estimator (min-max, ``-mse`` or a
percentile): with ``iters=0`` the result *is* RTN, code for code (tested).

The loss is the caller's.  :func:`autoround_quantize` trains one matrix on its own output error
``||x W - x W_hat||^2`` over calibration rows ``x`` (the core; ``tests/quant/test_autoround.py``);
the model integration (``cascade.models.quantize``, ``--method autoround``) trains all the
kernels of a decoder block together on the block's output error against the float block, which is
where the method gains over layer-wise GPTQ: attention's softmax and the MLP's gate are
non-linear, and only the block output sees how their inputs' errors combine.

Storage: the trained ``a``, ``b`` give the range; the scale (and an integer zero point) come from it
exactly as :func:`cascade.quant.quantize_with_range` computes them (rounded up to ``scale_dtype``),
and the codes are ``clip(round(W / s + V) + z)`` with that stored scale.  Same format as RTN, read
by every backend.
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

DEFAULT_ITERS = 200
DEFAULT_BATCH = 8  # calibration sequences (or row blocks) per step, as the reference
V_BOUND = 0.5
SCALE_BOUNDS = (0.0, 1.0)
_TINY = 1e-9


def round_ste(x):
    """``round(x)`` forward, identity backward."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def init(w, spec: IntSpec, axis: int = 0):
    """``(consts, params)`` for ``w`` (float, quantized along ``axis``): ``consts`` the grouped
    weight (G, g, R) with a short last group zero-padded, its mask and the spec's starting range
    (G, R); ``params`` ``v`` (G, g, R) zeros and the clipping factors ``a``, ``b`` (G, R) ones."""
    xg = ranges.to_groups(jnp.asarray(w, jnp.float32), spec, axis)
    lo, hi = ranges.estimate_range(xg, spec)
    mask = ~jnp.isnan(xg)
    consts = {"w": jnp.where(mask, xg, 0.0), "lo": lo, "hi": hi}
    params = {"v": jnp.zeros_like(consts["w"]), "a": jnp.ones_like(lo), "b": jnp.ones_like(hi)}
    return consts, params


def _scale_zero(lo, hi, spec: IntSpec):
    """The spec's scale and zero point for ``[lo, hi]``, differentiable (float32, zero via the STE)."""
    lo, hi = ranges.fitted_range(lo, hi, spec)
    if spec.symmetric:
        return jnp.maximum(hi / spec.scale_divisor, _TINY), None
    s = jnp.maximum((hi - lo) / (spec.qmax - spec.qmin), _TINY)
    return s, jnp.clip(round_ste(-lo / s), spec.qmin, spec.qmax)


def fake_quant(consts, params, spec: IntSpec):
    """``W_hat`` (G, g, R) for the current ``params`` (module docs), differentiable in ``params``."""
    s, z = _scale_zero(consts["lo"] * params["a"], consts["hi"] * params["b"], spec)
    s3 = s[:, None, :]
    z3 = 0.0 if z is None else z[:, None, :]
    q = jnp.clip(round_ste(consts["w"] / s3 + params["v"]) + z3, spec.qmin, spec.qmax)
    return (q - z3) * s3


def kernel(consts, params, spec: IntSpec, shape, axis: int = 0):
    """``W_hat`` in the weight's own ``shape`` (differentiable)."""
    return ranges.from_groups(fake_quant(consts, params, spec), tuple(shape), spec, axis)


def project(params):
    """Keep the parameters in their bounds: ``|v| <= 1/2``, ``a, b`` in ``[0, 1]``."""
    lo, hi = SCALE_BOUNDS
    return {"v": jnp.clip(params["v"], -V_BOUND, V_BOUND), "a": jnp.clip(params["a"], lo, hi),
            "b": jnp.clip(params["b"], lo, hi)}


def signsgd_update(params, grads, lr):
    """One signed-gradient step on one kernel's ``params``, projected back into the bounds."""
    return project(jax.tree.map(lambda p, g: p - lr * jnp.sign(g), params, grads))


def learning_rate(step: int, iters: int, lr: float | None = None) -> float:
    """The linearly decaying rate of step ``step`` (0-based): ``lr * (1 - step / iters)``, ``lr``
    defaulting to ``1 / iters``."""
    base = 1.0 / iters if lr is None else lr
    return base * (1.0 - step / iters)


def minimize(step_fn, params, batches, *, iters: int, lr: float | None = None):
    """Signed gradient descent: ``step_fn(params, batch, lr) -> (loss at params, params')`` for
    ``iters`` steps over ``batches(step)``; returns ``(best params, losses)``, the best being the
    parameters with the lowest loss seen (before the step that loss was measured at)."""
    best, best_loss, losses = params, np.inf, []
    for i in range(iters):
        loss, new = step_fn(params, batches(i), np.float32(learning_rate(i, iters, lr)))
        loss = float(loss)
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = params, loss
        params = new
    return best, losses


def finalize(consts, params, spec: IntSpec, shape, axis: int = 0, *, scale_dtype="float16",
             dtype="float32") -> QuantizedTensor:
    """The stored tensor for trained ``params``: scale (and integer zero point) from the learned
    range as :func:`cascade.quant.quantize_with_range` computes them, codes
    ``clip(round(W / s + V) + z)`` with the stored scale."""
    sdt = _scale_dtype(scale_dtype)
    scale_g, zero_g, q = _finalize(consts, params, spec, sdt)
    check_scales(scale_g, consts["w"], spec, zero_g=zero_g)
    return from_grouped_codes(q, scale_g, zero_g, spec=spec, shape=tuple(shape), axis=axis, dtype=dtype)


@partial(jax.jit, static_argnames=("spec", "sdt"))
def _finalize(consts, params, spec: IntSpec, sdt):
    scale_g, zero_g = ranges.scale_zero_from_range(consts["lo"] * params["a"], consts["hi"] * params["b"], spec, sdt)
    s = scale_g.astype(jnp.float32)[:, None, :]
    z = 0.0 if zero_g is None else zero_g.astype(jnp.float32)[:, None, :]
    q = jnp.clip(jnp.round(consts["w"] / s + params["v"]) + z, spec.qmin, spec.qmax)
    return scale_g, zero_g, q


# -- one matrix on its own output error -----------------------------------------------------------

@partial(jax.jit, static_argnames=("spec", "shape", "axis"))
def _matrix_step(params, consts, w, x, lr, spec: IntSpec, shape, axis: int):
    def loss(p):
        err = x @ (kernel(consts, p, spec, shape, axis) - w)
        return jnp.mean(err * err)

    value, grads = jax.value_and_grad(loss)(params)
    return value, signsgd_update(params, grads, lr)


def autoround_quantize(w, x, spec, *, iters: int = DEFAULT_ITERS, lr: float | None = None,
                       batch_rows: int | None = None, seed: int = 0, scale_dtype="float16") -> QuantizedTensor:
    """AutoRound of one kernel ``w`` (K, N), quantized along K, trained on its output error
    ``mean ||x w - x W_hat||^2`` over calibration rows ``x`` (T, K); each step uses ``batch_rows``
    rows drawn at random (default: all).  ``iters=0`` is RTN with the spec's range."""
    spec = _int_spec(spec)
    refuse_rotated(spec, "AutoRound")
    w, axis = validate_input(w, 0, "weight")
    if w.ndim != 2:
        raise ValueError(f"autoround_quantize takes a 2-D kernel (K, N), got shape {tuple(w.shape)}")
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"inputs must be (T, {w.shape[0]}), got {x.shape}")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    consts, params = init(w, spec, axis)
    w32 = w.astype(jnp.float32)
    rng = np.random.default_rng(seed)
    rows = x.shape[0] if batch_rows is None else min(batch_rows, x.shape[0])

    def batches(i):
        return x if rows == x.shape[0] else x[np.sort(rng.choice(x.shape[0], rows, replace=False))]

    def step(p, xb, lr_t):
        return _matrix_step(p, consts, w32, jnp.asarray(xb), lr_t, spec, tuple(w.shape), axis)

    best, _ = minimize(step, params, batches, iters=int(iters), lr=lr)
    return finalize(consts, best, spec, w.shape, axis, scale_dtype=scale_dtype, dtype=w.dtype)
