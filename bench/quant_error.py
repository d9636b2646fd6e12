"""Quantization error per spec: relative Frobenius error and bits per weight, on synthetic weights.

``cascade bench error`` (``--json`` for rows).  Two weight
distributions: Gaussian, and Student-t with 3 degrees of freedom (heavy tails, like the outlier
channels of LLM weights).  Each spec is also tried with MSE and 99.9th-percentile clipping.
"""

from __future__ import annotations

import numpy as np

from cascade import console, quant
from cascade.console import progress_bar
from cascade.bench.context import run_context
from cascade.quant.rtn import relative_error

DEFAULT_SPECS = ("int8", "int4", "int4-g128", "int4-g128-asym", "int4-g64-asym", "int4-g32", "int3-g32", "int2-g16-asym")


DEFAULT_CLIPS = ("minmax", "mse", "p99.9")


def check_specs(specs, clips=DEFAULT_CLIPS) -> list[str]:
    """The weight specs (a comma-separated string or a list) this benchmark measures, each with every
    clip method; a one-line ValueError for none, an unknown spec, a float type, a spec that sets
    its own clipping, or a w8a8 spec (its activations are not a weight's error)."""
    names = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not names:
        raise ValueError("expected at least one precision spec, e.g. int8,int4-g128")
    for name in names:
        spec = quant.parse_spec(name)
        if not isinstance(spec, quant.IntSpec):
            raise ValueError(f"{name} is a float type, not a quantized spec")
        if spec.act is not None:
            raise ValueError(f"{name} quantizes activations too; the weight error of its weights is int8's")
        if spec.clip != "minmax":
            raise ValueError(f"{name} sets its own clipping; every spec is measured with {', '.join(clips)}")
    return names


def run(*, specs=DEFAULT_SPECS, clips=DEFAULT_CLIPS, k=2048, n=512, seed=0, progress=None) -> dict:
    specs = check_specs(specs, clips)
    rng = np.random.default_rng(seed)
    weights = {"gaussian": rng.standard_normal((k, n)).astype(np.float32),
               "student-t3": rng.standard_t(3, size=(k, n)).astype(np.float32)}
    jobs = [(d, s, c) for d in weights for s in specs for c in clips]
    rows = []
    for dist, spec, clip in progress_bar(jobs, desc="bench error", unit="job", enabled=progress, leave=False):
        full = spec if clip == "minmax" else f"{spec}-{clip}"
        qt = quant.quantize(weights[dist], full)
        rows.append({"spec": str(quant.parse_spec(full)), "weights": dist, "k": k, "n": n,
                     "bits_per_weight": round(qt.bits_per_value, 4),
                     "rel_error": round(relative_error(weights[dist], quant.dequantize(qt)), 6)})
    return {"benchmark": "quant_error", **run_context(seed=seed), "rows": rows}


def format_table(result: dict) -> str:
    rows = [(r["spec"], r["weights"], f"{r['bits_per_weight']:.3f}", f"{r['rel_error']:.4f}") for r in result["rows"]]
    return console.format_table(rows, ("spec", "weights", "bits/w", "rel err"), align="<<>>")
