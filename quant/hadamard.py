"""A randomized Hadamard rotation of a matmul's reduction axis (the ``-had`` W8A8 specs).

``x @ W = (x R) (Rᵀ W)`` for any orthogonal ``R``.  With ``R = D H`` (``D`` a fixed diagonal of
random signs, ``H`` a normalized Hadamard matrix) an activation outlier channel of ``x`` is spread
over every channel of ``x R`` it mixes with, so per-token int8 no longer spends its whole range on
a few channels (QuaRot, Ashkboos et al. 2024; QuIP#, Tseng et al. 2024).  The weight is stored
rotated (``Rᵀ W``, quantized as any ``int8`` weight) and the input is rotated at run time, in
``O(k log b)`` per row by the fast Walsh-Hadamard transform.

* ``H`` is block diagonal: Sylvester blocks of ``b = block_size(k)``, the largest power of two that
  divides ``k`` (SmolLM2's 1536 MLP channels: 3 blocks of 512; its 576 model channels: 9 of 64).
  Each block is ``H_b / sqrt(b)``, symmetric and its own inverse.  An odd ``k`` has ``b = 1``: no
  mixing, the rotation only flips signs.
* ``D``'s signs come from a fixed linear congruential generator (:func:`signs`), a function of
  ``k`` alone, so a saved checkpoint needs no extra data and means the same thing in any release.

Both operands use the one function :func:`rotate` (``Rᵀ w`` for a column ``w`` of ``W`` along
the reduction axis is ``H (d * w)``, and ``x R`` for a row is ``(d * x) H``, since ``H`` is
symmetric); :func:`unrotate` is its inverse (``d * (H v)``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

_LCG = (1103515245, 12345, 2**31)  # the C standard's example rand(): fixed forever


def block_size(k: int) -> int:
    """The Hadamard block length for a reduction axis of ``k``: the largest power of two dividing it."""
    k = int(k)
    if k <= 0:
        raise ValueError(f"the rotated axis must have a positive length, got {k}")
    return k & -k


@functools.lru_cache(maxsize=64)
def _signs(k: int) -> np.ndarray:
    a, c, m = _LCG
    state, out = 0x5EED, np.empty(k, np.float32)
    for i in range(k):
        state = (a * state + c) % m
        out[i] = 1.0 if (state >> 16) & 1 else -1.0
    out.setflags(write=False)
    return out


def signs(k: int) -> np.ndarray:
    """The fixed random signs ``diag(D)`` (k,) float32 of +-1 for an axis of length ``k``."""
    block_size(k)  # validates
    return _signs(int(k))


def _fwht(v, b: int):
    """The normalized Walsh-Hadamard transform ``v H_b / sqrt(b)`` of each consecutive block of ``b``
    along the last axis of ``v`` (float32), in Sylvester's (natural) order."""
    lead, k = v.shape[:-1], v.shape[-1]
    y = v.reshape(lead + (k // b, b))
    h = 1
    while h < b:
        y = y.reshape(lead + (k // b, b // (2 * h), 2, h))
        lo, hi = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([lo + hi, lo - hi], axis=-2)
        h *= 2
    return y.reshape(lead + (k,)) * np.float32(1.0 / np.sqrt(b))


def rotate(x, axis: int = -1):
    """``x`` rotated along ``axis`` (its reduction axis): ``fwht(signs * x)``, float32."""
    x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis, -1)
    k = x.shape[-1]
    return jnp.moveaxis(_fwht(x * signs(k), block_size(k)), -1, axis)


def unrotate(x, axis: int = -1):
    """The inverse of :func:`rotate` along ``axis``: ``signs * fwht(x)``, float32."""
    x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis, -1)
    k = x.shape[-1]
    return jnp.moveaxis(_fwht(x, block_size(k)) * signs(k), -1, axis)
