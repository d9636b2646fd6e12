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

from cascade.console import plural, progress_bar
from cascade.models.config import ModelConfig
from cascade.models.kv_cache import KVCache
from cascade.models.llama import Transformer
from cascade.models.sharding import traced_on_mesh_of
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


@traced_on_mesh_of(0)
@partial(jax.jit, static_argnames=("cfg",))
def _window_nll(params, cfg: ModelConfig, tokens, weights):
    """Sum of NLL over weighted targets: tokens (B, T) predict tokens[:, 1:] where weights[:, 1:] > 0."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -(target_logp * weights[:, 1:]).sum(), weights[:, 1:].sum()


@traced_on_mesh_of(0)
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


def _windows(cfg: ModelConfig, token_docs, ctx, stride, truncate, max_tokens, min_context):
    ctx = min(ctx or min(cfg.max_seq_len, DEFAULT_EVAL_CTX), cfg.max_seq_len)
    stride = stride or max(1, ctx // 2)
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2, got {ctx}")
    wins = [w for ids in token_docs for w in windows_of(ids, ctx, stride, truncate, min_context)]
    if not wins:
        raise ValueError("no document has two or more tokens to score")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        scored = np.cumsum([len(w.tokens) - w.first_scored for w in wins])
        wins = wins[: int(np.searchsorted(scored, max_tokens)) + 1]
    return wins, ctx, stride


def _batches(cfg: ModelConfig, wins: list[Window], ctx: int, batch_tokens: int | None, progress: bool | None, desc: str):
    """``(tokens, weights)`` batches over ``wins``: windows grouped by padded length so each
    (batch, length) shape compiles once; ``weights`` marks the scored positions."""
    batch_tokens = batch_tokens or max(ctx, (64 << 20) // (4 * cfg.vocab_size))
    by_len: dict[int, list[Window]] = {}
    for w in wins:
        by_len.setdefault(_length_bucket(len(w.tokens), ctx), []).append(w)
    bar = progress_bar(total=len(wins), desc=desc, unit="window", enabled=progress, leave=False)
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
            yield tokens, weights
            bar.update(len(chunk))
    bar.close()


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
    kv = None if kv is None else parse_kv_spec(kv)
    wins, ctx, stride = _windows(cfg, token_docs, ctx, stride, truncate, max_tokens, min_context)
    total_nll, total_tokens = 0.0, 0.0
    for tokens, weights in _batches(cfg, wins, ctx, batch_tokens, progress, "eval"):
        if kv is None:
            nll, count = _window_nll(params, cfg, tokens, weights)
        else:
            nll, count = _window_nll_cached(params, cfg, tokens, weights, kv)
        total_nll += float(nll)
        total_tokens += float(count)
    mean = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=int(total_tokens), documents=len(token_docs),
                            windows=len(wins), ctx=ctx, stride=stride, kv=None if kv is None else str(kv))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FidelityResult:
    """How closely a model's next-token distributions follow a reference's (llama.cpp's
    ``perplexity --kl-divergence``): over the same scored tokens, ``KL(P_ref || P)`` per token
    (nats), the share of tokens where both put the same token first, and both perplexities."""

    ppl: float  # the model's perplexity
    ref_ppl: float  # the reference's perplexity
    delta_ppl: float  # ppl - ref_ppl
    kld_mean: float  # mean KL(P_ref || P) over scored tokens
    kld_p99: float  # its 99th percentile
    kld_max: float
    top1_agreement: float  # fraction of scored tokens with argmax P == argmax P_ref
    tokens: int
    windows: int
    ctx: int
    stride: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def perplexity(self, documents: int) -> PerplexityResult:
        """The model's side as a :class:`PerplexityResult` (same windows, same tokens)."""
        return PerplexityResult(ppl=self.ppl, nll=math.log(self.ppl), tokens=self.tokens, documents=documents,
                                windows=self.windows, ctx=self.ctx, stride=self.stride)


@traced_on_mesh_of(0)
@partial(jax.jit, static_argnames=("cfg", "ref_cfg"))
def _window_fidelity(params, cfg: ModelConfig, ref_params, ref_cfg: ModelConfig, tokens, weights):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions)
    ref_logits, _ = Transformer(ref_cfg).apply({"params": ref_params}, tokens, positions)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    ref_logp = jax.nn.log_softmax(ref_logits[:, :-1].astype(jnp.float32), axis=-1)
    kld = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)  # (B, T-1)
    same = jnp.argmax(logp, axis=-1) == jnp.argmax(ref_logp, axis=-1)
    target = tokens[:, 1:, None]
    w = weights[:, 1:]
    nll = -(jnp.take_along_axis(logp, target, axis=-1)[..., 0] * w).sum()
    ref_nll = -(jnp.take_along_axis(ref_logp, target, axis=-1)[..., 0] * w).sum()
    return jnp.maximum(kld, 0.0), same, nll, ref_nll


def fidelity(params, cfg: ModelConfig, ref_params, ref_cfg: ModelConfig, token_docs: list[list[int]], *,
             ctx: int | None = None, stride: int | None = None, truncate: bool = False,
             batch_tokens: int | None = None, progress: bool | None = None, max_tokens: int | None = None,
             min_context: int = 1) -> FidelityResult:
    """:class:`FidelityResult` of ``params`` against ``ref_params`` over the windows
    :func:`perplexity` scores (both models see the same tokens; they must share the vocabulary)."""
    if cfg.vocab_size != ref_cfg.vocab_size:
        raise ValueError(f"the reference has a vocabulary of {ref_cfg.vocab_size} tokens, the model {cfg.vocab_size}: "
                         "compare models that share a tokenizer")
    ctx = min(ctx or DEFAULT_EVAL_CTX, cfg.max_seq_len, ref_cfg.max_seq_len)
    wins, ctx, stride = _windows(cfg, token_docs, ctx, stride, truncate, max_tokens, min_context)
    klds, same, nll, ref_nll = [], 0, 0.0, 0.0
    for tokens, weights in _batches(cfg, wins, ctx, (batch_tokens or max(ctx, (64 << 20) // (4 * cfg.vocab_size))) // 2,
                                    progress, "fidelity"):
        kld, agree, n, rn = _window_fidelity(params, cfg, ref_params, ref_cfg, tokens, weights)
        scored = weights[:, 1:] > 0
        klds.append(np.asarray(kld)[scored])
        same += int(np.asarray(agree)[scored].sum())
        nll += float(n)
        ref_nll += float(rn)
    kld = np.concatenate(klds).astype(np.float64)
    count = kld.size
    ppl, ref_ppl = math.exp(nll / count), math.exp(ref_nll / count)
    return FidelityResult(ppl=ppl, ref_ppl=ref_ppl, delta_ppl=ppl - ref_ppl, kld_mean=float(kld.mean()),
                          kld_p99=float(np.percentile(kld, 99)), kld_max=float(kld.max()),
                          top1_agreement=same / count, tokens=count, windows=len(wins), ctx=ctx, stride=stride)


@dataclasses.dataclass(frozen=True)
class TextScore:
    """What ``cascade eval`` reports for one model on one text (:func:`score_text`)."""

    result: PerplexityResult
    fidelity: FidelityResult | None  # against the reference model, when one was given
    reference: str | None  # the reference model's source
    kv_cache: dict | None  # kv_cache_memory of the cache scored through (None: no cache)
    weight_bytes: int
    seconds: float  # tokenizing and scoring

    def to_json(self) -> dict:
        memory = self.kv_cache
        return {**self.result.to_json(), "weight_bytes": self.weight_bytes, "kv_cache": memory,
                "kv_bytes": memory and memory["bytes_per_sequence"], "seconds": self.seconds,
                "tokens_per_s": self.result.tokens / self.seconds, "reference": self.reference,
                "fidelity": None if self.fidelity is None else self.fidelity.to_json()}

    def summary(self) -> str:
        r, memory, fid = self.result, self.kv_cache, self.fidelity
        cache = ("" if memory is None else f"KV cache ({memory['kv']}) {memory['bytes_per_sequence']:,} bytes per "
                 f"sequence of {r.ctx} ({memory['vs_fp16_per_sequence']:.1%} of fp16); ")
        text = (f"perplexity {r.ppl:.4f} over {r.tokens:,} tokens ({plural(r.documents, 'document')}, "
                f"{plural(r.windows, 'window')}, ctx {r.ctx}, stride {r.stride}); "
                f"weights {self.weight_bytes:,} bytes; {cache}{self.seconds:.1f} s")
        if fid is not None:
            text += (f"\nvs reference {self.reference}: perplexity {fid.ref_ppl:.4f} (Δppl {fid.delta_ppl:+.4f}); "
                     f"KL divergence mean {fid.kld_mean:.5f}, p99 {fid.kld_p99:.5f}, max {fid.kld_max:.4f} nats; "
                     f"top-1 agreement {fid.top1_agreement:.2%}")
        return text


def score_text(model, docs: list[str], *, params=None, reference=None, reference_params=None, ctx: int | None = None,
               stride: int | None = None, truncate: bool = False, kv: str | None = None,
               max_tokens: int | None = None) -> TextScore:
    """Perplexity of ``model`` (a loaded :class:`~cascade.models.model.Model`) on the documents
    ``docs``, through the KV cache ``kv`` if given, or its fidelity to the ``reference`` model (KL
    divergence, top-1 agreement, Δppl; the two must share the tokenizer).  ``params`` and
    ``reference_params`` are the weights to use (default: the models' own; e.g. placed on a mesh)."""
    import time

    from cascade.models.kv_cache import kv_cache_memory
    from cascade.models.quantize import weight_bytes

    if not docs:
        raise ValueError("no text to score")
    params = model.params if params is None else params
    t0 = time.perf_counter()
    token_docs = tokenize_documents(model.tokenizer, docs)
    fid = None
    if reference is not None:
        if (reference.config.vocab_size != model.config.vocab_size
                or tokenize_documents(reference.tokenizer, docs[:3]) != token_docs[:3]):
            raise ValueError("the reference model does not share MODEL's tokenizer; KL divergence needs the same tokens")
        fid = fidelity(params, model.config, reference.params if reference_params is None else reference_params,
                       reference.config, token_docs, ctx=ctx, stride=stride, truncate=truncate, max_tokens=max_tokens)
        result = fid.perplexity(len(token_docs))
    else:
        result = perplexity(params, model.config, token_docs, ctx=ctx, stride=stride, truncate=truncate, kv=kv,
                            max_tokens=max_tokens)
    seconds = time.perf_counter() - t0
    return TextScore(result=result, fidelity=fid, reference=None if reference is None else reference.source,
                     kv_cache=kv_cache_memory(model.config, kv, result.ctx) if kv else None,
                     weight_bytes=weight_bytes(model.params), seconds=seconds)


def tokenize_documents(tokenizer, docs: list[str], bos: bool | None = None) -> list[list[int]]:
    """``encode(doc)`` for each document, with BOS first when ``bos`` says so (default: when the
    tokenizer adds BOS, e.g. Llama, llama2.c; SmolLM2's GGUF says not to)."""
    return [tokenizer.encode(d, add_bos=bos) for d in docs]
