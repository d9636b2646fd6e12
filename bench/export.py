"""GGUF export checked by llama.cpp itself: `cascade bench export MODEL --data FILE --calib FILE --llamacpp auto`.

For each PTQ method (``rtn``, ``default`` = the best measured method with ``--calib``, or any
named one) the model is quantized under the rules ``quant`` (``int4-g32`` by default; e.g.
``embed=int8-g32,*=int4-g32`` for llama.cpp's Q4_0 recipe: a Q8_0 embedding) and exported with
:func:`cascade.models.export_gguf.export_gguf`; then, on the same token ids,

* cascade scores the quantized model (``ppl_cascade``) and the exported file loaded back by our
  GGUF loader (``ppl_roundtrip``: the round trip must not change it);
* llama.cpp (``bench/llamacpp_eval.py`` under the llama-cpp-python venv) loads the file and scores
  the same ids (``ppl_llamacpp``; ``ppl_gap_pct`` = llama.cpp against cascade), and both greedily
  continue ``prompts`` prompts for ``tokens`` tokens (``same_continuations``: how many agree on
  all of them; ``first_difference``: the mean index of the first disagreement, ``tokens`` where none;
  ours decode with the quantized model's own arithmetic: float activations, or llama.cpp's int8
  activations for ``-a8`` specs);
* llama.cpp tokenizes sample texts, compared with our tokenizer (``tokenizer_equal``).

``llamacpp_q4_0``: also the float weights exported as F32 and quantized by llama.cpp's own
``llama_model_quantize`` to Q4_0 (its default recipe), scored by llama.cpp: the peer our int4-g32
exports are measured against.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np

from cascade import console
from cascade.bench.context import run_context
from cascade.console import progress_bar
from cascade.models import Model, load_model, perplexity, split_documents, tokenize_documents
from cascade.bench.perplexity import first_tokens
from cascade.models.export_gguf import CHECK_TEXTS, export_gguf

DEFAULT_METHODS = ("rtn", "default")
PROMPT_LEN = 16  # tokens of each validation document that start a continuation


def _llamacpp(python: str, gguf: str, job: dict, threads: int = 2) -> dict:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llamacpp_eval.py")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump(job, f)
        job_path = f.name
    try:
        proc = subprocess.run([python, script, gguf, "--job", job_path, "--threads", str(threads)],
                              capture_output=True, text=True, timeout=3600)
    except OSError as e:
        raise ValueError(f"cannot run llama.cpp's Python {python!r}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise ValueError(f"llama.cpp's run of {gguf} took over an hour; stopped") from None
    finally:
        os.remove(job_path)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"llama.cpp run failed (exit {proc.returncode}): {last}")
    return json.loads(proc.stdout)


def _greedy(model: Model, prompts, tokens: int) -> list[list[int]]:
    from cascade.models.generation import generate

    return generate(model.params, model.config, prompts, max_new_tokens=tokens, eos_ids=()).tokens


def _agreement(ours, theirs, tokens: int) -> tuple[int, float]:
    same, firsts = 0, []
    for a, b in zip(ours, theirs):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b), tokens))
        same += first >= tokens
        firsts.append(first)
    return same, statistics.mean(firsts) if firsts else 0.0


def run(model: "str | Model", data: str, *, llamacpp: str, methods=DEFAULT_METHODS, quant: str = "int4-g32",
        calib: str | None = None, calib_samples: int = 128, calib_len: int = 512, limit: int | None = 200,
        ctx: int = 512, max_tokens: int | None = None, prompts: int = 8, tokens: int = 32,
        llamacpp_q4_0: bool = False, requantize: str | None = None, llamacpp_kv: str = "f16", keep: str | None = None, label: str | None = None, progress=None) -> dict:
    """See the module docstring; ``keep``: a directory to keep the exported files in (default: a
    temporary one, removed); ``requantize``: as :func:`export_gguf`'s (``F32`` writes a tensor whose rows
    are not whole blocks of 32, such as stories260K's 172-wide ``ffn_down``, exactly); ``llamacpp_kv``: llama.cpp's
    KV cache type, ``f16`` (its default) or ``f32`` (as cascade's cache)."""
    from cascade.models.calibration import calibration_tokens
    from cascade.models.loaders.gguf import load_gguf
    from cascade.models.quantize import quantize_with_method

    base = model if isinstance(model, Model) else load_model(model)
    name = label or (model if isinstance(model, str) else model.source)
    if base.tokenizer is None:
        raise ValueError(f"{name}: no tokenizer")
    ctx = min(ctx, base.config.max_seq_len)
    with open(data, encoding="utf-8") as f:
        docs = split_documents(f.read())[:limit]
    ids = [d[:ctx] for d in tokenize_documents(base.tokenizer, docs)]
    if max_tokens is not None:
        ids = first_tokens(ids, max_tokens)
    starts = [d[:PROMPT_LEN] for d in ids if len(d) >= PROMPT_LEN][:prompts]
    cal = None
    if any(m != "rtn" and m != "hqq" for m in methods):
        if calib is None:
            raise ValueError(f"methods {', '.join(m for m in methods if m not in ('rtn', 'hqq'))} need calib=")
        cal = calibration_tokens(base.tokenizer, calib, samples=calib_samples, length=min(calib_len, ctx),
                                 max_len=base.config.max_seq_len)
    ours_tok = [base.tokenizer.encode(t, add_bos=False) for t in CHECK_TEXTS]
    job = {"docs": ids, "prompts": starts, "tokens": tokens, "texts": list(CHECK_TEXTS), "ctx": ctx, "kv": llamacpp_kv}
    rows = []
    folder = keep or tempfile.mkdtemp(prefix="cascade-export-")
    os.makedirs(folder, exist_ok=True)
    try:
        for method in progress_bar(list(methods), desc="bench export", unit="method", enabled=progress):
            t0 = time.perf_counter()
            quantized, _ = quantize_with_method(base, quant, method=None if method == "default" else method,
                                                calib=cal, progress=False)
            seconds = time.perf_counter() - t0
            path = os.path.join(folder, f"{os.path.basename(str(name)).removesuffix('.gguf')}-{method}.gguf")
            report = export_gguf(quantized, path, requantize=requantize, overwrite=True, progress=False)
            back = load_gguf(path)
            ppl = perplexity(quantized.params, quantized.config, ids, ctx=ctx, truncate=True, progress=False).ppl
            ppl_rt = perplexity(back.params, back.config, ids, ctx=ctx, truncate=True, progress=False).ppl
            ours = _greedy(quantized, starts, tokens)  # with its own arithmetic (-a8: llama.cpp's int8 activations)
            theirs = _llamacpp(llamacpp, path, job)
            same, first = _agreement(ours, theirs["continuations"], tokens)
            ppl_l = float(np.exp(theirs["nll"] / theirs["count"]))
            rows.append({"method": quantized.ptq["method"] if method == "default" else method, "asked": method,
                         "spec": quant, "file_type": report.file_type, "file_bytes": report.bytes,
                         "ppl_cascade": ppl, "ppl_roundtrip": ppl_rt, "ppl_llamacpp": ppl_l,
                         "ppl_gap_pct": 100.0 * (ppl_l / ppl - 1.0), "same_continuations": same,
                         "prompts": len(starts), "first_difference": first,
                         "tokenizer_equal": theirs["tokenized"] == ours_tok, "quantize_s": seconds,
                         "requantized": [f"{t.name} {t.type} (error {t.rel_rms_error:.2g})" for t in report.requantized],
                         "llamacpp": theirs["version"]})
        if llamacpp_q4_0:
            src = os.path.join(folder, "float-f32.gguf")
            export_gguf(_float(base), src, overwrite=True, progress=False)
            theirs = _llamacpp(llamacpp, src, {**job, "quantize": {"out": os.path.join(folder, "llamacpp-q4_0.gguf"),
                                                                   "type": "Q4_0"}})
            rows.append({"method": "llama.cpp quantize", "asked": "llamacpp-q4_0", "spec": "Q4_0 (llama.cpp's recipe)",
                         "file_type": "MOSTLY_Q4_0", "file_bytes": os.path.getsize(theirs["quantized"]),
                         "ppl_cascade": None, "ppl_roundtrip": None,
                         "ppl_llamacpp": float(np.exp(theirs["nll"] / theirs["count"])), "ppl_gap_pct": None,
                         "same_continuations": None, "prompts": len(starts), "first_difference": None,
                         "tokenizer_equal": theirs["tokenized"] == ours_tok, "quantize_s": None,
                         "llamacpp": theirs["version"]})
    finally:
        if keep is None:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    return {"benchmark": "export", **run_context(), "model": str(name), "data": data, "documents": len(ids),
            "tokens": int(sum(len(d) - 1 for d in ids)), "ctx": ctx, "continuation_tokens": tokens,
            "calibration": None if cal is None else cal.recipe, "llamacpp_kv": llamacpp_kv, "rows": rows}


def _float(model: Model) -> Model:
    """The model with every quantized weight dequantized to float32 (what llama.cpp's quantizer starts from)."""
    import dataclasses

    import jax

    from cascade.quant.qtensor import QuantizedTensor, dequantize

    params = jax.tree.map(lambda a: dequantize(a, "float32") if isinstance(a, QuantizedTensor)
                          else a.astype("float32") if a.dtype.kind == "f" or "bfloat16" in str(a.dtype) else a,
                          model.params, is_leaf=lambda a: isinstance(a, QuantizedTensor))
    return dataclasses.replace(model, params=params, quant=None, ptq=None)


def format_table(result: dict) -> str:
    head = (f"GGUF export checked by llama.cpp: {result['model']}, {result['documents']} documents of {result['data']} "
            f"({result['tokens']:,} tokens, ctx {result['ctx']}), greedy continuations of {result['continuation_tokens']} tokens")
    cols = [("method", lambda r: r["method"]), ("spec", lambda r: r["spec"]), ("file", lambda r: r["file_type"]),
            ("ppl cascade", lambda r: "" if r["ppl_cascade"] is None else f"{r['ppl_cascade']:.4f}"),
            ("ppl round trip", lambda r: "" if r["ppl_roundtrip"] is None else f"{r['ppl_roundtrip']:.4f}"),
            ("ppl llama.cpp", lambda r: f"{r['ppl_llamacpp']:.4f}"),
            ("gap", lambda r: "" if r["ppl_gap_pct"] is None else f"{r['ppl_gap_pct']:+.3f}%"),
            ("same continuations", lambda r: "" if r["same_continuations"] is None else f"{r['same_continuations']}/{r['prompts']}"),
            ("tokenizer", lambda r: "same" if r["tokenizer_equal"] else "DIFFERS")]
    return head + "\n" + console.format_table([[f(r) for _, f in cols] for r in result["rows"]], [c for c, _ in cols])
