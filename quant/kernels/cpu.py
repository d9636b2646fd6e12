"""The native CPU kernels: the dequant-matmul backend ``cpu`` and the KV-cache attention, C++ XLA FFI custom calls.

``y = x @ dequant(W)`` straight from the packed codes, never materializing the float weight
(the reference backend does, and on CPU that costs 10x the float dot: README, matmul section).
The kernel (``cpu_qmatmul.cc`` beside this file) reads the layout :mod:`cascade.quant.packing`
documents as it is, runs AVX2 + FMA where the processor has them (a scalar path otherwise) and
splits the work over its own helper threads, one per further core (``CASCADE_NUM_THREADS`` caps
the threads; they busy-wait ``CASCADE_CPU_SPIN_US`` microseconds, default 200, for the next call
before they sleep).  It supports int8 and int4 weights quantized along the input axis, per channel, per
tensor or in groups (even sizes for int4), symmetric or asymmetric with float16, bfloat16 or
float32 scales and zero points (GGUF Q4_1's float32 zeros included), and float32 or bfloat16
activations.  Everything else goes to the reference ``xla`` backend.

**Int8 activations (``-a8`` specs).**  :func:`matmul_a8` runs the integer-domain kernel
(``cpu_qmatmul_a8.cc``): each row of ``x`` quantized to int8 per block of the weight's group and
multiplied with integer dot products (AVX2 ``vpmaddubsw``/``vpmaddwd``, AVX-512 VNNI ``vpdpbusd``),
the arithmetic of :func:`cascade.quant.activations.a8_reference` exactly.

**Instruction sets.**  Each kernel has a scalar path and SIMD paths chosen at run time by what the
processor has (:func:`hardware_isa`: ``scalar``, ``avx2``, ``avx512vnni``).  ``CASCADE_CPU_ISA``
(``scalar``, ``avx2``, ``avx512``; unset: the best there is) caps the choice at every call, so the
tests run every path this machine has, and the scalar one always.

The same extension holds the KV-cache attention kernel (``cpu_attention.cc``):
:func:`cache_attention` reads float and int8/int4 KIVI caches in place for decode-sized calls
(README, KV cache).

The extension is compiled by the package's own build (``pip install .`` / ``pip install -e .``,
setup.py).  If it is missing (no compiler at install time) or does not load, the ``xla`` backend
serves every call and one warning line says so on stderr.
"""

from __future__ import annotations

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cascade.quant.qtensor import QuantizedTensor

TARGET = "cascade_qmatmul"
MANY_TARGET = "cascade_qmatmul_many"  # several weights against one x in one call (q/k/v, gate/up)
A8_TARGET = "cascade_qmatmul_a8"
A8_MANY_TARGET = "cascade_qmatmul_a8_many"  # several weights against one x in one call (q/k/v, gate/up)
ISA_ENV = "CASCADE_CPU_ISA"
ISA_CAPS = ("scalar", "avx2", "avx512")  # CASCADE_CPU_ISA values; "avx512" means AVX-512 with VNNI
ATTENTION_FLOAT_TARGET = "cascade_cache_attention_float"
ATTENTION_KIVI_TARGET = "cascade_cache_attention_kivi"
NAME = "cpu"
PRIORITY = 10  # preferred over the reference (0) wherever it applies
# Rows of x (batch x tokens) up to which the kernel is used; above, the reference
# dequantize-then-dot wins (XLA's float GEMM amortizes the dequantization over many rows).
MAX_ROWS = 64
# Query tokens per call up to which cache attention runs on the kernel (decode steps and
# speculative verification); longer calls (prefill, scoring windows) batch better in XLA's dots.
MAX_ATTENTION_TOKENS = 16
ATTENTION_BACKEND_ENV = "CASCADE_ATTENTION_BACKEND"

_warned = False


@functools.cache
def unavailable() -> str | None:
    """None when the native kernel is registered with XLA, else why it is not."""
    try:
        from cascade.quant.kernels import _cpu
    except ImportError as e:
        return f"the extension was not built or does not load ({e})"
    try:
        jax.ffi.register_ffi_target(TARGET, _cpu.qmatmul_handler(), platform="cpu")
        jax.ffi.register_ffi_target(MANY_TARGET, _cpu.qmatmul_many_handler(), platform="cpu")
        jax.ffi.register_ffi_target(A8_TARGET, _cpu.qmatmul_a8_handler(), platform="cpu")
        jax.ffi.register_ffi_target(A8_MANY_TARGET, _cpu.qmatmul_a8_many_handler(), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_FLOAT_TARGET, _cpu.attention_float_handler(), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_KIVI_TARGET, _cpu.attention_kivi_handler(), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: use the reference
        return f"XLA refused the custom call ({type(e).__name__}: {e})"
    return None


def simd() -> str | None:
    """The instruction set the kernel runs with ('avx2+fma' or 'scalar'), None if unavailable."""
    if unavailable():
        return None
    from cascade.quant.kernels import _cpu

    return _cpu.simd()


def check_isa_env() -> str | None:
    """The value of ``CASCADE_CPU_ISA`` (None if unset or empty); a ValueError names the allowed ones."""
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if value and value not in ISA_CAPS:
        raise ValueError(f"{ISA_ENV}={value!r}: expected one of {', '.join(ISA_CAPS)} (or unset: the best this CPU has)")
    return value or None


def isa() -> str | None:
    """The instruction set the kernels run with now: ``scalar``, ``avx2`` or ``avx512vnni`` (the best
    of :func:`hardware_isa`, capped by ``CASCADE_CPU_ISA``); None if the extension is unavailable."""
    check_isa_env()
    if unavailable():
        return None
    from cascade.quant.kernels import _cpu

    return _cpu.isa()


def hardware_isa() -> str | None:
    """The best instruction set this processor has a kernel path for; None if the extension is unavailable."""
    if unavailable():
        return None
    from cascade.quant.kernels import _cpu

    return _cpu.hardware_isa()


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"warning: cascade: native CPU matmul kernel unavailable, using the reference xla backend: {reason}",
              file=sys.stderr)


def _available() -> bool:
    """Whether the extension is loaded; if not, say why once on stderr."""
    reason = unavailable()
    if reason:
        _warn_once(reason)
    return reason is None


def group_rows(w: QuantizedTensor) -> int:
    """Values of the reduction axis that share one scale: the group size, or the whole axis."""
    return w.spec.group_size if w.spec.granularity == "group" else w.shape[w.axis]


def supports(x, w: QuantizedTensor, *, transposed: bool = False) -> bool:
    """Whether the kernel runs ``x @ w`` (``transposed``: ``x @ w.T`` for ``w`` (n, k) quantized
    along axis 1, a tied embedding used as the LM head)."""
    if jax.default_backend() != "cpu":
        return False
    if not _operands_ok(x, w, transposed) or math.prod(x.shape[:-1]) > MAX_ROWS:
        return False
    k = w.shape[w.axis]
    g = group_rows(w)
    if transposed and g % 8 and g < k:
        return False  # the transposed kernel reads 8 codes of a group at a time
    return _available()


def _operands_ok(x, w: QuantizedTensor, transposed: bool) -> bool:
    """What both kernels need: a 2-D int8/int4 weight along its input axis (axis 1 for a tied head),
    float32/bfloat16 activations, float scales and zero points, 4-bit groups of whole bytes."""
    if w.spec.bits not in (4, 8) or w.axis != (1 if transposed else 0) or len(w.shape) != 2 or w.stack_shape:
        return False
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        return False
    if w.spec.bits == 4 and group_rows(w) % 2 and group_rows(w) < w.shape[w.axis]:
        return False  # a group would split a byte of two 4-bit codes
    reals = (jnp.float32, jnp.float16, jnp.bfloat16)
    return w.scale.dtype in reals and (w.zero is None or w.zero.dtype in reals)


def supports_a8(x, w: QuantizedTensor, *, transposed: bool = False) -> bool:
    """Whether the integer kernel runs ``x @ w`` (``x @ w.T`` when ``transposed``) for an ``-a8`` weight."""
    if jax.default_backend() != "cpu" or not w.spec.a8:
        return False
    check_isa_env()
    return _operands_ok(x, w, transposed) and _available()


def matmul_a8(x, w: QuantizedTensor, *, transposed: bool = False):
    """``x @ W`` (``x @ W.T`` when ``transposed``) with int8 activations per block, on the integer
    kernel: the arithmetic of :func:`cascade.quant.activations.a8_reference`."""
    from cascade.quant.activations import a8_block

    reason = unavailable()
    if reason:
        raise RuntimeError(f"the native CPU matmul kernel is unavailable: {reason}")
    k = w.shape[w.axis]
    n = w.shape[1 - w.axis]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    # int8 codes of the full grid reach -128, which the sign trick of the kernel's int8 dot cannot
    # negate: they run as unsigned codes with the offset as a zero point (the same sums)
    zero, has_zero = _a8_zero(w)
    call = jax.ffi.ffi_call(A8_TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), x.dtype), vmap_method="sequential")
    y = call(x2, w.packed, w.scale, zero, bits=np.int64(w.spec.bits), group=np.int64(a8_block(w)),
             has_zero=has_zero, transposed=transposed)
    return y.reshape(*lead, n)


def _a8_zero(w: QuantizedTensor):
    """(zero operand, has_zero) of an -a8 weight for the kernel (full-grid int8: the offset as a zero point)."""
    if w.zero is not None:
        return w.zero, True
    if _a8_zero_kind(w):
        return jnp.full(w.scale.shape, 128.0, jnp.float32), True
    return jnp.zeros((1, 1), jnp.float32), False


def fuses_a8(x, ws) -> bool:
    """Whether :func:`matmul_a8_many` runs the -a8 weights ``ws`` (each (k, n_i)) against ``x`` in one
    call: each runs on the kernel, with the same bits, activation blocks and zero-point kind."""
    from cascade.quant.activations import a8_block

    if len(ws) < 2 or not all(isinstance(w, QuantizedTensor) and w.spec.a8 for w in ws):
        return False
    if not all(supports_a8(x, w) for w in ws):
        return False
    first = ws[0]
    key = lambda w: (w.spec.bits, a8_block(w), _a8_zero_kind(w), w.shape[0])  # noqa: E731
    return all(key(w) == key(first) for w in ws)


def _a8_zero_kind(w: QuantizedTensor) -> bool:
    """Whether the kernel runs ``w`` with a zero point: asymmetric, or full-grid int8 (codes reach -128)."""
    return w.zero is not None or (w.spec.bits == 8 and w.spec.full_range)


def matmul_a8_many(x, ws):
    """``[x @ W for W in ws]`` for -a8 weights that :func:`fuses_a8`: one kernel call that quantizes
    ``x`` once and runs every weight as one job (fewer calls per layer); each result equals the
    weight's own :func:`matmul_a8` exactly (the same sums in the same order)."""
    from cascade.quant.activations import a8_block

    zeros = [_a8_zero(w) for w in ws]
    return _many(A8_MANY_TARGET, x, ws, [z for z, _ in zeros], group=a8_block(ws[0]), has_zero=zeros[0][1])


def _many(target: str, x, ws, zeros, *, group: int, has_zero: bool):
    """One custom call of ``target`` running every weight of ``ws`` (each (k, n_i)) against ``x``:
    arguments x, then (codes, scale, zero) per weight; one result per weight."""
    reason = unavailable()
    if reason:
        raise RuntimeError(f"the native CPU matmul kernel is unavailable: {reason}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, ws[0].shape[0])
    args = [a for w, z in zip(ws, zeros) for a in (w.packed, w.scale, z)]
    outs = tuple(jax.ShapeDtypeStruct((x2.shape[0], w.shape[1]), x.dtype) for w in ws)
    call = jax.ffi.ffi_call(target, outs, vmap_method="sequential")
    ys = call(x2, *args, bits=np.int64(ws[0].spec.bits), group=np.int64(group), has_zero=has_zero)
    return [y.reshape(*lead, w.shape[1]) for y, w in zip(ys, ws)]


def fuses(x, ws) -> bool:
    """Whether :func:`matmul_many` runs the (float-activation) weights ``ws`` (each (k, n_i)) against
    ``x`` in one call: each runs on the kernel, with the same bits, group size and zero-point kind."""
    if len(ws) < 2 or not all(isinstance(w, QuantizedTensor) and not w.spec.a8 and w.spec.act is None for w in ws):
        return False
    if not all(supports(x, w) for w in ws):
        return False
    key = lambda w: (w.spec.bits, group_rows(w), w.zero is not None, w.shape[0])  # noqa: E731
    return all(key(w) == key(ws[0]) for w in ws)


def matmul_many(x, ws):
    """``[x @ dequant(W) for W in ws]`` for weights that :func:`fuses`: one kernel call (x converted and
    summed per group once, every weight one job: fewer calls per layer); each result equals the
    weight's own :func:`matmul` exactly (the same sums in the same order)."""
    has_zero = ws[0].zero is not None
    zeros = [w.zero if has_zero else jnp.zeros((1, 1), jnp.float32) for w in ws]  # ignored without has_zero
    return _many(MANY_TARGET, x, ws, zeros, group=group_rows(ws[0]), has_zero=has_zero)


def matmul(x, w: QuantizedTensor):
    """``x @ dequant(w)`` through the native kernel; ``x`` (..., k), ``w`` (k, n) along axis 0."""
    return _call(x, w, transposed=False)


def matmul_t(x, w: QuantizedTensor):
    """``x @ dequant(w).T`` for ``w`` (n, k) quantized along axis 1, read in place (no transposed
    copy of the codes: for SmolLM2's tied head that copy cost 28 ms a token)."""
    return _call(x, w, transposed=True)


def _call(x, w: QuantizedTensor, *, transposed: bool):
    reason = unavailable()  # registers the custom call on first use
    if reason:
        raise RuntimeError(f"the native CPU matmul kernel is unavailable: {reason}")
    k = w.shape[w.axis]
    n = w.shape[1 - w.axis]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    zero = w.zero if w.zero is not None else jnp.zeros((1, 1), jnp.float32)  # ignored: has_zero=False
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), x.dtype), vmap_method="sequential")
    y = call(x2, w.packed, w.scale, zero, bits=np.int64(w.spec.bits), group=np.int64(group_rows(w)),
             has_zero=w.zero is not None, transposed=transposed)
    return y.reshape(*lead, n)


# ------------------------------------------------------------------------- KV-cache attention


def attention_supported(q, k, v) -> bool:
    """Whether :func:`cache_attention` runs the kernel for queries ``q`` (B, T, H, hd) over a
    cache ``k``, ``v``: float (B, S, KV, hd) arrays, or int8/int4 KIVI :class:`QuantizedTensor`s.
    ``CASCADE_ATTENTION_BACKEND=xla`` turns the kernel off (``cpu``: on wherever it applies,
    the default)."""
    choice = os.environ.get(ATTENTION_BACKEND_ENV, "").strip().lower()
    if choice not in ("", "auto", "cpu", "xla"):
        raise ValueError(f"{ATTENTION_BACKEND_ENV}={choice!r}: expected xla or cpu")
    if choice == "xla" or jax.default_backend() != "cpu" or q.ndim != 4 or q.shape[1] > MAX_ATTENTION_TOKENS:
        return False
    if isinstance(k, QuantizedTensor) != isinstance(v, QuantizedTensor):
        return False
    if isinstance(k, QuantizedTensor):
        if k.spec.bits not in (4, 8) or v.spec.bits != k.spec.bits or k.axis != 1 or v.axis != 2 or v.zero is not None:
            return False
    elif k.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16) or v.dtype != k.dtype:
        return False
    return _available()


def attention_backend() -> str:
    """The backend a decode step's cache attention runs on here: ``cpu`` (the native kernel) or
    ``xla`` (the reference: another platform, the extension missing, or
    ``CASCADE_ATTENTION_BACKEND=xla``).  ``generate --json``, ``run --json`` and ``bench decode``
    report it."""
    forced = os.environ.get(ATTENTION_BACKEND_ENV, "").strip().lower()
    if forced == "xla" or jax.default_backend() != "cpu" or unavailable():
        return "xla"
    return "cpu"


def cache_attention(q, lo, hi, k, v):
    """The softmax partial of queries ``q`` (B, T, H, hd) float32, already scaled by hd^-0.5, over
    cache positions ``[lo[b, t], hi[b, t])`` (B, T) of ``k``, ``v``, read in place by the kernel:
    ``(acc (B, T, H, hd), m (B, T, H), l (B, T, H))`` with ``m`` the largest score, ``l`` the sum
    of ``exp(score - m)`` and ``acc`` the sum of ``exp(score - m) * value``; ``m = -inf``,
    ``l = 0``, ``acc = 0`` where no position is visible."""
    reason = unavailable()
    if reason:
        raise RuntimeError(f"the native CPU attention kernel is unavailable: {reason}")
    b, t, h, hd = q.shape
    out = (jax.ShapeDtypeStruct((b, t, h, hd), jnp.float32), jax.ShapeDtypeStruct((b, t, h), jnp.float32),
           jax.ShapeDtypeStruct((b, t, h), jnp.float32))
    q = q.astype(jnp.float32)
    lo, hi = lo.astype(jnp.int32), hi.astype(jnp.int32)
    if not isinstance(k, QuantizedTensor):
        call = jax.ffi.ffi_call(ATTENTION_FLOAT_TARGET, out, vmap_method="sequential")
        return call(q, lo, hi, k, v)
    width = k.shape[2]
    kv_heads = width // hd
    call = jax.ffi.ffi_call(ATTENTION_KIVI_TARGET, out, vmap_method="sequential")
    return call(q, lo, hi, k.packed, k.scale, k.zero, v.packed, v.scale, bits=np.int64(k.spec.bits),
                key_group=np.int64(k.spec.group_size), value_group=np.int64(v.spec.group_size),
                kv_heads=np.int64(kv_heads))
