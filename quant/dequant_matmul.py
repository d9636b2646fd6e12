"""Dequant-matmul ``x @ W`` for a quantized ``W``, with a registry of backends.

The ``xla`` backend is the reference: it dequantizes ``W`` and lets XLA run the dot (the
approach of qwix/AQT off TPU).  Faster kernels (a CPU custom call, a Pallas GPU kernel)
register themselves with :func:`register_backend` and are tested against it.  Float ``W``
goes straight to ``jnp.matmul``, so model code calls :func:`matmul` for every linear layer.

Backend choice: the ``backend`` argument, else the ``CASCADE_MATMUL_BACKEND`` environment
variable, else the highest-priority registered backend that supports the operands.  Registered
here: ``xla`` (the reference, priority 0), ``cpu`` (:mod:`cascade.quant.kernels.cpu`, the
native kernel, priority 10, where it applies: int8/int4 on the CPU at decode-sized batches) and
``pallas`` (:mod:`cascade.quant.kernels.pallas`, priority 20, on GPU/TPU; on CPU only when
forced, in interpret mode).

A ``w8a8`` weight (int8 activations too) bypasses the registry: its matmul quantizes ``x`` and runs an
integer dot (:func:`cascade.quant.activations.w8a8_matmul`), which no weight-only backend does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp

from cascade.quant.activations import w8a8_matmul
from cascade.quant.qtensor import QuantizedTensor, check_unstacked, dequantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatmulBackend:
    name: str  # e.g. "xla", "cpu", "pallas"
    fn: Callable[[jnp.ndarray, QuantizedTensor], jnp.ndarray]  # (x (..., k), W (k, n)) -> (..., n)
    supports: Callable[[jnp.ndarray, QuantizedTensor], bool]  # can it run these operands here?
    priority: int = 0  # auto-selection prefers higher
    # x @ W.T for W (n, k) quantized along axis 1 (a tied LM head), or None if not offered
    fn_t: Callable[[jnp.ndarray, QuantizedTensor], jnp.ndarray] | None = None
    supports_t: Callable[[jnp.ndarray, QuantizedTensor], bool] = lambda x, w: True


_BACKENDS: dict[str, MatmulBackend] = {}


def register_backend(name: str, fn, *, supports=lambda x, w: True, priority: int = 0, fn_t=None,
                     supports_t=lambda x, w: True) -> None:
    """Register (or replace) a dequant-matmul backend; ``fn_t``/``supports_t``: its ``x @ W.T``."""
    _BACKENDS[name] = MatmulBackend(name=name, fn=fn, supports=supports, priority=priority, fn_t=fn_t,
                                    supports_t=supports_t)


def backends() -> dict[str, MatmulBackend]:
    return dict(_BACKENDS)


def xla_dequant_matmul(x, w: QuantizedTensor):
    """Reference: ``x @ dequantize(W)``; W is dequantized to the activation dtype (bf16 stays
    bf16) and the dot accumulates in float32."""
    w_hat = dequantize(w, x.dtype)
    return jnp.matmul(x, w_hat, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32).astype(x.dtype)


def xla_dequant_matmul_t(x, w: QuantizedTensor):
    """Reference ``x @ dequantize(W).T`` (W (n, k) quantized along axis 1)."""
    w_hat = dequantize(w, x.dtype)
    return jnp.matmul(x, w_hat.T, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32).astype(x.dtype)


register_backend("xla", xla_dequant_matmul, priority=0, fn_t=xla_dequant_matmul_t)


def _register_kernels() -> None:
    from cascade.quant.kernels import cpu, pallas

    register_backend(cpu.NAME, cpu.matmul, supports=cpu.supports, priority=cpu.PRIORITY, fn_t=cpu.matmul_t,
                     supports_t=lambda x, w: cpu.supports(x, w, transposed=True))
    register_backend(pallas.NAME, pallas.matmul, supports=pallas.supports, priority=pallas.PRIORITY)


_register_kernels()


def check_operands(x, w) -> None:
    if x.ndim < 1:
        raise ValueError("matmul input must have at least 1 dimension")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"matmul input must be floating-point, got {x.dtype}")
    if isinstance(w, QuantizedTensor):
        check_unstacked(w)
    if len(w.shape) != 2:
        raise ValueError(f"matmul weight must be 2-D (k, n), got shape {tuple(w.shape)}")
    if isinstance(w, QuantizedTensor) and w.axis != 0:
        raise ValueError(f"matmul weight must be quantized along its input axis 0, got axis {w.axis}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"matmul shape mismatch: x has {x.shape[-1]} features, weight expects {w.shape[0]}")


def select_backend(x, w: QuantizedTensor, backend: str | None = None, *, transposed: bool = False) -> MatmulBackend:
    """The backend for ``x @ w`` (``transposed``: ``x @ w.T``)."""
    def ok(b: MatmulBackend) -> bool:
        return b.fn_t is not None and b.supports_t(x, w) if transposed else b.supports(x, w)

    name = backend or os.environ.get("CASCADE_MATMUL_BACKEND") or None
    if name is not None:
        if name not in _BACKENDS:
            raise ValueError(f"unknown matmul backend {name!r}; registered: {sorted(_BACKENDS)}")
        chosen = _BACKENDS[name]
        if not ok(chosen):
            raise ValueError(f"matmul backend {name!r} does not support {w.spec} with input {x.dtype}{tuple(x.shape)}")
        return chosen
    usable = [b for b in _BACKENDS.values() if ok(b)]
    if not usable:
        raise ValueError(f"no registered matmul backend supports {w.spec} with input {x.dtype}{tuple(x.shape)}")
    return max(usable, key=lambda b: b.priority)


# A float weight of another dtype than x (a bf16 head under an f32 activation) of at least this
# many bytes is multiplied row by row when x has 2..ROWWISE_ROWS rows: for one row XLA on CPU fuses
# the cast into the dot, for several it first writes the whole cast matrix (for SmolLM2's 49152 x 576
# bf16 head, 113 MB: 40 ms against 2.3 ms a row), which is what a speculative verifier's few rows hit.
ROWWISE_BYTES = 8 << 20
ROWWISE_ROWS = 16


def _float_matmul(x, w, *, transposed: bool):
    """``x @ w`` (``x @ w.T`` when ``transposed``) for a float ``w``, promoted to ``x``'s dtype."""
    w = jnp.asarray(w)
    rows = math.prod(x.shape[:-1])
    if w.dtype == x.dtype or w.nbytes < ROWWISE_BYTES or not 1 < rows <= ROWWISE_ROWS:
        return jnp.matmul(x, (w.T if transposed else w).astype(x.dtype))
    flat, out = x.reshape(rows, x.shape[-1]), []
    for i in range(rows):  # the barrier keeps XLA from sharing one cast of w between the rows
        wi = jax.lax.optimization_barrier(w) if i else w
        out.append(jnp.matmul(flat[i:i + 1], (wi.T if transposed else wi).astype(x.dtype)))
    return jnp.concatenate(out).reshape(*x.shape[:-1], -1)


def matmul(x, w, *, backend: str | None = None):
    """``x @ w`` for float or quantized ``w`` of shape (k, n); ``x`` has shape (..., k)."""
    x = jnp.asarray(x)
    check_operands(x, w)
    if not isinstance(w, QuantizedTensor):
        return _float_matmul(x, w, transposed=False)
    if w.spec.act is not None:
        return w8a8_matmul(x, w)
    return select_backend(x, w, backend).fn(x, w)


def matmul_t(x, w, *, backend: str | None = None):
    """``x @ w.T`` for float or quantized ``w`` of shape (n, k), quantized along axis 1 (its rows:
    a tied LM head over an embedding ``(vocab, dim)``); backends read it in place, with no
    transposed copy of the codes."""
    x = jnp.asarray(x)
    if not isinstance(w, QuantizedTensor):
        return _float_matmul(x, w, transposed=True)
    check_unstacked(w)
    if len(w.shape) != 2 or w.axis != 1:
        raise ValueError(f"matmul_t takes a 2-D weight quantized along axis 1, got shape {w.shape}, axis {w.axis}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"matmul_t shape mismatch: x has {x.shape[-1]} features, weight rows have {w.shape[1]}")
    if w.spec.act is not None:
        return w8a8_matmul(x, w, transposed=True)
    return select_backend(x, w, backend, transposed=True).fn_t(x, w)
