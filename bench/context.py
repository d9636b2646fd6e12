"""The machine a benchmark ran on, recorded in every benchmark's JSON (README: "Benchmarks").

Every ``bench`` result carries ``device`` (JAX platform and device kind), ``cpu`` (the processor
model), ``cores``, ``jax`` (version) and, for timed benchmarks, ``repeats`` and ``warmup``, so a
committed result says where its numbers come from.
"""

from __future__ import annotations

import os
import platform

import jax


def cpu_name() -> str:
    """The processor model (from /proc/cpuinfo on Linux), for benchmark records."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_context(**timing) -> dict:
    """``{"device", "cpu", "cores", "jax"}`` plus ``timing`` (e.g. ``repeats=20, warmup=3``)."""
    dev = jax.devices()[0]
    return {"device": f"{dev.platform}:{dev.device_kind}", "cpu": cpu_name(), "cores": os.cpu_count(),
            "jax": jax.__version__, **timing}


def describe(result: dict) -> str:
    """One header line for a table: where it ran."""
    return f"on {result['device']} ({result['cpu']}, {result['cores']} cores; jax {result['jax']})"
