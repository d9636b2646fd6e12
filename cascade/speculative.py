"""Speculative decoding: a small draft model proposes, the large target model verifies.

Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding" (2023);
Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling" (2023).

Each round the draft proposes ``draft_len`` tokens one at a time; the target scores the pending
token and all proposals in one call (``draft_len + 1`` positions) and the verifier accepts a
prefix of them:

* greedy (temperature 0): proposal ``d_i`` is accepted while it equals the target's argmax; the
  target's own argmax follows the accepted prefix.  The output is exactly the target's greedy
  output (up to float ties between the chunked and one-token forward).
* sampling: ``d_i ~ q`` is accepted with probability ``min(1, p(d_i) / q(d_i))``; on rejection the
  next token is drawn from ``norm(max(0, p - q))``; after ``draft_len`` acceptances a bonus token
  is drawn from ``p``.  The output is distributed exactly as sampling from the target ``p``
  (after the same temperature / top-k / top-p transform on both models).

Both models keep static KV caches; rejected proposals are dropped by moving the cache length
back (their rows are overwritten later and are never visible: attention masks keys by
position).  A quantized cache with a full-precision residual window keeps ``draft_len + 1``
extra positions in its ring, so a rewind never loses the window.  Roles follow vLLM: proposer (:func:`_draft`), scorer (the target's chunked
forward), verifier (:func:`verify_greedy` / :func:`verify_sampled`).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cascade.models.config import ModelConfig
from cascade.models.generation import SamplingConfig, forward_cached, prefill
from cascade.models.generation import _bucket as shape_bucket  # the same power-of-two buckets as generate()
from cascade.models.kv_cache import KVCache
from cascade.models.llama import Transformer
from cascade.quant.kv import KVSpec


@dataclasses.dataclass
class SpeculativeStats:
    """vLLM-style counters of one generation.

    Only proposals that could still be emitted count: in the last round, when fewer than
    ``draft_len`` tokens remain before ``max_new_tokens``, the proposals past the limit are
    neither draft tokens nor accepted ones, and an accepted proposal after an emitted EOS is not
    counted as accepted.  So ``emitted_tokens`` = 1 (the prefill's token) + ``accepted_tokens`` +
    the target's own tokens, one per round unless the round was cut.
    """

    rounds: int = 0  # draft-then-verify rounds (target calls after prefill)
    draft_tokens: int = 0  # proposals that fit before max_new_tokens
    accepted_tokens: int = 0  # proposals the target accepted and the output kept
    emitted_tokens: int = 0  # tokens produced: the prefill token + per round the accepted ones and one target token
    accepted_at: list[int] = dataclasses.field(default_factory=list)  # [i]: rounds whose proposal i was accepted
    offered_at: list[int] = dataclasses.field(default_factory=list)  # [i]: rounds whose proposal i counted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Accepted proposals per round (0 .. draft_len)."""
        return self.accepted_tokens / self.rounds if self.rounds else 0.0

    def record_round(self, offered: int, accepted: int) -> None:
        """One round: ``offered`` proposals counted, the first ``accepted`` of them accepted and kept."""
        self.rounds += 1
        self.draft_tokens += offered
        self.accepted_tokens += accepted
        for i in range(offered):
            self.offered_at[i] += 1
            self.accepted_at[i] += i < accepted

    def to_json(self) -> dict:
        return {"rounds": self.rounds, "draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
                "emitted_tokens": self.emitted_tokens, "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_accepted_length": round(self.mean_accepted_length, 4),
                "acceptance_per_position": [round(a / o, 4) if o else 0.0
                                            for a, o in zip(self.accepted_at, self.offered_at)]}


@dataclasses.dataclass
class SpeculativeResult:
    tokens: list[int]  # generated ids (EOS included when it stopped there)
    prompt_length: int
    stop_reason: str  # "eos" or "max_tokens"
    stats: SpeculativeStats
    prefill_s: float
    decode_s: float  # all rounds, including the first (which compiles)
    steady_tokens: int  # tokens emitted after the first round
    steady_s: float  # time of the rounds after the first

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first round (as :attr:`cascade.models.generation.Generation.tokens_per_s`)."""
        return self.steady_tokens / self.steady_s if self.steady_tokens > 0 and self.steady_s > 0 else None


def token_probs(logits: np.ndarray, sampling: SamplingConfig) -> np.ndarray:
    """The sampling distribution (float64, sums to 1) of ``logits`` (..., V) under temperature,
    top-k and top-p (nucleus over the renormalised top-k, as :func:`cascade.models.generation.sample_logits`)."""
    z = np.asarray(logits, np.float64) / sampling.temperature
    z = z - z.max(axis=-1, keepdims=True)
    if sampling.top_k:
        kth = np.sort(z, axis=-1)[..., -min(sampling.top_k, z.shape[-1])][..., None]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        keep_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) < sampling.top_p  # always keeps the first
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def verify_greedy(proposals: list[int], target_logits: np.ndarray) -> tuple[int, int]:
    """``(n_accepted, next_token)`` for greedy decoding; ``target_logits`` (k+1, V)."""
    best = np.argmax(target_logits, axis=-1)
    n = 0
    while n < len(proposals) and proposals[n] == int(best[n]):
        n += 1
    return n, int(best[n])


def verify_sampled(proposals: list[int], draft_probs: np.ndarray, target_probs: np.ndarray,
                   rng: np.random.Generator) -> tuple[int, int]:
    """``(n_accepted, next_token)`` by the speculative-sampling rule; ``draft_probs`` (k, V),
    ``target_probs`` (k+1, V) are the distributions each proposal was drawn from / is judged by."""
    for i, d in enumerate(proposals):
        p, q = target_probs[i, d], draft_probs[i, d]
        if rng.random() * q < p:  # accept with probability min(1, p/q)
            continue
        residual = np.maximum(target_probs[i] - draft_probs[i], 0.0)
        total = residual.sum()
        # total == 0 only if p == q, where rejection has probability 0; guard float noise anyway
        dist = residual / total if total > 0 else target_probs[i]
        return i, int(rng.choice(len(dist), p=dist))
    return len(proposals), int(rng.choice(target_probs.shape[-1], p=target_probs[-1]))


@partial(jax.jit, static_argnames=("cfg", "k"), donate_argnames=("cache",))
def draft_greedy(params, cfg: ModelConfig, chunk, n_feed, start, cache: KVCache, k: int):
    """The greedy proposer in one device call: feed ``chunk`` (1, 2; ``n_feed`` real tokens) at
    ``start``, then propose ``k`` tokens, each fed back in turn (the last one is not fed).
    Returns ``(proposals (k,), cache)``."""
    model = Transformer(cfg)
    cache = cache.replace(lengths=jnp.reshape(start, (1,)))
    logits, cache = model.apply({"params": params}, chunk, start + jnp.arange(2, dtype=jnp.int32)[None, :], cache,
                                jnp.reshape(n_feed, (1,)), last_only=True)
    first = jnp.argmax(logits[0]).astype(jnp.int32)
    proposals = jnp.zeros((k,), jnp.int32).at[0].set(first)

    def step(i, carry):
        proposals, cache = carry
        pos = start + n_feed - 1 + i  # d_i sits right after the pending token (at start + n_feed - 1)
        logits, cache = model.apply({"params": params}, proposals[i - 1][None, None], jnp.reshape(pos, (1, 1)), cache,
                                    None, last_only=True)
        return proposals.at[i].set(jnp.argmax(logits[0]).astype(jnp.int32)), cache

    proposals, cache = jax.lax.fori_loop(1, k, step, (proposals, cache))
    return proposals, cache


def cache_room(n_prompt: int, max_new_tokens: int, draft_len: int, context: int) -> int:
    """Positions each model's KV cache gets: the prompt padded to its prefill bucket, and one round
    of ``draft_len + 1`` past the last token, rounded to a power of two unless that would pass
    the context (a quantized cache further rounds up to whole key groups)."""
    needed = max(n_prompt + max_new_tokens + draft_len + 2, shape_bucket(n_prompt, 16))
    return shape_bucket(needed, 64) if shape_bucket(needed, 64) <= context else needed


def speculative_generate(draft_params, draft_cfg: ModelConfig, target_params, target_cfg: ModelConfig,
                         prompt: list[int], *, max_new_tokens: int, draft_len: int = 4,
                         sampling: SamplingConfig = SamplingConfig(), eos_ids=None,
                         draft_kv: KVSpec | str | None = None, target_kv: KVSpec | str | None = None) -> SpeculativeResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` (ids) with the draft/target pair.

    The two models must share the tokenizer (same vocabulary ids); the draft's vocabulary may not
    be larger than the target's.  ``draft_kv``/``target_kv``: each model's KV cache precision
    (:mod:`cascade.quant.kv`); greedy output equals the target's own greedy output with ``target_kv``.
    """
    if draft_len < 1:
        raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    if draft_cfg.vocab_size > target_cfg.vocab_size:
        raise ValueError(f"the draft vocabulary ({draft_cfg.vocab_size}) is larger than the target's "
                         f"({target_cfg.vocab_size}); the pair must share a tokenizer")
    bad = [t for t in prompt if not 0 <= int(t) < draft_cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {draft_cfg.vocab_size})")
    context = min(draft_cfg.max_seq_len, target_cfg.max_seq_len)
    if len(prompt) >= context:
        raise ValueError(f"the prompt is {len(prompt)} tokens; the context of the pair is {context}, "
                         "so the prompt alone leaves no room to generate: shorten the prompt")
    if len(prompt) + max_new_tokens > context:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max new tokens ({max_new_tokens}) exceeds the context "
                         f"({context}) of the pair; generate at most {context - len(prompt)} tokens")
    eos = set(target_cfg.eos_token_ids if eos_ids is None else eos_ids)
    greedy = sampling.temperature == 0
    rng = np.random.default_rng(sampling.seed)
    vocab, draft_vocab = target_cfg.vocab_size, draft_cfg.vocab_size

    n_prompt = len(prompt)
    t_pad = shape_bucket(n_prompt, 16)
    room = cache_room(n_prompt, max_new_tokens, draft_len, context)
    # a round moves a cache length back by at most draft_len (rejected proposals): size the rings for it
    d_cache = KVCache.create(draft_cfg, 1, room, draft_kv, rewind=draft_len + 1)
    t_cache = KVCache.create(target_cfg, 1, room, target_kv, rewind=draft_len + 1)
    tokens = np.zeros((1, t_pad), np.int32)
    tokens[0, :n_prompt] = prompt
    lengths = np.array([n_prompt], np.int32)

    t0 = time.perf_counter()
    _, d_cache = prefill(draft_params, draft_cfg, tokens, lengths, d_cache)
    t_logits, t_cache = prefill(target_params, target_cfg, tokens, lengths, t_cache)
    first = _pick(np.asarray(t_logits[0]), greedy, sampling, rng)
    t1 = time.perf_counter()

    stats = SpeculativeStats(emitted_tokens=1, accepted_at=[0] * draft_len, offered_at=[0] * draft_len)
    out = [first]
    committed = n_prompt  # tokens in both caches' valid prefix (the pending token is not yet fed)
    pending = first
    draft_behind: int | None = None  # a token the target accepted that the draft never fed (full acceptance)
    while out[-1] not in eos and len(out) < max_new_tokens:
        k = draft_len  # (static: the target call has k + 1 positions)
        # --- proposer: k draft tokens, the first call also catching up on a token it missed
        chunk = [pending] if draft_behind is None else [draft_behind, pending]
        # a target-only token (id past the draft's vocabulary) reaches the draft as id 0: only acceptance suffers
        chunk = [t if t < draft_vocab else 0 for t in chunk]
        d_start = committed - (0 if draft_behind is None else 1)
        proposals, draft_probs = [], []
        feed, n_feed = np.array([chunk + [0] * (2 - len(chunk))], np.int32), len(chunk)
        if greedy:  # one device call for all k proposals
            drafted, d_cache = draft_greedy(draft_params, draft_cfg, jnp.asarray(feed), jnp.int32(n_feed),
                                            jnp.int32(d_start), d_cache, k)
            proposals = [int(t) for t in np.asarray(drafted)]
        else:  # host loop: the verifier needs each proposal's distribution q
            d_cache = d_cache.replace(lengths=jnp.array([d_start], jnp.int32))
            for i in range(k):
                pos = np.arange(feed.shape[1], dtype=np.int32)[None, :] + (d_start if i == 0 else committed + i)
                logits, d_cache = forward_cached(draft_params, draft_cfg, jnp.asarray(feed), jnp.asarray(pos), d_cache,
                                                 jnp.array([n_feed], jnp.int32), last_only=True)
                q = token_probs(np.asarray(logits[0]), sampling)
                tok = int(rng.choice(len(q), p=q))
                draft_probs.append(np.pad(q, (0, vocab - len(q))))
                proposals.append(tok)
                feed, n_feed = np.array([[tok]], np.int32), 1
        # --- scorer: the target over [pending, d_1 .. d_k]
        t_tokens = np.array([[pending, *proposals]], np.int32)
        t_pos = committed + np.arange(k + 1, dtype=np.int32)[None, :]
        t_logits, t_cache = forward_cached(target_params, target_cfg, jnp.asarray(t_tokens), jnp.asarray(t_pos),
                                           t_cache, None)
        t_rows = np.asarray(t_logits[0])
        # --- verifier
        if greedy:
            n_acc, nxt = verify_greedy(proposals, t_rows)
        else:
            n_acc, nxt = verify_sampled(proposals, np.stack(draft_probs), token_probs(t_rows, sampling), rng)
        room = max_new_tokens - len(out)  # tokens this round may still emit (>= 1)
        new = [*proposals[:n_acc], nxt]
        for tok in new:
            out.append(tok)
            if tok in eos or len(out) >= max_new_tokens:
                break
        kept = len(out) - (max_new_tokens - room)  # tokens this round emitted
        stats.record_round(offered=min(k, room), accepted=min(n_acc, kept))
        stats.emitted_tokens = len(out)
        # the valid prefix is now: committed + pending + accepted proposals; nxt is the new pending
        committed += 1 + n_acc
        t_cache = t_cache.replace(lengths=jnp.array([committed], jnp.int32))
        # the draft fed pending, d_1 .. d_{k-1}: it lacks d_k when all k were accepted
        draft_behind = proposals[-1] if n_acc == k else None
        pending = nxt
        if stats.rounds == 1:
            t_round1, n_round1 = time.perf_counter(), len(out)
    t2 = time.perf_counter()
    steady = (len(out) - n_round1, t2 - t_round1) if stats.rounds > 1 else (0, 0.0)
    return SpeculativeResult(tokens=out, prompt_length=n_prompt, stop_reason="eos" if out[-1] in eos else "max_tokens",
                             stats=stats, prefill_s=t1 - t0, decode_s=t2 - t1, steady_tokens=steady[0],
                             steady_s=steady[1])


def _pick(logits: np.ndarray, greedy: bool, sampling: SamplingConfig, rng: np.random.Generator) -> int:
    if greedy:
        return int(np.argmax(logits))
    p = token_probs(logits, sampling)
    return int(rng.choice(len(p), p=p))
