"""Everything on one machine, in one report: ``python scripts/evaluate.py --out DIR [--quick]``.

Runs the benchmarks of this package on whatever backend JAX sees (CPU, GPU or TPU) and writes

* ``DIR/report.json``: ``{"benchmark": "evaluate", device..., "quick", "settings", "sections": {...}}``
  with one section per benchmark, each the JSON its ``cascade bench`` command prints:
  ``matmul`` (dequant-matmul against the float dot, per spec, backend and batch), ``decode``
  (tokens/s per precision on the small default model), ``ptq`` (perplexity, KLD and bytes per
  method and spec against the float model), ``kv`` (perplexity per KV-cache precision) and
  ``cascade`` (the router's modes: speed, large-model calls, quality, acceptance per draft
  position);
* ``DIR/report.md``: the same as tables, one section each, with the settings they ran under;
* PNGs: ``ppl-vs-bits-*.png`` (one curve per method), ``tokens-per-s.png`` (decode tokens/s per
  spec and matmul speed-up per spec and backend), ``acceptance-per-position.png`` and
  ``cost-quality.png`` (the router's large-model calls per token against quality).

``--quick`` shrinks every section (one small matmul shape, a few tokens, a few documents, two
methods) so the whole run is a smoke test of the pipeline on any machine: a few minutes on two
CPU cores, which is how CI runs it.  Without it the sections run at the settings of the README's
benchmark tables (much longer).  The models are the embedded default pair, so nothing is
downloaded; ``--data`` is the text to score and calibrate on.  Its default with ``--quick`` is the
validation sample the package ships beside the default pair
(:func:`cascade.models.defaults.validation_sample`), so the smoke test runs on any installation,
from any directory; the full suite needs more text: the TinyStories validation file of
``../shared/data`` in a source checkout, else ``--data FILE``.  On an installed package (where
``scripts/`` is not installed) run it as ``python -m cascade.bench.evaluate``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from cascade.bench.context import describe, run_context
from cascade.console import plural
from cascade.models import files

# the full suite's default text: the shared data beside a source checkout (absent from an installed package)
DEFAULT_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "text",
                                             "tinystories_val.txt"))
SECTIONS = ("matmul", "decode", "ptq", "kv", "cascade")

SETTINGS = {
    True: {  # --quick
        "matmul": {"shapes": ((1024, 1024),), "batches": (1, 16), "specs": ("int8", "int4-g128", "w8a8"),
                   "repeats": 5, "warmup": 2, "copy_bytes": 32 << 20},
        "decode": {"specs": ("fp32", "int8", "int4-g32"), "tokens": 16, "repeats": 1, "warmup": 1},
        "ptq": {"specs": ("int8", "int4-g32", "int3-g32"), "methods": ("rtn", "gptq"), "samples": 32, "length": 64,
                "limit": 8, "ctx": 128, "max_tokens": 1024},
        "kv": {"kvs": ("fp32", "int8", "int4"), "limit": 8, "ctx": 128, "max_tokens": 1024},
        "cascade": {"tokens": 16, "repeats": 1, "alphas": (0.1,), "thresholds": (-0.8,), "batches": (1, 4),
                    "n_prompts": 4},
    },
    False: {
        "matmul": {"shapes": ((4096, 4096), (4096, 11008)), "batches": (1, 16, 64),
                   "specs": ("int8", "int4-g128", "int4-g32", "w8a8"), "repeats": 20, "warmup": 3},
        "decode": {"specs": ("fp32", "int8", "int4-g32"), "tokens": 64, "repeats": 3, "warmup": 1},
        "ptq": {"specs": ("int8", "int4-g128", "int4-g32", "int3-g32"), "methods": ("rtn", "gptq", "awq", "hqq"),
                "samples": 128, "length": 512, "limit": 200, "ctx": 512, "max_tokens": None},
        "kv": {"kvs": ("fp32", "fp16", "int8", "int4"), "limit": 200, "ctx": None, "max_tokens": None},
        "cascade": {"tokens": 64, "repeats": 3},
    },
}


def run(out_dir: str, *, data: str, quick: bool = False, small: str = "default-small", large: str = "default-large",
        sections=SECTIONS, progress=None, log=None) -> dict:
    """Run ``sections`` and write the report into ``out_dir``; returns the report dict.  ``log(msg)``
    is told as each section starts and ends."""
    from cascade.bench import cascade as bench_cascade, decode, kv_cache, matmul, ptq
    from cascade.models import load_model

    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    if not os.path.isfile(data):
        raise ValueError(f"{data}: no such text file to score (pass --data FILE)")
    log = log or (lambda msg: None)
    settings = SETTINGS[quick]
    os.makedirs(out_dir, exist_ok=True)
    report = {"benchmark": "evaluate", **run_context(), "quick": quick, "small": small, "large": large,
              "data": os.path.abspath(data), "settings": {k: settings[k] for k in sections}, "sections": {},
              "seconds": {}, "plots": []}
    runners = {
        "matmul": lambda s: matmul.run(progress=progress, **s),
        "decode": lambda s: decode.run(load_model(small), label=small, progress=progress, **s),
        "ptq": lambda s: ptq.run(small, data, data, progress=progress, **s),
        "kv": lambda s: kv_cache.run(small, data, progress=progress, **s),
        "cascade": lambda s: bench_cascade.run(small, large, progress=progress, **s),
    }
    for name in sections:
        log(f"{name} ...")
        t0 = time.perf_counter()
        report["sections"][name] = runners[name](settings[name])
        report["seconds"][name] = round(time.perf_counter() - t0, 1)
        log(f"{name} done in {report['seconds'][name]:.0f} s")
    report["plots"] = write_plots(report, out_dir)
    files.write_json(os.path.join(out_dir, "report.json"), report, allow_nan=False)
    files.write_text(os.path.join(out_dir, "report.md"), markdown(report))
    return report


def markdown(report: dict) -> str:
    from cascade.bench import cascade as bench_cascade, decode, kv_cache, matmul, ptq

    tables = {"matmul": matmul.format_table, "decode": decode.format_table, "ptq": ptq.table,
              "kv": kv_cache.format_table, "cascade": bench_cascade.table}
    titles = {"matmul": "Dequant-matmul against the float dot", "decode": f"Decode speed ({report['small']})",
              "ptq": f"Perplexity per method and spec ({report['small']})",
              "kv": f"KV-cache precision ({report['small']})",
              "cascade": f"The cascade ({report['small']} int4 -> {report['large']} int8)"}
    lines = [f"# cascade evaluation{' (--quick)' if report['quick'] else ''}", "",
             f"Ran {describe(report)}; text: `{report['data']}`.", ""]
    if report["quick"]:
        lines += ["`--quick`: every section shrunk to a smoke test; its numbers show the pipeline works on this "
                  "backend, not how fast or accurate it is at full size.", ""]
    for name, result in report["sections"].items():
        lines += [f"## {titles[name]}", "", f"{report['seconds'][name]:.0f} s; settings: "
                  f"`{json.dumps(report['settings'][name])}`", "", "```", tables[name](result), "```", ""]
    if report["plots"]:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in report["plots"]] + [""]
    return "\n".join(lines)


def write_plots(report: dict, out_dir: str) -> list[str]:
    """The PNGs of the sections that ran (none without matplotlib); returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from cascade.bench import cascade as bench_cascade, plots

    sec = report["sections"]
    written = []
    if "ptq" in sec:
        written += plots.plot_all([sec["ptq"]], out_dir)
    if "decode" in sec or "matmul" in sec:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        if "decode" in sec:
            rows = sec["decode"]["rows"]
            axes[0].bar([f"{r['spec']}\n{r['attention']}" for r in rows], [r["tokens_per_s"] for r in rows])
            axes[0].set_ylabel("tokens/s (batch 1)")
            axes[0].set_title(f"decode, {sec['decode']['model']}")
        if "matmul" in sec:
            rows = [r for r in sec["matmul"]["rows"] if r["spec"] != "fp32"]
            for backend in sorted({r["backend"] for r in rows}):
                for spec in sorted({r["spec"] for r in rows if r["backend"] == backend}):
                    rs = [r for r in rows if r["backend"] == backend and r["spec"] == spec]
                    axes[1].plot([f"{r['batch']}x{r['k']}x{r['n']}" for r in rs], [r["speedup_vs_f32"] for r in rs],
                                 marker="o", label=f"{spec} ({backend})")
            axes[1].axhline(1.0, color="black", linestyle="--", linewidth=1)
            axes[1].set_ylabel("speed-up over the float32 dot")
            axes[1].set_title("dequant-matmul")
            axes[1].legend(fontsize=7)
            axes[1].tick_params(axis="x", labelrotation=30, labelsize=7)
        fig.suptitle(f"tokens/s per spec and backend, {report['device']}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, "tokens-per-s.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if "cascade" in sec:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        styles = iter([("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-"), ("x", "--")] * 4)
        for r in sec["cascade"]["rows"]:
            pts = [(i + 1, a) for i, a in enumerate(r.get("acceptance_at") or []) if a is not None]
            if pts:
                label = r["mode"] + (f" a={r['alpha']}" if "alpha" in r else "") + f" (draft {r['draft_len']})"
                marker, line = next(styles)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=line, label=label)
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1.05)
        ax.set_title("acceptance per draft position")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "acceptance-per-position.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        path = os.path.join(out_dir, "cost-quality.png")
        bench_cascade.plot(sec["cascade"], path)
        plt.close("all")
        written.append(path)
    return written


def default_data(quick: bool) -> str:
    """The text ``--data`` defaults to (module docs); ValueError when the full suite has none."""
    if quick:
        from cascade.models.defaults import validation_sample

        return validation_sample()
    if not os.path.isfile(DEFAULT_DATA):
        raise ValueError("the full suite needs a text to calibrate on and score: pass --data FILE (the package "
                         "ships only the small sample --quick uses)")
    return DEFAULT_DATA


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/evaluate.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="write report.json, report.md and the PNGs here")
    ap.add_argument("--quick", action="store_true", help="every section shrunk to a smoke test (minutes on a CPU)")
    ap.add_argument("--data", help="UTF-8 text to calibrate on and score [default: with --quick the validation sample "
                                   "shipped with the default pair, else shared/data/text/tinystories_val.txt beside a "
                                   "source checkout]")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--small", default="default-small", help="the draft model (and the one the other sections use)")
    ap.add_argument("--large", default="default-large", help="the verifier model of the cascade section")
    args = ap.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    t0 = time.perf_counter()
    try:
        data = args.data if args.data is not None else default_data(args.quick)
        report = run(args.out, data=data, quick=args.quick, small=args.small, large=args.large, sections=sections,
                     progress=None, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {os.path.join(args.out, 'report.md')} ({plural(len(report['plots']), 'plot')}, "
          f"{time.perf_counter() - t0:.0f} s on {report['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
