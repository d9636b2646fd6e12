"""Bit packing of integer codes along one axis, documented once, bit by bit.

Codes are unsigned integers ``u`` in ``[0, 2**bits - 1]`` (symmetric values are stored biased,
``u = q + 2**(bits-1)``).  Along the packing axis, consecutive runs of ``L`` codes are packed
into ``B`` bytes, little-endian: code ``j`` of a run occupies bits ``[j*bits, (j+1)*bits)`` of
the ``8*B``-bit little-endian integer formed by the run's bytes.

| bits | L codes | B bytes | byte layout (bit 7 ... bit 0)                                |
| ---- | ------- | ------- | ------------------------------------------------------------ |
| 8    | 1       | 1       | ``u0``                                                       |
| 4    | 2       | 1       | ``u1[3:0] u0[3:0]`` (first code in the low nibble)           |
| 3    | 8       | 3       | 24-bit word ``u7 u6 u5 u4 u3 u2 u1 u0`` (3 bits each), bytes |
|      |         |         | ``w[7:0], w[15:8], w[23:16]``; dense, no wasted bits         |
| 2    | 4       | 1       | ``u3 u2 u1 u0`` (2 bits each, first code in bits 1:0)        |

A length not divisible by ``L`` is padded with zero codes up to the next multiple; the true
length is kept by the caller (``QuantizedTensor.shape``).  Packed size along the axis is
``ceil(k / L) * B`` bytes.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

# bits -> (codes per run L, bytes per run B)
RUNS = {8: (1, 1), 4: (2, 1), 3: (8, 3), 2: (4, 1)}


def run_shape(bits: int) -> tuple[int, int]:
    if bits not in RUNS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {sorted(RUNS)}")
    return RUNS[bits]


def packed_length(length: int, bits: int) -> int:
    """Bytes along the packing axis for ``length`` codes."""
    n_codes, n_bytes = run_shape(bits)
    return math.ceil(length / n_codes) * n_bytes


@partial(jax.jit, static_argnames=("bits", "axis"))
def pack_codes(codes: jnp.ndarray, bits: int, axis: int = 0) -> jnp.ndarray:
    """Pack unsigned integer codes (values in [0, 2**bits)) into uint8 along ``axis``."""
    n_codes, n_bytes = run_shape(bits)
    c = jnp.moveaxis(jnp.asarray(codes), axis, 0).astype(jnp.uint32)
    length, rest = c.shape[0], c.shape[1:]
    n_runs = math.ceil(length / n_codes)
    c = jnp.pad(c, [(0, n_runs * n_codes - length)] + [(0, 0)] * len(rest))
    c = c.reshape((n_runs, n_codes) + rest)
    word = c[:, 0]
    for j in range(1, n_codes):
        word = word | (c[:, j] << (bits * j))
    out = jnp.stack([(word >> (8 * i)) & 0xFF for i in range(n_bytes)], axis=1)
    out = out.reshape((n_runs * n_bytes,) + rest).astype(jnp.uint8)
    return jnp.moveaxis(out, 0, axis)


@partial(jax.jit, static_argnames=("bits", "length", "axis"))
def unpack_codes(packed: jnp.ndarray, bits: int, length: int, axis: int = 0) -> jnp.ndarray:
    """Inverse of :func:`pack_codes`: uint8 bytes -> int32 codes, ``length`` along ``axis``."""
    n_codes, n_bytes = run_shape(bits)
    p = jnp.moveaxis(jnp.asarray(packed), axis, 0).astype(jnp.uint32)
    rest = p.shape[1:]
    n_runs = p.shape[0] // n_bytes
    p = p.reshape((n_runs, n_bytes) + rest)
    word = p[:, 0]
    for i in range(1, n_bytes):
        word = word | (p[:, i] << (8 * i))
    mask = (1 << bits) - 1
    c = jnp.stack([(word >> (bits * j)) & mask for j in range(n_codes)], axis=1)
    c = c.reshape((n_runs * n_codes,) + rest)[:length].astype(jnp.int32)
    return jnp.moveaxis(c, 0, axis)
