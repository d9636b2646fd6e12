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
An ``-a8`` weight (int8 activations per block, integer dot products: ``int4-g32-a8``) runs on the
native CPU kernel's integer path where it applies (:func:`cascade.quant.kernels.cpu.matmul_a8`) and
on its XLA reference otherwise (:func:`cascade.quant.activations.a8_reference`); the backend names
are ``cpu-a8`` and ``xla-a8``, and ``CASCADE_MATMUL_BACKEND`` (``cpu``/``xla``) or ``backend=`` forces one.

**Under a tensor-parallel mesh** (a ``"tp"`` axis of the mesh set with ``jax.set_mesh``, as
:func:`cascade.models.sharding.on_mesh_of` does for a sharded model), a backend that XLA cannot
partition (a custom call: ``cpu``, ``pallas``; ``partitions=False``) runs **per shard** inside
``jax.shard_map`` when the caller names the layer's Megatron role (``parallel=``): a
``"column"`` layer multiplies the whole ``x`` by its slice of the output features, a ``"row"``
layer its slice of ``x``'s features by its rows and adds the partial sums (``psum``).  Each device
then runs the kernel on its own shard instead of XLA gathering the weight onto every device.
The ``xla`` reference partitions as it is.  :func:`whole_weights` turns the per-shard path off
while tracing a replicated model (a draft copied onto every device).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cascade.quant.activations import a8_reference, w8a8_matmul
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
    partitions: bool = False  # can XLA's SPMD partitioner split it (plain XLA ops), or must it run per shard?


_BACKENDS: dict[str, MatmulBackend] = {}


def register_backend(name: str, fn, *, supports=lambda x, w: True, priority: int = 0, fn_t=None,
                     supports_t=lambda x, w: True, partitions: bool = False) -> None:
    """Register (or replace) a dequant-matmul backend; ``fn_t``/``supports_t``: its ``x @ W.T``;
    ``partitions``: made of plain XLA ops (a custom call is not: it runs per shard under a mesh)."""
    _BACKENDS[name] = MatmulBackend(name=name, fn=fn, supports=supports, priority=priority, fn_t=fn_t,
                                    supports_t=supports_t, partitions=partitions)


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


register_backend("xla", xla_dequant_matmul, priority=0, fn_t=xla_dequant_matmul_t, partitions=True)


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


# -- per shard under a tensor-parallel mesh ------------------------------------------------------

TP_AXIS = "tp"  # the mesh axis of tensor parallelism (cascade.models.sharding's layout)
_WHOLE = contextvars.ContextVar("cascade_whole_weights", default=False)


@contextlib.contextmanager
def whole_weights():
    """Trace the matmuls inside without the per-shard path (a replicated model under a mesh: each
    device holds the whole weight, so no split and no all-reduce)."""
    token = _WHOLE.set(True)
    try:
        yield
    finally:
        _WHOLE.reset(token)


def tp_size() -> int:
    """The size of the ``"tp"`` axis of the mesh being traced under (1: none, or :func:`whole_weights`)."""
    if _WHOLE.get():
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or TP_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[TP_AXIS])


def leaf_specs(w: QuantizedTensor, dim: int | None) -> QuantizedTensor:
    """The :class:`PartitionSpec` of each leaf of ``w`` split along its logical ``dim`` over ``"tp"``
    (None: replicated): codes, group scales and zero points along the same axis; per-channel or
    per-tensor scales (one group the whole reduction axis) whole along a split of that axis."""
    rank = len(w.shape)
    split = P() if dim is None else P(*[TP_AXIS if i == dim else None for i in range(rank)])
    scale_split = split
    if dim is not None and dim == w.axis and w.spec.granularity != "group":
        scale_split = P()
    return QuantizedTensor(split, scale_split, None if w.zero is None else scale_split,
                           None if w.act_scale is None else P(), spec=w.spec, shape=w.shape, axis=w.axis,
                           dtype=w.dtype)


def splits_evenly(w: QuantizedTensor, dim: int, tp: int) -> bool:
    """Does a ``tp``-way split of ``w`` along ``dim`` give each device whole groups and whole packed runs?"""
    from cascade.quant import packing

    if w.shape[dim] % tp:
        return False
    if dim != w.axis:
        return True
    local = w.shape[dim] // tp
    if w.spec.granularity == "group" and local % w.spec.group_size:
        return False
    return local % packing.run_shape(w.spec.bits)[0] == 0


def _per_shard(x, w: QuantizedTensor, backend: str | None, parallel: str, tp: int, *, transposed: bool):
    """The kernel on each device's shard of ``w`` (module docs), chosen for the shard's shapes as
    :func:`select_backend` chooses (``backend`` forced, or the best that supports the shard); None
    when ``w`` does not split into whole groups and packed runs."""
    if parallel not in ("column", "row"):
        raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
    out_dim = 0 if transposed else 1  # the weight's output-feature axis
    dim = out_dim if parallel == "column" else 1 - out_dim
    if not splits_evenly(w, dim, tp):
        return None
    local = list(w.shape)
    local[dim] //= tp
    features = P(*([None] * (x.ndim - 1)), TP_AXIS)
    x_spec = P() if parallel == "column" else features
    out_spec = features if parallel == "column" else P()

    def body(x_local, w_local):
        w_local = QuantizedTensor(w_local.packed, w_local.scale, w_local.zero, w_local.act_scale, spec=w.spec,
                                  shape=local, axis=w.axis, dtype=w.dtype)
        pick = select_backend(x_local, w_local, backend, transposed=transposed)
        y = (pick.fn_t if transposed else pick.fn)(x_local, w_local)
        return y if parallel == "column" else jax.lax.psum(y, TP_AXIS)

    # check_vma=False: a Pallas call inside declares no per-device variance of its output
    return jax.shard_map(body, in_specs=(x_spec, leaf_specs(w, dim)), out_specs=out_spec, check_vma=False)(x, w)


A8_BACKENDS = ("cpu-a8", "xla-a8")


def a8_backend(x, w: QuantizedTensor, backend: str | None = None, *, transposed: bool = False) -> str:
    """Which of :data:`A8_BACKENDS` runs ``x @ w`` for an ``-a8`` weight (module docs): the native
    kernel where it applies, unless ``backend`` / ``CASCADE_MATMUL_BACKEND`` says ``xla``; a forced
    ``cpu`` that cannot run it, or another backend, is an error."""
    from cascade.quant.kernels import cpu

    name = backend or os.environ.get("CASCADE_MATMUL_BACKEND") or None
    if name not in (None, "cpu", "xla"):
        raise ValueError(f"matmul backend {name!r} does not run -a8 specs ({w.spec}); use cpu or xla")
    if name != "xla" and tp_size() == 1 and cpu.supports_a8(x, w, transposed=transposed):
        return "cpu-a8"
    if name == "cpu":
        raise ValueError(f"the native CPU kernel does not run {w.spec} with input {x.dtype}{tuple(x.shape)} here")
    return "xla-a8"


def _a8_matmul(x, w: QuantizedTensor, backend, *, transposed: bool):
    from cascade.quant.kernels import cpu

    if a8_backend(x, w, backend, transposed=transposed) == "cpu-a8":
        return cpu.matmul_a8(x, w, transposed=transposed)
    return a8_reference(x, w, transposed=transposed)


def _quantized_matmul(x, w: QuantizedTensor, backend, parallel, *, transposed: bool):
    chosen = select_backend(x, w, backend, transposed=transposed)
    tp = tp_size() if parallel is not None and not chosen.partitions else 1
    if tp > 1:
        y = _per_shard(x, w, backend, parallel, tp, transposed=transposed)
        if y is not None:
            return y
    return (chosen.fn_t if transposed else chosen.fn)(x, w)


def matmul(x, w, *, backend: str | None = None, parallel: str | None = None):
    """``x @ w`` for float or quantized ``w`` of shape (k, n); ``x`` has shape (..., k).
    ``parallel``: the layer's tensor-parallel role, ``"column"`` or ``"row"`` (module docs)."""
    x = jnp.asarray(x)
    check_operands(x, w)
    if not isinstance(w, QuantizedTensor):
        return _float_matmul(x, w, transposed=False)
    if w.spec.act is not None:
        return w8a8_matmul(x, w)
    if w.spec.a8:
        return _a8_matmul(x, w, backend, transposed=False)
    return _quantized_matmul(x, w, backend, parallel, transposed=False)


def matmul_many(x, ws, *, backend: str | None = None, parallel: str | None = None) -> list:
    """``[matmul(x, w) for w in ws]`` (weights of one input: a layer's q/k/v, gate/up), as one kernel
    call where they fuse on the native kernel: int8/int4 weights of the same bits, group size and
    zero-point kind (:func:`cascade.quant.kernels.cpu.matmul_many`), or -a8 weights of the same bits,
    blocks and zero-point kind (:func:`cascade.quant.kernels.cpu.matmul_a8_many`: ``x`` quantized
    once).  One job, fewer calls per layer, and each result exactly its separate call's.  Anything
    else (int3/int2 and float weights, which XLA compiles into the step as it likes), a forced backend
    other than ``cpu``, or a tensor-parallel mesh: one :func:`matmul` per weight."""
    from cascade.quant.kernels import cpu

    x = jnp.asarray(x)
    ws = list(ws)
    for w in ws:
        check_operands(x, w)
    if fuses(x, ws, backend=backend):
        return cpu.matmul_a8_many(x, ws) if ws[0].spec.a8 else cpu.matmul_many(x, ws)
    return [matmul(x, w, backend=backend, parallel=parallel) for w in ws]


def fuses(x, ws, *, backend: str | None = None) -> bool:
    """Whether :func:`matmul_many` runs ``ws`` against ``x`` as one kernel call here."""
    from cascade.quant.kernels import cpu

    forced = backend or os.environ.get("CASCADE_MATMUL_BACKEND") or None
    if forced not in (None, "cpu") or tp_size() != 1:
        return False
    return cpu.fuses_a8(x, ws) or cpu.fuses(x, ws)


def matmul_t(x, w, *, backend: str | None = None, parallel: str | None = None):
    """``x @ w.T`` for float or quantized ``w`` of shape (n, k), quantized along axis 1 (its rows:
    a tied LM head over an embedding ``(vocab, dim)``); backends read it in place, with no
    transposed copy of the codes.  ``parallel="column"``: the vocabulary split over ``"tp"``."""
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
    if w.spec.a8:
        return _a8_matmul(x, w, backend, transposed=True)
    return _quantized_matmul(x, w, backend, parallel, transposed=True)
