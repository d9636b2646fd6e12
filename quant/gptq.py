"""GPTQ on one weight matrix (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"): the core, in pure JAX, before any model integration.

``W`` is a Flax kernel ``(K, N)`` quantized along ``K`` (the input axis, axis 0), and ``H = X^T X``
(K, K) the Hessian of the layer's squared output error over calibration inputs ``X`` (tokens, K).
Rows of ``W`` (input features) are quantized one at a time; the rounding error of row ``i`` is
spread over the rows not yet quantized through the inverse Hessian, so the layer's *output*
``X @ W`` moves as little as possible:

    d = U[i, i],  err = (w_i - q(w_i)) / d,  w_j -= U[i, j] * err  for j > i,

with ``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``).  As in the paper's reference
implementation:

* **dampening**: ``H += damp * mean(diag(H)) * I`` (default 1%);
* **dead inputs** (``H[i, i] == 0``: a feature the calibration never activates): ``H[i, i] = 1``
  and ``w_i = 0`` before quantizing;
* **lazy batch updates**: rows go in blocks of ``block_size`` (128); inside a block the updates
  are applied row by row, and the rows after the block get the block's errors in one product;
* **groups**: a group is ``g`` consecutive inputs, exactly our grouped format.  Its scale (and
  zero point) is fitted, with the spec's clip method (min-max or the ``-mse`` grid), to the
  group's *current* weights when its first row is reached; per-channel specs fit once to the
  whole (dead-zeroed) matrix;
* **act order** (``act_order=True``): rows go in order of decreasing ``H[i, i]`` with *static*
  groups: each group's parameters are fitted to the original weights first, so the stored format
  (groups of consecutive inputs) is unchanged.

The result is a :class:`cascade.quant.QuantizedTensor` in the same format RTN produces.
``tests/quant/test_gptq.py`` checks it against a plain float64 numpy transcription of the
algorithm.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cascade.quant import ranges
from cascade.quant.qtensor import QuantizedTensor, _assemble, _int_spec, _scale_dtype, refuse_rotated, validate_input
from cascade.quant.spec import IntSpec

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128


def _group_params(rows, spec: IntSpec, sdt):
    """Scale and zero (1, N) fitted to ``rows`` (g, N) with the spec's clip method."""
    grouped = rows[None].astype(jnp.float32)  # (1, g, N)
    lo, hi = ranges.estimate_range(grouped, spec)
    scale, zero = ranges.scale_zero_from_range(lo, hi, spec, sdt)
    return scale, zero


def _fake_quant_row(w, scale, zero, spec: IntSpec):
    """q(w) for one row (N,) with params (N,)."""
    s = scale.astype(jnp.float32)
    z = 0.0 if zero is None else zero.astype(jnp.float32)
    q = jnp.clip(jnp.round(w / s) + z, spec.qmin, spec.qmax)
    return (q - z) * s


@partial(jax.jit, static_argnames=("spec", "group", "static", "sdt"))
def _block(w1, u1, scales, zeros, group_of, start, n_real, spec: IntSpec, group: int, static: bool, sdt):
    """Quantize the rows of one block ``w1`` (B, N) with ``u1`` (B, B), the block of ``U``.

    ``scales``/``zeros`` (G, N) hold every group's parameters (static: fitted already; dynamic:
    filled in here when a group's first row is reached; ``group_of`` (B,) is each row's group).
    Rows from ``n_real`` on pad a short last block (zero weights, no error, no refit).
    Returns the dequantized rows, the scaled errors (B, N) and the updated parameters.
    """
    b = w1.shape[0]

    def row(i, carry):
        w1, q1, err1, scales, zeros = carry
        g = group_of[i]
        if not static:
            first = ((start + i) % group == 0) & (i < n_real)

            def refit(args):
                scales, zeros = args
                rows = jax.lax.dynamic_slice_in_dim(w1, i, group, axis=0)
                s, z = _group_params(rows, spec, sdt)
                scales = jax.lax.dynamic_update_slice_in_dim(scales, s.astype(scales.dtype), g, axis=0)
                if zeros is not None:
                    zeros = jax.lax.dynamic_update_slice_in_dim(zeros, z.astype(zeros.dtype), g, axis=0)
                return scales, zeros

            scales, zeros = jax.lax.cond(first, refit, lambda a: a, (scales, zeros))
        w = w1[i]
        q = _fake_quant_row(w, scales[g], None if zeros is None else zeros[g], spec)
        err = (w - q) / u1[i, i]
        # rows after i in this block take the error; rows before it are done (U is upper triangular)
        w1 = w1 - jnp.where((jnp.arange(b) > i)[:, None], u1[i][:, None] * err[None, :], 0.0)
        return w1, q1.at[i].set(q), err1.at[i].set(err), scales, zeros

    init = (w1, jnp.zeros_like(w1), jnp.zeros_like(w1), scales, zeros)
    _, q1, err1, scales, zeros = jax.lax.fori_loop(0, b, row, init)
    return q1, err1, scales, zeros


def prepare_hessian(h, w, *, damp: float = DEFAULT_DAMP):
    """Dead inputs zeroed in ``w`` and set to 1 on ``H``'s diagonal, then dampening: returns
    ``(H', W', dead)`` as float32 arrays."""
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    h = jnp.asarray(h, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    w = jnp.where(dead[:, None], 0.0, w)
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0], dtype=jnp.float32)
    return h, w, dead


def inverse_cholesky_upper(h):
    """``U`` upper triangular with ``H^-1 = U^T U`` (float64 on the host: the only step where float32
    loses digits on ill-conditioned Hessians).  Raises ValueError if ``H`` is not positive definite."""
    h64 = np.asarray(h, np.float64)
    try:
        lower = np.linalg.cholesky(h64)
        hinv = np.linalg.inv(lower).T @ np.linalg.inv(lower)
        u = np.linalg.cholesky(hinv).T
    except np.linalg.LinAlgError:
        raise ValueError("the Hessian is not positive definite after dampening") from None
    if not np.isfinite(u).all():
        raise ValueError("the Hessian is not positive definite after dampening")
    return jnp.asarray(u, jnp.float32)


def gptq_quantize(w, h, spec, *, damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK,
                  act_order: bool = False, scale_dtype="float16") -> QuantizedTensor:
    """GPTQ-quantize ``w`` (K, N) along axis 0 given ``h`` = X^T X (K, K); see the module docs."""
    spec = _int_spec(spec)
    refuse_rotated(spec, "GPTQ")
    w, _ = validate_input(w, 0, "weight")
    if w.ndim != 2:
        raise ValueError(f"GPTQ quantizes a 2-D (in, out) kernel, got shape {tuple(w.shape)}")
    k, n = w.shape
    h = jnp.asarray(h)
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match the weight's {k} inputs")
    if not bool(jnp.isfinite(h).all()):
        raise ValueError("the Hessian has NaN/Inf entries")
    if spec.granularity == "tensor":
        raise ValueError(f"GPTQ does not support per-tensor specs ({spec}): use a per-channel or grouped spec")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    sdt = _scale_dtype(scale_dtype)
    group = min(spec.group_size, k) if spec.granularity == "group" else k
    n_groups = math.ceil(k / group)
    static = act_order or spec.granularity == "channel"
    if not static:  # blocks hold whole groups, so a group's rows are all in the block that fits it
        block_size = max(group, block_size // group * group)

    h, w0, _ = prepare_hessian(h, w, damp=damp)
    perm = jnp.argsort(-jnp.diagonal(h), stable=True) if act_order else jnp.arange(k)
    row_group = jnp.arange(k) // group  # groups of consecutive inputs, in the original order
    if static:
        grouped = ranges.to_groups(w0, dataclass_replace_group(spec, group), 0)
        lo, hi = ranges.estimate_range(grouped, spec)
        scales, zeros = ranges.scale_zero_from_range(lo, hi, spec, sdt)
    else:
        scales = jnp.ones((n_groups, n), sdt)
        zeros = None if spec.symmetric else jnp.zeros((n_groups, n), sdt)
    u = inverse_cholesky_upper(h[perm][:, perm])
    wp = w0[perm]
    groups_p = row_group[perm]
    q = jnp.zeros_like(wp)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        if i2 - i1 < block_size:  # a short last block: pad with rows that take and give no error
            pad = block_size - (i2 - i1)
            w1 = jnp.pad(wp[i1:i2], ((0, pad), (0, 0)))
            u1 = jnp.pad(u[i1:i2, i1:i2], ((0, pad), (0, pad))) + jnp.diag(jnp.r_[jnp.zeros(i2 - i1), jnp.ones(pad)])
            gof = jnp.pad(groups_p[i1:i2], (0, pad), constant_values=n_groups - 1)
        else:
            w1, u1, gof = wp[i1:i2], u[i1:i2, i1:i2], groups_p[i1:i2]
        q1, err1, scales, zeros = _block(w1, u1, scales, zeros, gof, i1, i2 - i1, spec, group, static, sdt)
        q = q.at[i1:i2].set(q1[: i2 - i1])
        wp = wp - u[i1:i2].T @ err1[: i2 - i1]  # the lazy update of every later row
    deq = jnp.zeros_like(q).at[perm].set(q)
    return _assemble(deq, spec, 0, scales, zeros)


def dataclass_replace_group(spec: IntSpec, group: int) -> IntSpec:
    """``spec``'s weight format as a grouped spec of ``group`` rows (per-channel: one group of all K
    rows), for estimating the ranges.  The activation setting (``w8a8``) is dropped: it says how the
    inputs are quantized at run time, nothing about the weights' ranges (and an ``act`` spec must be
    per channel, so keeping it would refuse the grouped view)."""
    import dataclasses

    return dataclasses.replace(spec, granularity="group", group_size=group, act=None, rotate=False)
