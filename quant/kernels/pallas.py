"""The Pallas dequant-matmul backend, ``pallas``: ``y = x @ dequant(W)`` for GPUs (Triton) and TPUs.

One kernel program per block of ``bn`` output columns loops over the reduction axis in steps of
``ks`` rows (a power of two dividing the group size), unpacks the step's codes to float in
registers, multiplies, and applies the group's scale and zero point to the step's partial sum:

    y[:, n] = sum_steps s[g, n] * (x_step @ u_step[:, n] - z'[g, n] * sum(x_step))

with ``u`` the unsigned codes, ``z' = z`` for asymmetric specs and ``2^(bits-1)`` for symmetric
ones (the same algebra as the CPU kernel).  The float weight is never written to memory.  int4
codes hold input rows ``2j`` (low nibble) and ``2j + 1`` (high nibble) in one byte
(:mod:`cascade.quant.packing`), so the wrapper splits ``x`` into its even and odd columns once
per call and the kernel does two dots per step, one per nibble, with no interleave.

Scope: int8 and int4 weights quantized along axis 0, per channel, per tensor or in groups whose
size is a multiple of 16 and divides ``k`` (no short last group), ``n`` a multiple of 16;
float32 or bfloat16 activations (rows are padded to 16).  Everything else goes to ``xla``.

Where it runs: on GPU and TPU it is selected automatically (priority 20).  On CPU it runs only
when forced (``CASCADE_MATMUL_BACKEND=pallas`` or ``backend="pallas"``), in Pallas interpret
mode: that is how the tests check it on machines without an accelerator, and it is slow.
``bench/gpu.sh`` checks and times it on a GPU.  The kernel has been checked in interpret mode
only: this project's machines have had no GPU lent while it was written (README, "GPU").
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from cascade.quant.qtensor import QuantizedTensor

NAME = "pallas"
PRIORITY = 20  # above the native CPU kernel (which never runs on an accelerator anyway)
MAX_ROWS = 64
_STEPS = (256, 128, 64, 32, 16)
_BLOCK_N = (128, 64, 32, 16)


def group_rows(w: QuantizedTensor) -> int:
    return w.spec.group_size if w.spec.granularity == "group" else w.shape[w.axis]


def _step(group: int) -> int | None:
    """Rows of K per loop step: the largest power of two <= 256 dividing the group (always even,
    so an int4 step is whole bytes)."""
    return next((s for s in _STEPS if group % s == 0), None)


def _block_n(n: int) -> int | None:
    return next((b for b in _BLOCK_N if n % b == 0), None)


def interpret() -> bool:
    """Interpret mode off an accelerator (CPU), or when CASCADE_PALLAS_INTERPRET=1."""
    return jax.default_backend() == "cpu" or os.environ.get("CASCADE_PALLAS_INTERPRET", "") not in ("", "0")


def supports(x, w: QuantizedTensor) -> bool:
    if jax.default_backend() == "cpu" and os.environ.get("CASCADE_MATMUL_BACKEND") != NAME:
        return False  # on CPU only when forced (interpret mode); auto-selection never picks it there
    spec = w.spec
    if spec.bits not in (4, 8) or w.axis != 0 or len(w.shape) != 2 or w.stack_shape:
        return False
    if x.dtype not in (jnp.float32, jnp.bfloat16) or int(np.prod(x.shape[:-1])) > MAX_ROWS:
        return False
    k, n = w.shape
    g = group_rows(w)
    return k % g == 0 and _step(g) is not None and _block_n(n) is not None


def matmul(x, w: QuantizedTensor):
    """``x @ dequant(w)`` through the Pallas kernel; ``x`` (..., k), ``w`` (k, n) along axis 0."""
    k, n = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(jnp.float32)
    m = x2.shape[0]
    mp = max(16, -(-m // 16) * 16)
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    group = group_rows(w)
    bits = w.spec.bits
    ks = _step(group)
    bn = _block_n(n)
    groups = k // group
    scale = w.scale.astype(jnp.float32)
    if scale.shape == (1, 1):  # per tensor
        scale = jnp.broadcast_to(scale, (groups, n))
    if w.zero is not None:
        zero = jnp.broadcast_to(w.zero.astype(jnp.float32), (groups, n))
    else:
        zero = jnp.full((groups, n), float(1 << (bits - 1)), jnp.float32)
    xsum = x2.reshape(mp, k // ks, ks).sum(-1)  # (mp, steps): sum of x over each step
    if bits == 4:
        xs = (x2[:, 0::2], x2[:, 1::2])  # the rows each nibble holds
    else:
        xs = (x2,)
    y = _call(bits, ks, group, bn, mp, k, n, interpret())(*xs, xsum, w.packed, scale, zero)
    return y[:m].astype(x.dtype).reshape(*lead, n)


@functools.cache
def _call(bits: int, ks: int, group: int, bn: int, mp: int, k: int, n: int, interpret_mode: bool):
    from jax.experimental import pallas as pl

    steps = k // ks
    per_group = group // ks
    crow = ks // 2 if bits == 4 else ks  # code rows per step

    def kernel(*refs):
        if bits == 4:
            xe_ref, xo_ref, xsum_ref, c_ref, s_ref, z_ref, o_ref = refs
        else:
            x_ref, xsum_ref, c_ref, s_ref, z_ref, o_ref = refs

        def body(t, acc):
            codes = c_ref[pl.ds(t * crow, crow), :]  # (crow, bn) uint8
            if bits == 4:
                lo = (codes & 15).astype(jnp.float32)
                hi = (codes >> 4).astype(jnp.float32)
                part = (jnp.dot(xe_ref[:, pl.ds(t * crow, crow)], lo, preferred_element_type=jnp.float32)
                        + jnp.dot(xo_ref[:, pl.ds(t * crow, crow)], hi, preferred_element_type=jnp.float32))
            else:
                part = jnp.dot(x_ref[:, pl.ds(t * ks, ks)], codes.astype(jnp.float32),
                               preferred_element_type=jnp.float32)
            g = t // per_group
            s = s_ref[pl.ds(g, 1), :]  # (1, bn)
            z = z_ref[pl.ds(g, 1), :]
            xs = xsum_ref[:, pl.ds(t, 1)]  # (mp, 1)
            return acc + s * (part - z * xs)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((mp, bn), jnp.float32))
        o_ref[...] = acc

    full = lambda shape: pl.BlockSpec(shape, lambda j: (0, 0))  # noqa: E731
    cols = lambda rows: pl.BlockSpec((rows, bn), lambda j: (0, j))  # noqa: E731
    xk = k // 2 if bits == 4 else k
    in_specs = [full((mp, xk))] * (2 if bits == 4 else 1) + [full((mp, steps)), cols(k * bits // 8), cols(k // group),
                                                                 cols(k // group)]
    return pl.pallas_call(kernel, grid=(n // bn,), in_specs=in_specs, out_specs=pl.BlockSpec((mp, bn), lambda j: (0, j)),
                          out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32), interpret=interpret_mode)
