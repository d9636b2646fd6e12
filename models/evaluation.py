"""Perplexity of a model over a text file.

Documents: the file is split at lines that hold only ``<|endoftext|>`` (the TinyStories layout);
a file without such lines is one document.  Each document is scored on its own as
``BOS + encode(doc.strip())`` (no EOS), as llama2.c scores TinyStories; BOS only for models whose
tokenizer adds one.  The default ``ctx`` is the model context, capped at 2048.

Long documents (more tokens than ``ctx``) are scored in sliding windows, as in the Hugging Face
perplexity guide: windows of ``ctx`` tokens advance by ``stride`` tokens and each scores only the
tokens the previous one did not, so every token is predicted once, with at least
``ctx - stride`` tokens of context (except in the first window).  The default ``stride`` is
``ctx // 2``; ``stride = ctx`` is the cheapest (nearly disjoint windows, the last token of one is
the context of the next); ``truncate=True`` scores only the first ``ctx`` tokens of each document.

Perplexity is ``exp(total NLL / predicted tokens)``, token-weighted over all documents.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cascade.models.config import ModelConfig
from cascade.models.llama import KVCache, Transformer
from cascade.quant.kv import KVSpec, parse_kv_spec

DOC_SEPARATOR = "<|endoftext|>"
DEFAULT_EVAL_CTX = 2048  # default window cap: attention here is unchunked, O(ctx^2) memory per row


def split_documents(text: str) -> list[str]:
    """Documents of a text: split at lines equal to ``<|endoftext|>``, stripped, empties dropped."""
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if line.strip() == DOC_SEPARATOR:
            docs.append("".join(current))
            current = []
        else:
            current.append(line)
    docs.append("".join(current))
    return [d.strip() for d in docs if d.strip()]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Window:
    tokens: np.ndarray  # the window's token ids (length <= ctx)
    first_scored: int  # predictions for targets tokens[first_scored:] are counted (>= 1)


def windows_of(ids: list[int], ctx: int, stride: int, truncate: bool = False, min_context: int = 1) -> list[Window]:
    """Sliding windows over one document (see the module docstring).

    The first window is ``ids[:ctx]``; each next one ends ``min(stride, ctx - 1)`` tokens later,
    is ``ctx`` long, and scores only its new targets, so every target ``1..n-1`` is scored once and
    every target after the first window sees at least ``ctx - stride`` (>= 1) tokens of context.
    ``min_context``: the first window scores only targets with at least that many tokens before
    them (``ctx - stride`` makes every scored token a long-context one).
    """
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2, got {ctx}")
    if not 1 <= stride <= ctx:
        raise ValueError(f"stride must be in [1, ctx={ctx}], got {stride}")
    ids = np.asarray(ids, np.int32)
    n = len(ids)
    if n < 2:
        return []
    if not 1 <= min_context < ctx:
        raise ValueError(f"min_context must be in [1, ctx={ctx}), got {min_context}")
    out = [Window(tokens=ids[:ctx], first_scored=min_context)] if n > min_context else []
    if truncate:
        return out
    scored_until, step = min(ctx, n), min(stride, ctx - 1)
    while scored_until < n:
        end = min(scored_until + step, n)
        begin = end - ctx
        out.append(Window(tokens=ids[begin:end], first_scored=scored_until - begin))
        scored_until = end
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    ppl: float  # exp(mean NLL)
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted (scored) tokens
    documents: int  # documents scored
    windows: int  # model windows run
    ctx: int
    stride: int
    kv: str | None = None  # the KV cache precision scored through (None: plain causal forward, no cache)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@partial(jax.jit, static_argnames=("cfg",))
def _window_nll(params, cfg: ModelConfig, tokens, weights):
    """Sum of NLL over weighted targets: tokens (B, T) predict tokens[:, 1:] where weights[:, 1:] > 0."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -(target_logp * weights[:, 1:]).sum(), weights[:, 1:].sum()


@partial(jax.jit, static_argnames=("cfg", "kv"))
def _window_nll_cached(params, cfg: ModelConfig, tokens, weights, kv: KVSpec):
    """:func:`_window_nll` through a fresh KV cache in precision ``kv``: the window is written to
    the cache (quantized on write) and every token attends over what the cache returns, exactly
    as if the window had been decoded one token at a time."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
    cache = KVCache.create(cfg, b, t, kv)
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions, cache)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -(target_logp * weights[:, 1:]).sum(), weights[:, 1:].sum()


def _length_bucket(n: int, ctx: int) -> int:
    return min(ctx, max(64, -(-n // 64) * 64 if n <= 256 else 1 << (n - 1).bit_length()))


def perplexity(params, cfg: ModelConfig, token_docs: list[list[int]], *, ctx: int | None = None,
               stride: int | None = None, truncate: bool = False, batch_tokens: int | None = None,
               progress: bool | None = None, kv: KVSpec | str | None = None,
               max_tokens: int | None = None, min_context: int = 1) -> PerplexityResult:
    """Perplexity over tokenized documents (each already starting with BOS if the model uses one).

    ``kv``: score every window through a KV cache of that precision (:mod:`cascade.quant.kv`), so a
    quantized cache can be compared with ``kv="fp32"`` on the same tokens; None runs the plain
    forward.  ``max_tokens``: score only the first windows, until about that many tokens;
    ``min_context``: see :func:`windows_of`.

    ``batch_tokens`` bounds ``batch * window`` per model call (default: about 64 MB of logits); the
    batch is also cut so the attention scores stay near 64 MB.
    """
    ctx = min(ctx or min(cfg.max_seq_len, DEFAULT_EVAL_CTX), cfg.max_seq_len)
    stride = stride or max(1, ctx // 2)
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2, got {ctx}")
    kv = None if kv is None else parse_kv_spec(kv)
    wins = [w for ids in token_docs for w in windows_of(ids, ctx, stride, truncate, min_context)]
    if not wins:
        raise ValueError("no document has two or more tokens to score")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        scored = np.cumsum([len(w.tokens) - w.first_scored for w in wins])
        wins = wins[: int(np.searchsorted(scored, max_tokens)) + 1]
    batch_tokens = batch_tokens or max(ctx, (64 << 20) // (4 * cfg.vocab_size))
    # Group windows by padded length so each (batch, length) shape compiles once.
    by_len: dict[int, list[Window]] = {}
    for w in wins:
        by_len.setdefault(_length_bucket(len(w.tokens), ctx), []).append(w)
    total_nll, total_tokens = 0.0, 0.0
    bar = tqdm(total=len(wins), desc="eval", unit="window", disable=None if progress is None else not progress, leave=False)
    for length, group in sorted(by_len.items()):
        attn_rows = (64 << 20) // (4 * cfg.n_heads * length * length)  # keep the (B, H, T, T) scores ~64 MB
        bsz = max(1, min(batch_tokens // length, attn_rows, len(group)))
        for i in range(0, len(group), bsz):
            chunk = group[i:i + bsz]
            tokens = np.zeros((bsz, length), np.int32)
            weights = np.zeros((bsz, length), np.float32)
            for r, w in enumerate(chunk):
                tokens[r, : len(w.tokens)] = w.tokens
                weights[r, w.first_scored: len(w.tokens)] = 1.0
            if kv is None:
                nll, count = _window_nll(params, cfg, tokens, weights)
            else:
                nll, count = _window_nll_cached(params, cfg, tokens, weights, kv)
            total_nll += float(nll)
            total_tokens += float(count)
            bar.update(len(chunk))
    bar.close()
    mean = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=int(total_tokens), documents=len(token_docs),
                            windows=len(wins), ctx=ctx, stride=stride, kv=None if kv is None else str(kv))


def tokenize_documents(tokenizer, docs: list[str], bos: bool | None = None) -> list[list[int]]:
    """``encode(doc)`` for each document, with BOS first when ``bos`` says so (default: when the
    tokenizer adds BOS, e.g. Llama, llama2.c; SmolLM2's GGUF says not to)."""
    return [tokenizer.encode(d, add_bos=bos) for d in docs]
