"""Int8 activations: the W8A8 matmul (``w8a8``, ``w8a8-static`` specs) and the per-block ``-a8`` matmul.

Both operands of ``x @ W`` are int8 and the dot accumulates in int32 (the integer GEMM of
SmoothQuant, Xiao et al. 2022, and of LLM.int8()'s vector-wise quantization without its outlier
split)::

    s_x   = max|x_row| / 127   per row of x (token), at run time          (w8a8, "dynamic")
          = the calibrated per-tensor scale stored as ``W.act_scale``      (w8a8-static)
    x_q   = clip(round(x / s_x), -127, 127)                               int8
    y     = (x_q @ W_q) * s_x * s_w                                        int32 dot, float rescale

``W_q`` and ``s_w`` are the weight's per-output-channel int8 codes and scales, exactly as an
``int8`` weight stores them.  With a ``-had`` spec (``w8a8-had``, ``w8a8-static-had``) the codes are
of the rotated weight ``Rᵀ W`` and ``x`` is rotated first, ``x <- x R``
(:func:`cascade.quant.hadamard.rotate`, a fast Walsh-Hadamard transform per row), so outlier
channels are spread before the row is quantized; ``(x R)(Rᵀ W) = x W``.  A row of zeros gets the
scale 1 (its codes are zeros).  Per-token scales depend only on their own row, so the result of a row does not depend on the batch it is in
(what a speculative verifier scoring several rows at once needs).

The dot is XLA's own ``int8 x int8 -> int32`` ``dot_general``.  On this CPU it is a real integer
GEMM for many rows and a slow loop for one (``cascade bench matmul --spec int8,w8a8``,
``bench/results/matmul-w8a8.json``, against the float32 dot in the same run): 2.7-3.2x faster at 512
rows (a prefill), 1.8x at 16 rows of a 4096 x 4096 matrix, but 0.12-0.33x at one row (decode),
where the weight-only int8 kernel of :mod:`cascade.quant.kernels.cpu` is the fast path.
``tests/quant/test_activations.py`` checks it against numpy's int64 dot.

**Per-block int8 activations (``-a8`` specs: ``int4-g32-a8``, ``int8-a8``, ...).**  The weight is
stored as without ``-a8`` (unsigned codes ``u``, scale ``s`` and zero point ``z`` per group of ``G``
values along the reduction axis; ``z = 2**(bits-1)`` for symmetric specs).  Each row of ``x`` is
quantized in blocks that are the weight's groups (the whole row for per-channel and per-tensor
weights), as llama.cpp's Q8_0/Q8_1 blocks of 32::

    d[m, g]   = max|x[m, block g]| / 127   (1 for a block of zeros)            float32
    xq[m, k]  = clip(round(x[m, k] / d[m, g]), -127, 127)   round half to even   int8
    I[m,g,n]  = sum_{k in g} xq[m, k] * u[k, n]      X[m, g] = sum_{k in g} xq[m, k]   int32, exact
    y[m, n]   = sum_g d[m, g] * s[g, n] * (I[m, g, n] - z[g, n] * X[m, g])            float32

(``I - z X`` in int32 for symmetric specs, where ``z`` is an integer).  :func:`a8_reference` is that
arithmetic in XLA, the reference the native kernel (:func:`cascade.quant.kernels.cpu.matmul_a8`)
must equal: the integer sums exactly, the float rescale within float32 rounding.  Both check
against numpy's int64 computation in ``tests/quant/test_activations.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cascade.quant import hadamard, packing
from cascade.quant.qtensor import QuantizedTensor, codes

ACT_QMAX = 127  # symmetric int8 activations: codes in [-127, 127]
BACKEND = "int8-dot"  # how `inspect`, `generate --json` and `bench matmul` name the W8A8 matmul's backend


def token_scales(x) -> jnp.ndarray:
    """Per-row (token) activation scales ``max|x_row| / 127`` (..., 1), float32; 1 for a zero row."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return jnp.where(amax > 0, amax / ACT_QMAX, 1.0)


def quantize_activations(x, scale) -> jnp.ndarray:
    """``clip(round(x / scale), -127, 127)`` as int8; ``scale`` broadcasts against ``x``."""
    q = jnp.round(x.astype(jnp.float32) / scale)
    return jnp.clip(q, -ACT_QMAX, ACT_QMAX).astype(jnp.int8)


def int8_dot(xq, wq) -> jnp.ndarray:
    """The int32 ``xq @ wq`` for int8 ``xq`` (..., k) and ``wq`` (k, n)."""
    if wq.shape[0] != xq.shape[-1]:
        raise ValueError(f"int8_dot shape mismatch: x has {xq.shape[-1]} features, w has {wq.shape[0]} rows")
    return jax.lax.dot_general(xq, wq, (((xq.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def _weight_codes(w: QuantizedTensor, transposed: bool):
    """(k, n) int8 codes and (n,) float32 per-output-channel scales of an int8 per-channel weight."""
    q = codes(w).astype(jnp.int8)
    s = w.scale.astype(jnp.float32).reshape(-1)
    return (q.T if transposed else q), s


def w8a8_matmul(x, w: QuantizedTensor, *, transposed: bool = False):
    """``x @ W`` (``x @ W.T`` when ``transposed``: a tied head, W (n, k) quantized along axis 1) with
    int8 activations (module docstring); returns ``x``'s dtype."""
    if w.spec.act is None:
        raise ValueError(f"w8a8_matmul takes a w8a8 weight, got {w.spec}")
    dtype = x.dtype
    if w.spec.rotate:
        x = hadamard.rotate(x, -1)
    if w.spec.act == "static":
        if w.act_scale is None:
            raise ValueError("a w8a8-static weight has no activation scale: quantize the model with calibration "
                             "data (--calib) to measure it")
        sx = w.act_scale.astype(jnp.float32)
    else:
        sx = token_scales(x)
    wq, sw = _weight_codes(w, transposed)
    acc = int8_dot(quantize_activations(x, sx), wq)
    return (acc.astype(jnp.float32) * sx * sw).astype(dtype)


# -- per-block int8 activations (-a8 specs) --------------------------------------------------------


def a8_block(w: QuantizedTensor) -> int:
    """Values of the reduction axis per activation block of an ``-a8`` weight: its group size, or the
    whole axis (per-channel and per-tensor weights)."""
    k = w.shape[w.axis]
    return min(w.spec.group_size, k) if w.spec.granularity == "group" else k


def quantize_blocks(x, block: int):
    """``x`` (m, k) float -> ``(xq (m, groups, block) int32, d (m, groups) float32)``: each block of
    ``block`` values quantized to int8 by its own absmax (the last block zero-padded)."""
    m, k = x.shape
    groups = -(-k // block)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, groups * block - k))).reshape(m, groups, block)
    amax = jnp.max(jnp.abs(xp), axis=-1)
    d = jnp.where(amax > 0, amax / ACT_QMAX, 1.0)
    xq = jnp.clip(jnp.round(xp / d[..., None]), -ACT_QMAX, ACT_QMAX).astype(jnp.int32)
    return xq, d


def _grouped(a, w: QuantizedTensor, groups: int, n: int, *, transposed: bool):
    """A scale or zero-point array of ``w`` as (groups, n) float32 (per tensor/channel broadcast)."""
    a = a.astype(jnp.float32)
    return jnp.broadcast_to(a.T if transposed else a, (groups, n)) if a.size > 1 else jnp.broadcast_to(a.reshape(1, 1), (groups, n))


def a8_reference(x, w: QuantizedTensor, *, transposed: bool = False):
    """``x @ W`` (``x @ W.T`` when ``transposed``: W (n, k) quantized along axis 1) with per-block int8
    activations (module docstring), in XLA; returns ``x``'s dtype."""
    if not w.spec.a8:
        raise ValueError(f"a8_reference takes an -a8 weight, got {w.spec}")
    k = w.shape[w.axis]
    n = w.shape[1 - w.axis]
    lead, dtype = x.shape[:-1], x.dtype
    block = a8_block(w)
    groups = -(-k // block)
    xq, d = quantize_blocks(x.reshape(-1, k), block)
    u = packing.unpack_codes(w.packed, w.spec.bits, k, w.axis).astype(jnp.int32)
    u = u.T if transposed else u  # (k, n)
    u = jnp.pad(u, ((0, groups * block - k), (0, 0))).reshape(groups, block, n)
    isum = jax.lax.dot_general(xq, u, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)  # (g, m, n)
    isum = jnp.transpose(isum, (1, 0, 2))  # (m, g, n)
    xsum = jnp.sum(xq, axis=-1)  # (m, g)
    s = _grouped(w.scale, w, groups, n, transposed=transposed)
    if w.zero is None:  # symmetric: the integer offset, subtracted exactly
        centered = (isum - w.spec.code_offset * xsum[..., None]).astype(jnp.float32)
    else:
        z = _grouped(w.zero, w, groups, n, transposed=transposed)
        centered = isum.astype(jnp.float32) - z[None] * xsum[..., None].astype(jnp.float32)
    y = jnp.sum(d[..., None] * s[None] * centered, axis=1)
    return y.reshape(*lead, n).astype(dtype)
