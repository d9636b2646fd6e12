"""Dequant-matmul benchmark: float32 ``x @ W`` against quantized ``W`` in one run.

Run ``cascade bench matmul`` (``--json`` for rows; the CLI is the one entry point, this is the library).
Each row times one jitted call, median over ``repeats`` runs after ``warmup`` calls; every
quantized row is measured beside the float32 row of the same shape and batch, on every backend
that runs it (the reference ``xla`` and the native ``cpu`` kernel), so ``speedup_vs_f32`` is a
ratio taken on one machine in one process.  ``gb_s`` is the weight's bytes over the time (the
rate a batch-1 matmul streams its weight at), ``pct_copy_bw`` that rate against the machine's
memory-copy bandwidth measured in the same run (:func:`copy_bandwidth`).  A ``w8a8`` spec times
the whole W8A8 matmul (per-token activation quantization, the integer dot, the rescale) on backend
``int8-dot``; an ``-a8`` spec (``int4-g32-a8``) the whole per-block int8-activation matmul on its
integer kernel ``cpu-a8`` and its XLA reference ``xla-a8``.  ``vs_one_row`` is a row's time over the
batch-1 time of the same spec, backend and shape (rows for the price of one: ``--batch
1,2,3,5,8,16`` gives the cost of a k-position verification call).
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from cascade import quant
from cascade import console
from cascade.console import progress_bar
from cascade.quant import dequant_matmul
from cascade.quant.activations import BACKEND as W8A8_BACKEND_NAME, a8_reference, w8a8_matmul
from cascade.quant.kernels import cpu as cpu_kernel
from cascade.quant.spec import FloatSpec
from cascade.bench.context import describe, run_context


def _time(fn, *args, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


DEFAULT_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (k, n): a 7B model's attention and MLP


def parse_specs(specs) -> list:
    """The precision specs this benchmark can time (a comma-separated string or a list), parsed; a
    one-line ValueError for none, an unknown spec, a float type (the fp32 row is always timed) or a
    static-activation spec (its activation scale is measured on a model's calibration data)."""
    names = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not names:
        raise ValueError("expected at least one precision spec, e.g. int8,int4-g128")
    parsed = []
    for name in names:
        spec = quant.parse_spec(name)
        if isinstance(spec, FloatSpec):
            raise ValueError(f"{name} is a float type, not a quantized spec (every table has the fp32 row)")
        if getattr(spec, "act", None) == "static":
            raise ValueError(f"{name}: a static activation scale is measured on a model's calibration data "
                             "(`cascade quantize --calib`); time w8a8 instead")
        parsed.append(spec)
    return parsed


def run(*, batches=(1, 4, 16, 64), shapes=DEFAULT_SHAPES, k=None, n=None, specs=("int8", "int4-g128"),
        backend=None, repeats=20, warmup=3, seed=0, progress=None, copy_bytes=256 << 20) -> dict:
    """Time f32 and each spec on every backend that runs it, for each shape and batch.

    ``k``/``n`` give a single shape instead of ``shapes``; ``backend`` restricts the quantized rows
    to one backend.  Returns ``{"device", ..., "copy_gb_s", "rows": [...]}``; a row's ``selected``
    says whether automatic dispatch picks that backend for that batch (the kernel also runs above
    its row limit here, to show where the limit belongs)."""
    if k is not None or n is not None:
        shapes = ((4096 if k is None else k, 4096 if n is None else n),)
    shapes = tuple((int(a), int(b)) for a, b in shapes)
    if not shapes or any(a <= 0 or b <= 0 for a, b in shapes) or any(b <= 0 for b in batches):
        raise ValueError("k, n and every batch size must be positive")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    for a, b in shapes:
        check_memory(batches=batches, k=a, n=b)
    specs = parse_specs(specs)
    if backend is not None and backend not in dequant_matmul.backends():
        raise ValueError(f"unknown matmul backend {backend!r}; registered: {sorted(dequant_matmul.backends())}")
    rng = np.random.default_rng(seed)
    copy_gb_s = copy_bandwidth(copy_bytes)
    f32_matmul = jax.jit(lambda x, w: x @ w)
    rows = []
    jobs = [(shape, b) for shape in shapes for b in batches]
    bar = progress_bar(total=len(jobs), desc="bench matmul", unit="job", enabled=progress, leave=False)
    for k_, n_ in shapes:
        w = jnp.asarray(rng.standard_normal((k_, n_), dtype=np.float32) / np.sqrt(k_))
        qweights = {str(s): quant.quantize(w, s) for s in specs}
        for b in batches:
            x = jnp.asarray(rng.standard_normal((b, k_), dtype=np.float32))
            base = _time(f32_matmul, x, w, repeats=repeats, warmup=warmup)
            rows.append(_row("fp32", "xla", b, k_, n_, base, base, k_ * n_ * 4, copy_gb_s, True))
            for s, qw in qweights.items():
                if qw.spec.act is not None:  # w8a8: int8 activations and an integer dot, outside the registry
                    ms = _time(jax.jit(w8a8_matmul), x, qw, repeats=repeats, warmup=warmup)
                    rows.append(_row(s, W8A8_BACKEND_NAME, b, k_, n_, ms, base, qw.nbytes, copy_gb_s, True))
                    continue
                if qw.spec.a8:  # int8 activations per block: the integer kernel and its reference
                    auto = dequant_matmul.a8_backend(x, qw)
                    fns = {"xla-a8": a8_reference, "cpu-a8": cpu_kernel.matmul_a8}
                    names = [nm for nm in fns if backend is None or nm.startswith(backend)
                             if nm == "xla-a8" or cpu_kernel.supports_a8(x, qw)]
                    for name in names:
                        ms = _time(jax.jit(fns[name]), x, qw, repeats=repeats, warmup=warmup)
                        rows.append(_row(s, name, b, k_, n_, ms, base, qw.nbytes, copy_gb_s, name == auto))
                    continue
                auto = dequant_matmul.select_backend(x, qw).name
                for name in _backends_for(qw, k_, backend):
                    # The quantized weight is a jit *argument*: XLA cannot constant-fold the dequantization.
                    fn = jax.jit(dequant_matmul.backends()[name].fn)
                    ms = _time(fn, x, qw, repeats=repeats, warmup=warmup)
                    rows.append(_row(s, name, b, k_, n_, ms, base, qw.nbytes, copy_gb_s, name == auto))
            bar.update()
        del w, qweights
    bar.close()
    one = {(r["spec"], r["backend"], r["k"], r["n"]): r["ms"] for r in rows if r["batch"] == 1}
    for r in rows:
        base1 = one.get((r["spec"], r["backend"], r["k"], r["n"]))
        r["vs_one_row"] = None if base1 is None else round(r["ms"] / base1, 3)
    return {"benchmark": "matmul", **run_context(repeats=repeats, warmup=warmup), "copy_gb_s": _sig(copy_gb_s),
            "kernel_simd": cpu_kernel.simd(), "kernel_isa": cpu_kernel.isa(), "rows": rows}


def _backends_for(w, k: int, only: str | None) -> list[str]:
    """The backends that run ``w`` on this machine at batch 1 (the row limit is lifted here)."""
    x1 = jax.ShapeDtypeStruct((1, k), jnp.float32)
    names = [b.name for b in sorted(dequant_matmul.backends().values(), key=lambda b: b.priority) if b.supports(x1, w)]
    if only is not None:
        if only not in names:
            raise ValueError(f"matmul backend {only!r} does not support {w.spec} here")
        names = [only]
    return names


def _row(spec, backend, batch, k, n, ms, base, nbytes, copy_gb_s, selected) -> dict:
    gb_s = nbytes / (ms * 1e-3) / 1e9
    return {"spec": spec, "backend": backend, "batch": batch, "k": k, "n": n, "ms": _sig(ms),
            "speedup_vs_f32": round(base / ms, 3), "weight_bytes": nbytes, "gb_s": _sig(gb_s),
            "pct_copy_bw": round(100 * gb_s / copy_gb_s, 2), "selected": selected}


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """The machine's memory-copy bandwidth in GB/s: bytes copied per second (each byte read once
    and written once; STREAM's "Copy" would count it twice) for a buffer far larger than the
    caches, split over one thread per core (numpy's copy releases the GIL), median of ``repeats``."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    parts = max(1, os.cpu_count() or 1)
    bounds = np.linspace(0, src.size, parts + 1).astype(int)
    times = []
    for _ in range(repeats + 1):  # the first copy faults the pages in
        threads = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in zip(bounds, bounds[1:])]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:]) / 1e9


def check_memory(*, batches, k: int, n: int) -> None:
    """Refuse shapes that cannot fit before allocating anything: the float32 weight, the reference
    backend's dequantized copy, the quantized copies, the inputs and outputs, against the memory
    this machine has available now."""
    need = 3 * k * n * 4 + max(batches) * (k + n) * 4 * 2
    avail = available_memory()
    if avail is not None and need > avail:
        raise ValueError(f"bench matmul with k={k}, n={n}, batch up to {max(batches)} needs about "
                         f"{need / 2**30:.1f} GiB; this machine has {avail / 2**30:.1f} GiB available")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable on Linux), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def format_table(result: dict) -> str:
    head = (f"dequant-matmul {describe(result)}, median of {result['repeats']} after {result['warmup']} warm-up; "
            f"memory copy {result['copy_gb_s']:.1f} GB/s; native kernel: {result['kernel_simd'] or 'unavailable'}"
            f" ({result.get('kernel_isa') or '-'})")
    rows = [(r["spec"], r["backend"], r["batch"], r["k"], r["n"], f"{r['ms']:.3f}", f"{r['speedup_vs_f32']:.2f}x",
             "-" if r.get("vs_one_row") is None else f"{r['vs_one_row']:.2f}x",
             f"{r['weight_bytes'] / 2**20:.2f}", f"{r['gb_s']:.1f}", f"{r['pct_copy_bw']:.1f}", "*" if r["selected"] else "")
            for r in result["rows"]]
    return head + "\n" + console.format_table(
        rows, ("spec", "backend", "batch", "k", "n", "ms", "vs f32", "vs 1 row", "MiB", "GB/s", "% copy", "auto"),
        align="<<>>>>>>>>><")


def _sig(x: float) -> float:
    """``x`` to 5 significant digits: fixed decimals would flatten sub-microsecond timings of tiny
    shapes (and the ratios the rows are checked by) to a few steps."""
    return float(f"{x:.5g}")
