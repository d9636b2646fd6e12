"""Dequant-matmul benchmark: float32 ``x @ W`` against quantized ``W`` in one run.

Run ``cascade bench matmul`` (``--json`` for rows; the CLI is the one entry point, this is the library).
Each row times one jitted call, median over ``repeats`` runs after ``warmup`` calls; every
quantized row is measured beside the float32 row of the same batch, so ``speedup_vs_f32`` is a
ratio taken on one machine in one process.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cascade import quant
from cascade.bench.context import run_context


def _time(fn, *args, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(*, batches=(1, 16, 256), k=4096, n=4096, specs=("int8", "int4-g128"), backend=None,
        repeats=20, warmup=3, seed=0, progress=None) -> dict:
    """Time f32 and each spec for each batch; returns ``{"device", ..., "rows": [...]}``."""
    if k <= 0 or n <= 0 or any(b <= 0 for b in batches):
        raise ValueError("k, n and every batch size must be positive")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    check_memory(batches=batches, k=k, n=n)
    specs = [quant.parse_spec(s) for s in specs]
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k))
    qweights = {str(s): quant.quantize(w, s) for s in specs}
    f32_matmul = jax.jit(lambda x, w: x @ w)
    # The quantized weight is a jit *argument*, so XLA cannot constant-fold the dequantization.
    q_matmul = jax.jit(lambda x, w: quant.matmul(x, w, backend=backend))
    rows = []
    jobs = [(b, s) for b in batches for s in ["fp32"] + list(qweights)]
    for b, s in tqdm(jobs, desc="bench matmul", disable=None if progress is None else not progress, leave=False):
        x = jnp.asarray(rng.standard_normal((b, k), dtype=np.float32))
        if s == "fp32":
            ms = _time(f32_matmul, x, w, repeats=repeats, warmup=warmup)
            base, name, nbytes = ms, "xla", k * n * 4
        else:
            qw = qweights[s]
            ms = _time(q_matmul, x, qw, repeats=repeats, warmup=warmup)
            name, nbytes = _backend_name(x, qw, backend), qw.nbytes
        rows.append({"spec": s, "backend": name, "batch": b, "k": k, "n": n, "ms": round(ms, 4),
                     "speedup_vs_f32": round(base / ms, 3), "weight_bytes": nbytes})
    return {"benchmark": "matmul", **run_context(repeats=repeats, warmup=warmup), "rows": rows}


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


def _backend_name(x, w, backend) -> str:
    from cascade.quant.dequant_matmul import select_backend

    return select_backend(x, w, backend).name


def format_table(result: dict) -> str:
    lines = [f"dequant-matmul on {result['device']} ({result['cpu']}, {result['cores']} cores; jax {result['jax']}, "
             f"median of {result['repeats']} after {result['warmup']} warm-up)",
             f"{'spec':<12} {'backend':<8} {'batch':>5} {'k':>6} {'n':>6} {'ms':>9} {'vs f32':>7} {'weight MiB':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['spec']:<12} {r['backend']:<8} {r['batch']:>5} {r['k']:>6} {r['n']:>6} {r['ms']:>9.3f} "
                     f"{r['speedup_vs_f32']:>6.2f}x {r['weight_bytes'] / 2**20:>10.2f}")
    return "\n".join(lines)
