"""Decode speed at batch 1: one model at several precisions, and llama.cpp on the same GGUF file.

Run ``cascade bench decode MODEL`` (``--json`` for rows).  Each precision row generates
``tokens`` tokens greedily from the same prompt, end-of-text ignored, and reports the median
``tokens_per_s`` over ``repeats`` runs after ``warmup`` runs (the first compiles); tokens/s counts
the decode steps after the first, as ``cascade generate`` does.  Specs: ``fp32`` (every weight
float32, dequantized if the file is quantized), ``source`` (the model as loaded: a GGUF Q4_1 file
runs on its own int4/int8 codes), ``source-a8`` (the same codes with int8 activations per block and
integer dot products: llama.cpp's arithmetic), or any precision spec or rules (RTN from the float weights;
embeddings, norms and head kept in 16-bit unless a rule names them, as ``cascade quantize``).

Each row also breaks its decode step down (``step_ms``): ``matmul_ms`` is the time of all the
step's weight matmuls (every linear layer and the head at batch 1, on the backends the model
uses) in one jitted call, and ``call_ms`` the time of a jitted call that takes the same
parameters and cache and returns the next id to the host, doing no work: what dispatch and the
host round trip cost per step.  The rest (attention, norms, rotary, sampling) is
``step_ms - matmul_ms - call_ms``.  So the rows decode one step a device call
(``steps_per_call=1``); ``cascade generate`` runs 8 a call, which saves most of ``call_ms``.

``rows`` (e.g. ``(1, 2, 3, 5, 8, 16)``) also times the step's matmuls with that many input rows
each (``matmul_ms_by_rows``) and reports each against one row (``vs_one_row``): what a k-position
speculative verification pays for its weights.  ``matmul_calls`` counts the matmul calls of a
step (per layer: q, k, v, o, gate, up, down, with q/k/v and gate/up one call each where they fuse:
``-a8`` weights on the native kernel; plus the head), and ``matmul_ms`` times those calls.

``kv`` adds one row per KV-cache precision (``fp32``, ``fp16``, ``int8``, ``int4``, ...) and
``context`` decodes after a prompt of that many tokens (the prompt's ids repeated), so that
attention over a long cache shows.  ``attention`` lists the attention backends to time each row
on: ``cpu`` (the native kernel, the default where it is built) and ``xla`` (the reference, forced
with ``CASCADE_ATTENTION_BACKEND=xla``), side by side in the same run.

With ``llamacpp`` (the Python of a venv with ``llama-cpp-python``, see ``bench/llamacpp_venv.sh``)
and a GGUF model, llama.cpp decodes the same prompt and count with ``threads`` threads in a
subprocess of the same run (``bench/llamacpp_decode.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from cascade import console
from cascade.console import plural, progress_bar
from cascade.bench.context import describe, run_context
from cascade.models import KVCache, generate, matmul_backends, quantize_model, weight_bytes
from cascade.models.decoder import cache_length
from cascade.models.model import Model
from cascade.models.quantize import SOURCE_A8, source_a8
from cascade.quant import dequant_matmul
from cascade.quant.kernels import cpu as cpu_kernels
from cascade.quant.kv import parse_kv_spec
from cascade.quant.qtensor import QuantizedTensor, dequantize

DEFAULT_SPECS = ("fp32", "int8", "int4-g32", "source")
DEFAULT_PROMPT = "Once upon a time"


def run(model: Model, *, label: str | None = None, specs=DEFAULT_SPECS, prompt: str = DEFAULT_PROMPT, tokens: int = 64,
        repeats: int = 3, warmup: int = 1, llamacpp: str | None = None, threads: int | None = None,
        kv=("fp32",), context: int | None = None, attention=(None,), rows=(), progress=None) -> dict:
    if tokens < 3:
        raise ValueError("tokens must be >= 3 (the first decode step is not timed)")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    rows_k = tuple(sorted({1, *rows})) if rows else ()
    if any(not isinstance(r, int) or r < 1 or r > 64 for r in rows_k):
        raise ValueError(f"rows must be between 1 and 64, got {rows}")
    if model.tokenizer is None:
        raise ValueError("bench decode needs a model with a tokenizer")
    ids = model.tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    if context is not None:
        if llamacpp is not None:
            raise ValueError("--context and --llamacpp do not combine (llama.cpp is run on the prompt text)")
        if context < 1:
            raise ValueError("context must be >= 1")
        ids = (ids * (context // len(ids) + 1))[:context]
    for a in attention:
        if a not in (None, "cpu", "xla"):
            raise ValueError(f"unknown attention backend {a!r}: expected cpu or xla")
    for k in kv:
        parse_kv_spec(k).check_context(model.config.max_seq_len)
    if len(ids) + tokens > model.config.max_seq_len:
        raise ValueError(f"prompt ({plural(len(ids), 'token')}) + {plural(tokens, 'token')} exceeds the model context "
                         f"({model.config.max_seq_len})")
    if llamacpp is not None and model.format != "gguf":
        raise ValueError("--llamacpp needs a GGUF model (llama.cpp reads only GGUF files)")
    label = label or model.source
    out_rows = []
    combos = [(spec, k, a) for spec in specs for k in kv for a in attention]
    variants = {}
    for spec, kv_spec, attn in progress_bar(combos, desc="bench decode", unit="run", enabled=progress, leave=False):
        if spec not in variants:
            variants = {spec: _variant(model, spec)}  # one variant in memory at a time
        variant = variants[spec]
        with _attention_backend(attn):
            rates = []
            for i in range(warmup + repeats):
                # one step a call: the breakdown below (matmuls + one call's fixed cost + the rest) is of one step
                out = generate(variant.params, variant.config, [ids], max_new_tokens=tokens, eos_ids=(), kv=kv_spec,
                               steps_per_call=1)
                if i >= warmup:
                    rates.append(out.tokens_per_s)
        tok_s = statistics.median(rates)
        step_ms = 1e3 / tok_s
        matmul_ms = _matmul_ms(variant, repeats=max(5, repeats))
        call_ms = _call_ms(variant, len(ids) + tokens, repeats=max(5, repeats))
        row = {"engine": "cascade", "spec": spec, "quant": variant.quant, "kv": kv_spec,
               "attention": attn or cpu_kernels.attention_backend(), "tokens_per_s": round(tok_s, 2),
               "runs": [round(r, 2) for r in rates], "weight_bytes": weight_bytes(variant.params),
               "matmul_backends": matmul_backends(variant), "matmul_calls": len(_calls(variant)),
               "step_ms": round(step_ms, 3), "matmul_ms": round(matmul_ms, 3), "call_ms": round(call_ms, 3),
               "other_ms": round(step_ms - matmul_ms - call_ms, 3)}
        if rows_k:
            by_rows = {k: _matmul_ms(variant, repeats=max(9, repeats), rows=k) for k in rows_k}
            row["matmul_ms_by_rows"] = {str(k): round(v, 3) for k, v in by_rows.items()}
            row["vs_one_row"] = {str(k): round(v / by_rows[1], 3) for k, v in by_rows.items()}
        out_rows.append(row)
    if llamacpp is not None:
        out_rows.append(_llamacpp_row(llamacpp, model.source, prompt, tokens, repeats, warmup, threads or os.cpu_count()))
    ref = next((r["tokens_per_s"] for r in out_rows if r["engine"] == "llama.cpp"), None)
    for r in out_rows:
        r["vs_llamacpp"] = None if ref is None else round(r["tokens_per_s"] / ref, 3)
    return {"benchmark": "decode", "model": label, **run_context(repeats=repeats, warmup=warmup), "tokens": tokens,
            "prompt_tokens": len(ids), "kernel_isa": cpu_kernels.isa(), "rows": out_rows}


@contextlib.contextmanager
def _attention_backend(name: str | None):
    """Run with CASCADE_ATTENTION_BACKEND set to ``name`` (None: as it is); the jit caches are
    cleared on the way in and out, since the choice is made when a program is traced."""
    if name is None:
        yield
        return
    old = os.environ.get(cpu_kernels.ATTENTION_BACKEND_ENV)
    os.environ[cpu_kernels.ATTENTION_BACKEND_ENV] = name
    jax.clear_caches()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(cpu_kernels.ATTENTION_BACKEND_ENV, None)
        else:
            os.environ[cpu_kernels.ATTENTION_BACKEND_ENV] = old
        jax.clear_caches()


def _variant(model: Model, spec: str) -> Model:
    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731
    if spec == "source":
        return model
    if spec == SOURCE_A8:
        return source_a8(model)
    if spec == "fp32":
        params = jax.tree.map(lambda a: dequantize(a, "float32") if is_q(a) else jnp.asarray(a, jnp.float32),
                              model.params, is_leaf=is_q)
        return dataclasses.replace(model, params=params, quant="fp32")
    return quantize_model(model, spec, progress=False)[0]


def _linear_weights(model: Model) -> list[tuple[object, bool]]:
    """Every weight a decode step multiplies by: (weight, transposed) for each 2-D kernel, and the
    embedding read as the head (transposed) when the head is tied."""
    out = []
    flat = jax.tree_util.tree_flatten_with_path(model.params, is_leaf=lambda a: isinstance(a, QuantizedTensor))[0]
    for path, a in flat:
        name = jax.tree_util.keystr(path)
        if "embed" in name:
            if model.config.tie_embeddings:
                out.append((a, True))
        elif len(a.shape) == 2:
            out.append((a, False))
    return out


def _calls(model: Model, rows: int = 1) -> list[tuple[list, bool]]:
    """The weight matmul calls of a decode step, as (weights of one call, transposed): a layer's
    q/k/v and gate/up are one call each where they fuse (:func:`cascade.quant.dequant_matmul.fuses`),
    one call per weight otherwise; the head last."""
    params, cfg = model.params, model.config
    if not all(f"layers_{i}" in params for i in range(cfg.n_layers)):
        return [([w], t) for w, t in _linear_weights(model)]
    out = []
    groups = (("attn", ("q_proj", "k_proj", "v_proj")), ("attn", ("o_proj",)), ("mlp", ("gate_proj", "up_proj")),
              ("mlp", ("down_proj",)))
    for i in range(cfg.n_layers):
        layer = params[f"layers_{i}"]
        for block, names in groups:
            ws = [layer[block][n]["kernel"] for n in names]
            x = jax.ShapeDtypeStruct((rows, ws[0].shape[0]), jnp.float32)
            if len(ws) > 1 and all(isinstance(w, QuantizedTensor) for w in ws) and dequant_matmul.fuses(x, ws):
                out.append((ws, False))
            else:
                out.extend(([w], False) for w in ws)
    if cfg.tie_embeddings:
        out.append(([params["embed"]["embedding"]], True))
    elif "lm_head" in params:
        out.append(([params["lm_head"]["kernel"]], False))
    return out


def _matmul_ms(model: Model, *, repeats: int, rows: int = 1) -> float:
    calls = _calls(model, rows)
    dtype = jnp.float32
    xs = [jnp.ones((rows, ws[0].shape[1] if t else ws[0].shape[0]), dtype) for ws, t in calls]
    weights = [ws for ws, _ in calls]
    flags = tuple(t for _, t in calls)

    @jax.jit
    def all_matmuls(xs, weights):
        out = []
        for x, ws, t in zip(xs, weights, flags):
            if t:
                out.append(dequant_matmul.matmul_t(x, ws[0]))
            elif len(ws) > 1:
                out.extend(dequant_matmul.matmul_many(x, ws))
            else:
                out.append(dequant_matmul.matmul(x, ws[0]))
        return out

    return _median_ms(lambda: all_matmuls(xs, weights), repeats)


def _call_ms(model: Model, needed: int, *, repeats: int) -> float:
    cache = KVCache.create(model.config, 1, cache_length(model.config, needed), None)

    @jax.jit
    def nothing(params, cache, tok):
        return tok + 1

    tok = jnp.zeros((1,), jnp.int32)
    return _median_ms(lambda: np.asarray(nothing(model.params, cache, tok)), repeats)


def _median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _llamacpp_row(python: str, gguf: str, prompt: str, tokens: int, repeats: int, warmup: int, threads: int) -> dict:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llamacpp_decode.py")
    cmd = [python, script, gguf, "--prompt", prompt, "--tokens", str(tokens), "--threads", str(threads),
           "--repeats", str(repeats), "--warmup", str(warmup)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except OSError as e:
        raise ValueError(f"cannot run llama.cpp's Python {python!r}: {e.strerror}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"llama.cpp run failed (exit {proc.returncode}): {last}")
    res = json.loads(proc.stdout)
    return {"engine": "llama.cpp", "spec": "source", "quant": f"llama-cpp-python {res['version']}, {threads} threads",
            "tokens_per_s": round(statistics.median(res["tokens_per_s"]), 2),
            "kv": "f16", "attention": None,
            "runs": [round(r, 2) for r in res["tokens_per_s"]], "weight_bytes": os.path.getsize(gguf),
            "matmul_backends": None, "step_ms": round(1e3 / statistics.median(res["tokens_per_s"]), 3),
            "matmul_ms": None, "call_ms": None, "other_ms": None}


def format_table(result: dict) -> str:
    head = (f"decode at batch 1, {result['model']}, {plural(result['tokens'], 'token')} after a "
            f"{result['prompt_tokens']}-token prompt {describe(result)}, median of {result['repeats']} after "
            f"{result['warmup']} warm-up")

    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    rows = [(r["engine"], r["spec"], r["kv"], r["attention"] or "-", f"{r['tokens_per_s']:.1f}",
             "-" if r["vs_llamacpp"] is None else f"{r['vs_llamacpp']:.2f}x", f"{r['weight_bytes'] / 2**20:.1f}",
             ms(r["step_ms"]), ms(r["matmul_ms"]), ms(r["call_ms"]), ms(r["other_ms"]),
             ", ".join(f"{n} {b}" for b, n in (r["matmul_backends"] or {}).items()) or "-") for r in result["rows"]]
    table = head + "\n" + console.format_table(
        rows, ("engine", "spec", "kv", "attn", "tok/s", "vs llama.cpp", "MiB", "step ms", "matmul", "call", "other",
               "backends"), align="<<<<>>>>>>><")
    with_rows = [r for r in result["rows"] if r.get("vs_one_row")]
    if with_rows:
        ks = list(with_rows[0]["vs_one_row"])
        table += "\n\nmatmul time of a step with k input rows, against one row (a k-position verification)\n"
        table += console.format_table(
            [(r["spec"], r["matmul_calls"], *(f"{r['matmul_ms_by_rows'][k]:.2f} ms ({r['vs_one_row'][k]:.2f}x)" for k in ks))
             for r in with_rows], ("spec", "calls", *(f"k={k}" for k in ks)), align="<>" + ">" * len(ks))
    return table
