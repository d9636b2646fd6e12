"""Accurate PTQ side by side: RTN, GPTQ, AWQ, HQQ (and qwix's peers) on the same weights, specs,
calibration and evaluation text.

``cascade bench ptq MODEL --calib FILE --data FILE`` (``--json`` for rows).  For each spec and
method the model is quantized (default rules: embeddings, norms and LM head in bf16) and scored
against the float model it came from, over the same windows: perplexity, Δppl, mean KL divergence
of the next-token distributions (and its 99th percentile), top-1 agreement, weight bytes and the
seconds quantization took.  A model whose weights were stored quantized (SmolLM2's Q4_1 GGUF) is
dequantized to float32 first and that float model is the reference.

W8A8 is the same protocol: ``--spec w8a8,w8a8-static --method rtn,smoothquant`` puts plain W8A8
(RTN) beside SmoothQuant (``w8a8-static`` takes the calibration file for its activation scales,
with either method).  ``--alpha 0.5,0.75`` scores SmoothQuant at each migration strength (rows carry
``alpha``).  The Hadamard-rotated specs (``--spec w8a8-had,w8a8-static-had``) take the same two
methods (the others refuse them).

``gap_closed`` per row: ``(ppl_rtn - ppl) / (ppl_rtn - ppl_float)`` for the same spec and data.
``--data`` may be given several times (SmolLM2 is scored on TinyStories and WikiText-2): each
quantized model is then scored on every file.  With ``--out`` the file is rewritten (atomically)
after every row, marked ``"partial": true`` until the run ends, so an interrupted run keeps its rows.
"""

from __future__ import annotations

import time

import jax

from cascade.bench.context import run_context
from cascade.console import format_table, progress_bar
from cascade.models import Model, load_model, split_documents, tokenize_documents, weight_bytes
from cascade.models.quantize import quantize_with_method
from cascade.models.calibration import calibration_tokens
from cascade.models.evaluation import fidelity
from cascade.quant.qtensor import QuantizedTensor, dequantize
from cascade.quant.spec import SPEC_VERSION, parse_spec

DEFAULT_SPECS = ("int4", "int4-g128", "int4-g32", "int3-g32", "int3-g64-asym", "int2-g16-asym")
DEFAULT_METHODS = ("rtn", "gptq", "awq", "hqq")
DEFAULT_METHOD = "default"  # a method name here: what quantize picks with calibration text (choose_method)
QWIX_METHODS = ("qwix-rtn", "qwix-gptq", "qwix-awq")


def float_model(model: Model) -> Model:
    """``model`` with every quantized tensor dequantized to float32 (the reference)."""
    import dataclasses

    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731
    params = jax.tree.map(lambda a: dequantize(a, "float32") if is_q(a) else a, model.params, is_leaf=is_q)
    return dataclasses.replace(model, params=params, quant=None)


def run(model: "str | Model", calib: str, data: "str | list[str]", *, specs=DEFAULT_SPECS, methods=DEFAULT_METHODS,
        samples: int = 128, length: int = 512, seed: int = 0, limit: int | None = 200, ctx: int = 512,
        max_tokens: int | None = None, tokenizer: str | None = None, act_order: bool = False,
        alphas: tuple[float, ...] | None = None, progress=None, on_row=None) -> dict:
    """The result (module docs).  ``data``: one text file or several; each quantized model is scored on
    every one (rows carry ``data``; the top-level ``data``, ``float_ppl`` and ``documents`` are the
    first file's, ``evaluations`` lists them all).  ``on_row(result)`` is called with the result so far
    (``"partial": true``) after every row, so a long run can be saved as it goes.  ``act_order``:
    GPTQ's activation order for ``gptq`` and ``awq-gptq``; ``alphas``: SmoothQuant's migration
    strengths, one ``smoothquant`` row set each (default: its default alone)."""
    base = float_model(model if isinstance(model, Model) else load_model(model, tokenizer=tokenizer))
    length = min(length, base.config.max_seq_len)
    ctx = min(ctx, base.config.max_seq_len)
    cal = calibration_tokens(base.tokenizer, calib, samples=samples, length=length, seed=seed,
                             max_len=base.config.max_seq_len)
    files = [data] if isinstance(data, str) else list(data)
    docs = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            docs[path] = tokenize_documents(base.tokenizer, split_documents(f.read())[:limit])
    rows = []
    float_ppl: dict[str, float] = {}

    def result(partial: bool) -> dict:
        for row in rows:
            rtn = next((r["ppl"] for r in rows if r["spec"] == row["spec"] and r["data"] == row["data"]
                        and r["method"] == "rtn"), None)
            ref = float_ppl[row["data"]]
            row["gap_closed"] = None if rtn is None or rtn <= ref else (rtn - row["ppl"]) / (rtn - ref)
        return {"benchmark": "ptq", "spec_version": SPEC_VERSION, **run_context(), "model": base.source, "float_ppl": float_ppl.get(files[0]),
                "float_weight_bytes": weight_bytes(base.params), "calibration": cal.recipe, "data": files[0],
                "documents": len(docs[files[0]]), "ctx": ctx, "max_tokens": max_tokens, "act_order": act_order,
                "evaluations": [{"data": p, "float_ppl": float_ppl.get(p), "documents": len(docs[p])} for p in files],
                **({"partial": True} if partial else {}), "rows": rows}

    runs = [(spec, method, alpha) for spec in specs for method in methods
            for alpha in ((alphas or (None,)) if method == "smoothquant" else (None,))]
    for spec, method, alpha in progress_bar(runs, desc="bench ptq", unit="model", enabled=progress):
        t0 = time.perf_counter()
        if method.startswith("qwix-"):
            from cascade.bench.qwix_peer import qwix_quantize_model

            quantized = qwix_quantize_model(base, spec, method, cal)
        else:  # "default": what `cascade quantize --calib` picks (models.quantize.choose_method)
            quantized, _ = quantize_with_method(base, spec, method=None if method == "default" else method, calib=cal,
                                                act_order=act_order, alpha=alpha, progress=progress)
        seconds = time.perf_counter() - t0
        chosen = {"chosen": quantized.ptq["method"], "quant": quantized.quant} if method == "default" else {}
        for path in files:
            fid = fidelity(quantized.params, quantized.config, base.params, base.config, docs[path], ctx=ctx,
                           max_tokens=max_tokens, progress=progress)
            float_ppl[path] = fid.ref_ppl
            rows.append({"spec": str(parse_spec(spec)), "method": method, **chosen,
                         **({"alpha": alpha} if alpha is not None else {}), "data": path,
                         "ppl": fid.ppl, "delta_ppl": fid.delta_ppl, "kld_mean": fid.kld_mean, "kld_p99": fid.kld_p99,
                         "top1_agreement": fid.top1_agreement, "weight_bytes": weight_bytes(quantized.params),
                         "seconds": seconds, "tokens": fid.tokens})
            if on_row is not None:
                on_row(result(partial=True))
    return result(partial=False)


def table(result: dict) -> str:
    evaluations = result.get("evaluations") or [{"data": result["data"], "float_ppl": result["float_ppl"]}]
    columns = ("spec", "method", "ppl", "Δppl", "KLD", "KLD p99", "top-1", "gap closed", "bytes", "seconds")
    lines = []
    for ev in evaluations:
        rows = [(r["spec"], r["method"] + (f" α={r['alpha']}" if "alpha" in r else ""), f"{r['ppl']:.3f}",
                 f"{r['delta_ppl']:+.3f}", f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.3f}", f"{r['top1_agreement']:.1%}",
                 "" if r["gap_closed"] is None else f"{r['gap_closed']:.0%}", f"{r['weight_bytes']:,}", f"{r['seconds']:.1f}")
                for r in result["rows"] if r.get("data", ev["data"]) == ev["data"]]
        lines += [f"{result['model']}: float perplexity {ev['float_ppl']:.4f} on {ev['data']} "
                  f"(ctx {result['ctx']}); calibration {result['calibration']['samples']} x "
                  f"{result['calibration']['length']} tokens",
                  format_table(rows, columns, align="<<>>>>>>>>")]
    return "\n".join(lines)
