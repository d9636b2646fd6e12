"""Perplexity and weight bytes of a model under several precision specs, side by side.

``cascade bench ppl MODEL --data FILE``
(``--json`` for rows).  Each spec is RTN with the default rules (embeddings, norms and LM head
kept in bf16); ``source`` is the model as loaded, ``source-a8`` the same with int8 activations per
block (:func:`cascade.models.quantize.source_a8`).  Every row scores the same tokens.
"""

from __future__ import annotations

import time

from cascade.bench.context import run_context
from cascade import console
from cascade.console import progress_bar
from cascade.models import Model, load_model, perplexity, quantize_model, split_documents, tokenize_documents, weight_bytes
from cascade.models.quantize import SOURCE_A8, source_a8

DEFAULT_SPECS = ("source", "int8", "int8-g32", "int4-g32", "int4-g64", "int4-g32-asym", "int4-g64-asym", "int4-g32-mse")


def run(model: "str | Model", data: str, *, specs=DEFAULT_SPECS, limit: int | None = 200, ctx: int | None = None,
        stride: int | None = None, truncate: bool = True, tokenizer: str | None = None, label: str | None = None,
        max_tokens: int | None = None, progress=None) -> dict:
    """``model``: a MODEL path / built-in name, or a loaded :class:`cascade.models.Model` (``label`` names
    it in the result); ``max_tokens``: score at most the first that many tokens of the documents (a
    one-document file such as WikiText-2 with ``truncate=False``)."""
    model_path = label or (model if isinstance(model, str) else model.source)
    base = model if isinstance(model, Model) else load_model(model, tokenizer=tokenizer)
    if base.tokenizer is None:
        raise ValueError(f"{model_path}: no tokenizer; pass tokenizer=")
    with open(data, encoding="utf-8") as f:
        docs = split_documents(f.read())[:limit]
    ids = tokenize_documents(base.tokenizer, docs)
    if max_tokens is not None:
        ids = first_tokens(ids, max_tokens)
    rows, result = [], None
    for spec in progress_bar(specs, desc="bench ppl", unit="spec", enabled=progress):
        quantized = (base if spec == "source" else source_a8(base) if spec == SOURCE_A8
                     else quantize_model(base, spec, progress=False)[0])
        t0 = time.perf_counter()
        result = perplexity(quantized.params, quantized.config, ids, ctx=ctx, stride=stride, truncate=truncate,
                            progress=progress)
        rows.append({"spec": spec, "ppl": result.ppl, "tokens": result.tokens,
                     "weight_bytes": weight_bytes(quantized.params), "seconds": time.perf_counter() - t0})
    if result is None:
        raise ValueError("bench ppl needs at least one spec")
    ref = rows[0]
    for row in rows:
        row["ppl_change_pct"] = 100.0 * (row["ppl"] / ref["ppl"] - 1.0)
        row["bytes_vs_first"] = row["weight_bytes"] / ref["weight_bytes"]
    return {"benchmark": "perplexity", **run_context(), "model": _display_path(model_path),
            "data": _display_path(data), "documents": len(docs), "ctx": result.ctx,
            "stride": None if truncate else result.stride, "truncate": truncate, "max_tokens": max_tokens, "rows": rows}


def first_tokens(ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The documents' first ``max_tokens`` tokens in all (the last one cut short; a document of one
    token left over is dropped: it predicts nothing)."""
    if max_tokens < 2:
        raise ValueError("max_tokens must be >= 2")
    kept, left = [], max_tokens
    for doc in ids:
        if left <= 1:
            break
        kept.append(doc[:left])
        left -= len(kept[-1])
    return kept


def _display_path(path: str) -> str:
    """A path relative to the working directory when it is below its parent (e.g. ../shared/data/...)."""
    import os

    rel = os.path.relpath(path)
    return rel if not rel.startswith("../..") else path


def format_table(result: dict) -> str:
    rows = [(r["spec"], f"{r['ppl']:.4f}", f"{r['ppl_change_pct']:+.2f}%", f"{r['weight_bytes']:,}",
             f"{r['bytes_vs_first']:.3f}", f"{r['tokens']:,}") for r in result["rows"]]
    first = result["rows"][0]["spec"]
    return console.format_table(rows, ("spec", "ppl", "change", "weight bytes", "vs " + first, "tokens"))
