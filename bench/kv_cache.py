"""KV-cache precisions side by side: perplexity, cache bytes and greedy agreement.

``cascade bench kv MODEL --data FILE --ctx N`` (``--json``
for rows).  For each ``--kv`` spec, on the same tokens:

* perplexity (sliding windows of ``--ctx``; ``--min-context ctx-stride`` scores only targets
  that have a long context; ``--concat`` joins the documents into one stream) with every window scored through a cache of that precision (the window is written
  to the cache and each token attends over what the cache returns, as in decoding), and its
  change against the first spec (``fp32``);
* the cache's bytes per token and per sequence at ``--ctx`` and their ratio to an fp16 cache;
* long greedy generation from a prompt of ``--gen-prompt`` tokens of the data: the first
  position where the tokens differ from the first spec's, and the teacher-forced agreement (the
  share of the first spec's generated tokens that this cache's model also ranks first, given
  the same preceding tokens).
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from cascade.bench.context import run_context
from cascade import console
from cascade.console import plural, progress_bar
from cascade.models import Model, generate, kv_cache_memory, load_model, perplexity, split_documents, tokenize_documents
from cascade.models.decoder import forward
from cascade.models.kv_cache import KVCache

DEFAULT_KV = ("fp32", "int8", "int4")


def _teacher_forced_argmax(model, ids: list[int], kv: str) -> np.ndarray:
    """Argmax prediction after every prefix of ``ids``, through a cache of precision ``kv``."""
    tokens = jnp.asarray([ids], jnp.int32)
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    logits, _ = forward(model.params, model.config, tokens, positions, KVCache.create(model.config, 1, len(ids), kv))
    return np.asarray(jnp.argmax(logits[0], axis=-1))


def run(model: "str | Model", data: str, *, kvs=DEFAULT_KV, ctx: int | None = None, stride: int | None = None,
        max_tokens: int | None = None, limit: int | None = None, min_context: int = 1, concat: bool = False,
        gen_prompt: int = 0, gen_tokens: int = 0, tokenizer: str | None = None, label: str | None = None,
        progress=None) -> dict:
    """``model``: a MODEL path / built-in name, or a loaded :class:`cascade.models.Model` (``label`` names it
    in the result).  ``concat``: score the documents as one stream (each still starting with BOS),
    as models like llama2.c's were trained on packed stories; ``min_context``: score only targets
    with at least that many tokens before them in their window (``ctx - stride``: long-context
    tokens only)."""
    model_path = label or (model if isinstance(model, str) else model.source)
    model = model if isinstance(model, Model) else load_model(model, tokenizer=tokenizer)
    if model.tokenizer is None:
        raise ValueError(f"{model_path}: no tokenizer; pass tokenizer=")
    cfg = model.config
    ctx = min(ctx or cfg.max_seq_len, cfg.max_seq_len)
    stride = stride or ctx // 4
    with open(data, encoding="utf-8") as f:
        docs = split_documents(f.read())[:limit]
    ids = tokenize_documents(model.tokenizer, docs)
    if concat:
        ids = [[t for doc in ids for t in doc]]
    rows = []
    for kv in progress_bar(kvs, desc="bench kv", unit="cache", enabled=progress):
        t0 = time.perf_counter()
        r = perplexity(model.params, cfg, ids, ctx=ctx, stride=stride, max_tokens=max_tokens, kv=kv,
                       min_context=min_context, progress=progress)
        mem = kv_cache_memory(cfg, kv, ctx)
        rows.append({"kv": kv, "ppl": r.ppl, "tokens": r.tokens, "windows": r.windows,
                     "kv_bytes_per_token": mem["bytes_per_token"], "kv_bytes_per_sequence": mem["bytes_per_sequence"],
                     "vs_fp16_per_token": mem["vs_fp16_per_token"], "vs_fp16_per_sequence": mem["vs_fp16_per_sequence"],
                     "seconds": time.perf_counter() - t0})
    ref = rows[0]
    for row in rows:
        row["ppl_change_pct"] = 100.0 * (row["ppl"] / ref["ppl"] - 1.0)
    generation = None
    if gen_tokens:
        stream = [t for doc in ids for t in doc]
        prompt = stream[:gen_prompt]
        if len(prompt) + gen_tokens > cfg.max_seq_len:
            raise ValueError(f"--gen-prompt {len(prompt)} + --gen-tokens {gen_tokens} exceed the context {cfg.max_seq_len}")
        outs = {}
        for row in rows:
            g = generate(model.params, cfg, [prompt], max_new_tokens=gen_tokens, eos_ids=(), kv=row["kv"])
            outs[row["kv"]] = g.tokens[0]
            row["gen_tokens_per_s"] = g.tokens_per_s
        ref_tokens = outs[ref["kv"]]
        for row in rows:
            mine = outs[row["kv"]]
            diverge = next((i for i, (a, b) in enumerate(zip(mine, ref_tokens)) if a != b), None)
            row["gen_first_divergence"] = diverge  # None: all gen_tokens equal
            pred = _teacher_forced_argmax(model, prompt + ref_tokens[:-1], row["kv"])[len(prompt) - 1:]
            row["gen_teacher_forced_agreement"] = float(np.mean(pred == np.asarray(ref_tokens)))
        generation = {"prompt_tokens": len(prompt), "generated": gen_tokens}
    return {"benchmark": "kv_cache", **run_context(), "model": _display_path(model_path), "data": _display_path(data), "ctx": ctx,
            "stride": stride, "min_context": min_context, "concat": concat, "documents": len(docs), "generation": generation, "rows": rows}


def _display_path(path: str) -> str:
    import os

    rel = os.path.relpath(path)
    return rel if os.path.exists(path) and not rel.startswith("../..") else path


def format_table(result: dict) -> str:
    first = result["rows"][0]["kv"]
    gen = result["generation"]
    head = (f"{result['model']} on {result['data']}: ctx {result['ctx']}, stride {result['stride']}, "
            f"scoring targets with >= {plural(result['min_context'], 'token')} of context"
            + (f"; greedy {plural(gen['generated'], 'token')} after {gen['prompt_tokens']}" if gen else ""))
    columns = ("kv", "ppl", "vs " + first, "B/token", "vs fp16", "seq vs fp16", "tokens")
    rows = [(r["kv"], f"{r['ppl']:.4f}", f"{r['ppl_change_pct']:+.3f}%", f"{r['kv_bytes_per_token']:,.0f}",
             f"{r['vs_fp16_per_token']:.1%}", f"{r['vs_fp16_per_sequence']:.1%}", f"{r['tokens']:,}")
            + (("never" if r["gen_first_divergence"] is None else r["gen_first_divergence"],
                f"{r['gen_teacher_forced_agreement']:.1%}") if gen else ()) for r in result["rows"]]
    return head + "\n" + console.format_table(rows, columns + (("diverges at", "agreement") if gen else ()))
