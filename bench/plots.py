"""Perplexity against bits a weight, one curve per method, from committed benchmark results.

``cascade bench plot RESULT.json ... --out-dir DIR`` reads results of ``bench ptq``, ``bench
workflow`` and ``bench qat`` and draws, for each model and evaluation (the same scored windows),
one PNG ``ppl-vs-bits-NAME.png``:

* one curve per PTQ method (RTN, GPTQ, AWQ, HQQ, AutoRound, SmoothQuant ...): a line through its
  Pareto front (no spec of that method is both smaller and better), every spec as a faint point
  (a spec can cost more bytes and lose more than another: int2-g16-asym's scales and zero points
  make it larger than int3-g32);
* ``auto (METHOD)``: the automatic mixed-precision rows of ``bench workflow``;
* ``qat``: the QAT rows of ``bench qat`` (with the PTQ point they started from);
* the float model as a dashed line.

Bits a weight are the whole model's stored bytes (codes, scales, zero points, the 16-bit embedding
and norms the default rules keep) times 8 over its parameter count, so every point is the size a
user would deploy.  The parameter count is ``float_weight_bytes / 4`` of the result (its float32
reference); a workflow result of an older version without it borrows it from a ``bench ptq`` result
of the same model.  Points are grouped by model (file name), scored file and float perplexity, so
results scored on different windows never share a plot.

Every result is checked first (:func:`check_result`): a file that is not a JSON object of one of these
benchmarks, or lacks a key the plot reads, or holds a NaN or a negative perplexity, is a one-line
``ValueError`` naming the key.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

KINDS = ("ptq", "workflow", "qat")  # the benchmarks whose results are plotted
# the text fields each row of a kind must have (the plot selects and labels rows by them)
_ROW_TEXT = {"ptq": ("method", "spec"), "workflow": ("config", "method", "target"), "qat": ("stage",)}


def _model_name(source: str) -> str:
    base = os.path.basename(str(source).rstrip("/"))
    return re.sub(r"\.(bin|gguf|safetensors)$", "", base) or str(source)


def _key(name: str, data: str, float_ppl: float) -> tuple:
    return name, os.path.basename(data), round(float(float_ppl), 4)


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _shown(value) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else f"a JSON {_json_type(value)}"
    return text if len(text) <= 40 else text[:37] + "..."


def _field(obj: dict, key: str, owner: str):
    """``obj[key]`` and its name in messages (``'model'``, ``rows[2].ppl``); a missing key is a ValueError."""
    if key not in obj:
        raise ValueError(f"{owner + ' has ' if owner else ''}no {key!r} key")
    return obj[key], f"{owner}.{key}" if owner else repr(key)


def _text(obj: dict, key: str, owner: str = "") -> None:
    value, where = _field(obj, key, owner)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} is {_shown(value)}; expected a non-empty string")


def _positive(obj: dict, key: str, owner: str = "") -> None:
    value, where = _field(obj, key, owner)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} is {_shown(value)}; expected a finite positive number")


def check_result(result) -> None:
    """Raise a one-line ``ValueError`` unless ``result`` (a loaded JSON value) is a ``bench ptq``,
    ``workflow`` or ``qat`` result with every key :func:`points` reads, of the right type: texts
    non-empty, perplexities and byte counts finite and positive."""
    if not isinstance(result, dict):
        raise ValueError(f"not a bench ptq, workflow or qat result: a JSON {_json_type(result)}, not an object")
    kind = result.get("benchmark")
    if kind not in KINDS:
        raise ValueError(f"not a bench ptq, workflow or qat result: benchmark {_shown(kind)}")
    for key in ("model", "data") + (("spec",) if kind == "qat" else ()):
        _text(result, key)
    _positive(result, "float_ppl")
    if result.get("float_weight_bytes") is not None:
        _positive(result, "float_weight_bytes")
    rows, _ = _field(result, "rows", "")
    if not isinstance(rows, list):
        raise ValueError(f"'rows' is {_shown(rows)}; expected a list of rows")
    for i, row in enumerate(rows):
        owner = f"rows[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{owner} is {_shown(row)}; expected a JSON object")
        for key in _ROW_TEXT[kind] + (("data",) if kind == "ptq" and "data" in row else ()):
            _text(row, key, owner)
        _positive(row, "ppl", owner)
        _positive(row, "weight_bytes", owner)


def points(results: list[dict]) -> dict[tuple, dict]:
    """``{(model, data, float ppl): {"float_ppl": f, "curves": {label: [(bits, ppl, spec), ...]}}}``.
    Raises ``ValueError`` for a malformed result (:func:`check_result`, prefixed with its index
    when there are several) or a model with no parameter count."""
    for i, r in enumerate(results):
        try:
            check_result(r)
        except ValueError as e:
            raise ValueError(f"result {i + 1}: {e}" if len(results) > 1 else str(e)) from None
    params = {}
    for r in results:
        if r.get("float_weight_bytes"):
            params.setdefault(_model_name(r["model"]), r["float_weight_bytes"] / 4)
    out: dict[tuple, dict] = {}

    def add(r, label, data, float_ppl, bits_bytes, ppl, spec):
        n = params.get(_model_name(r["model"]))
        if n is None:
            raise ValueError(f"{r['model']}: no parameter count (float_weight_bytes) in any result given for it; "
                             "add its bench ptq result")
        plot = out.setdefault(_key(_model_name(r["model"]), data, float_ppl), {"float_ppl": float_ppl, "curves": {}})
        plot["curves"].setdefault(label, []).append((8.0 * bits_bytes / n, ppl, spec))

    for r in results:
        kind = r.get("benchmark")
        if kind == "ptq":
            for row in r["rows"]:
                if row.get("data", r["data"]) == r["data"]:
                    add(r, row["method"], r["data"], r["float_ppl"], row["weight_bytes"], row["ppl"], row["spec"])
        elif kind == "workflow":
            for row in r["rows"]:
                if row["config"] == "auto":
                    add(r, f"auto ({row['method']})", r["data"], r["float_ppl"], row["weight_bytes"], row["ppl"],
                        f"auto@{row['target']}")
        else:  # qat (check_result allows no other kind)
            for row in r["rows"]:
                if row["stage"] == "qat":
                    add(r, "qat", r["data"], r["float_ppl"], row["weight_bytes"], row["ppl"], r["spec"])
    for plot in out.values():
        for label in plot["curves"]:
            plot["curves"][label].sort()
    return out


def pareto(pts: list[tuple]) -> list[tuple]:
    """The points no other point beats on both size and perplexity (sorted by bits): a method's curve."""
    front, best = [], float("inf")
    for p in sorted(pts):
        if p[1] < best:
            front.append(p)
            best = p[1]
    return front


def plot_all(results: list[dict], out_dir: str) -> list[str]:
    """One PNG per plot of :func:`points` in ``out_dir``; returns their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    plots = points(results)
    names = [k[0] for k in plots]
    for (name, data, _), plot in sorted(plots.items()):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        ax.axhline(plot["float_ppl"], color="black", linestyle="--", linewidth=1, label=f"float ({plot['float_ppl']:.3f})")
        for label, pts in sorted(plot["curves"].items()):
            b, p = np.array([x[0] for x in pts]), np.array([x[1] for x in pts])
            marker = "*" if label == "qat" else "s" if label.startswith("auto (") else "o"
            front = pareto(pts)
            (line,) = ax.plot([x[0] for x in front], [x[1] for x in front], marker=marker, label=label,
                              linestyle=":" if label.startswith("auto (") else "-", markersize=10 if marker == "*" else 6)
            ax.scatter(b, p, marker=marker, color=line.get_color(), alpha=0.35, s=18)
        ax.set_yscale("log")
        ax.set_xlabel("bits a weight (whole model as stored)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{name}: perplexity against size on {data}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        suffix = "" if names.count(name) == 1 else "-" + re.sub(r"[^A-Za-z0-9]+", "_", os.path.splitext(data)[0])
        path, n = os.path.join(out_dir, f"ppl-vs-bits-{name}{suffix}.png"), 1
        while path in written:  # the same model and file scored on other windows
            n += 1
            path = os.path.join(out_dir, f"ppl-vs-bits-{name}{suffix}-{n}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
