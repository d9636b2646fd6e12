"""Dequant-matmul ``x @ W`` for a quantized ``W``, with a registry of backends.

The ``xla`` backend is the reference: it dequantizes ``W`` and lets XLA run the dot (the
approach of qwix/AQT off TPU).  Faster kernels (a CPU custom call, a Pallas GPU kernel)
register themselves with :func:`register_backend` and are tested against it.  Float ``W``
goes straight to ``jnp.matmul``, so model code calls :func:`matmul` for every linear layer.

Backend choice: the ``backend`` argument, else the ``CASCADE_MATMUL_BACKEND`` environment
variable, else the highest-priority registered backend that supports the operands.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp

from cascade.quant.qtensor import QuantizedTensor, check_unstacked, dequantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatmulBackend:
    name: str  # e.g. "xla", "cpu-ffi", "pallas"
    fn: Callable[[jnp.ndarray, QuantizedTensor], jnp.ndarray]  # (x (..., k), W (k, n)) -> (..., n)
    supports: Callable[[jnp.ndarray, QuantizedTensor], bool]  # can it run these operands here?
    priority: int = 0  # auto-selection prefers higher


_BACKENDS: dict[str, MatmulBackend] = {}


def register_backend(name: str, fn, *, supports=lambda x, w: True, priority: int = 0) -> None:
    """Register (or replace) a dequant-matmul backend."""
    _BACKENDS[name] = MatmulBackend(name=name, fn=fn, supports=supports, priority=priority)


def backends() -> dict[str, MatmulBackend]:
    return dict(_BACKENDS)


def xla_dequant_matmul(x, w: QuantizedTensor):
    """Reference: ``x @ dequantize(W)``; W is dequantized to the activation dtype (bf16 stays
    bf16) and the dot accumulates in float32."""
    w_hat = dequantize(w, x.dtype)
    return jnp.matmul(x, w_hat, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32).astype(x.dtype)


register_backend("xla", xla_dequant_matmul, priority=0)


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


def select_backend(x, w: QuantizedTensor, backend: str | None = None) -> MatmulBackend:
    name = backend or os.environ.get("CASCADE_MATMUL_BACKEND") or None
    if name is not None:
        if name not in _BACKENDS:
            raise ValueError(f"unknown matmul backend {name!r}; registered: {sorted(_BACKENDS)}")
        chosen = _BACKENDS[name]
        if not chosen.supports(x, w):
            raise ValueError(f"matmul backend {name!r} does not support {w.spec} with input {x.dtype}{tuple(x.shape)}")
        return chosen
    usable = [b for b in _BACKENDS.values() if b.supports(x, w)]
    if not usable:
        raise ValueError(f"no registered matmul backend supports {w.spec} with input {x.dtype}{tuple(x.shape)}")
    return max(usable, key=lambda b: b.priority)


def matmul(x, w, *, backend: str | None = None):
    """``x @ w`` for float or quantized ``w`` of shape (k, n); ``x`` has shape (..., k)."""
    x = jnp.asarray(x)
    check_operands(x, w)
    if not isinstance(w, QuantizedTensor):
        return jnp.matmul(x, w)
    return select_backend(x, w, backend).fn(x, w)
