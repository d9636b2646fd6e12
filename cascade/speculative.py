"""Speculative decoding: a small draft model proposes, the large target model verifies.

Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding" (2023);
Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling" (2023).

Each round the draft proposes ``draft_len`` tokens one at a time; the target scores the pending
token and all proposals in one call (``draft_len + 1`` positions) and the verifier accepts a
prefix of them.  The whole round (proposer, scorer, verifier and the cache rewind) is **one jitted
call** on the device (:func:`speculative_round`), greedy or sampled, for a batch of rows at once:
each row has its own cache length, acceptance and rewind, and stops on its own.  Several rounds
run in one device call (:func:`speculative_rounds`, a loop on the device that stops each row at its
EOS or length and exits when all have stopped), and the host reads back the proposals, the accepted
counts and the next tokens once per call, handing the rounds out one by one to the host loop plain
generation uses too (:func:`cascade.models.generation.decode_loop`).

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
extra positions in its ring, so a rewind never loses the window.  Roles follow vLLM: proposer
(:func:`propose`), scorer (the target's chunked forward), verifier (:func:`verify_greedy` /
:func:`verify_sampled`); the sampling transform both models' distributions go through is
:func:`cascade.models.sampling.token_probs`.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cascade.models import decoder
from cascade.models.config import ModelConfig
from cascade.models.decoder import cache_room, prefill, prompt_bucket
from cascade.models.generation import Steps, check_prompts, decode_loop, decode_rate, drain, pad_prompts
from cascade.models.kv_cache import KVCache
from cascade.models.sampling import SamplingConfig, filtered_logits, sample_logits, token_probs
from cascade.models.sharding import cache_like, traced_on_mesh_of
from cascade.quant.dequant_matmul import whole_weights
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
    judged_tokens: int = 0  # spec-cascade: drafted positions the verifier judged (accepted ones + the stopping one)
    deferred_tokens: int = 0  # spec-cascade: of those, the positions the rule deferred to the large model

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

    @property
    def deferral_rate(self) -> float:
        """Spec-cascade: the fraction of judged positions deferred to the large model."""
        return self.deferred_tokens / self.judged_tokens if self.judged_tokens else 0.0

    def to_json(self) -> dict:
        return {"rounds": self.rounds, "draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
                "emitted_tokens": self.emitted_tokens, "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_accepted_length": round(self.mean_accepted_length, 4),
                "acceptance_per_position": [round(a / o, 4) if o else 0.0
                                            for a, o in zip(self.accepted_at, self.offered_at)],
                "judged_tokens": self.judged_tokens, "deferred_tokens": self.deferred_tokens,
                "deferral_rate": round(self.deferral_rate, 4)}


@dataclasses.dataclass
class SpeculativeResult:
    tokens: list[int]  # generated ids (EOS included when it stopped there)
    prompt_length: int
    stop_reason: str  # "eos" or "max_tokens"
    stats: SpeculativeStats
    prefill_s: float
    decode_s: float  # all rounds (compilation included on first use)
    steady_tokens: int  # tokens emitted in the rounds that compiled nothing (compile_count() unchanged)
    steady_s: float  # time of those rounds

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed, compilation excluded: the tokens of the rounds that compiled nothing per second
        of their time (:func:`cascade.models.generation.decode_rate`)."""
        return decode_rate(self.steady_tokens, self.steady_s)


def _offered(k: int, n_offered):
    """(B, k) mask of the proposals each row offered (all when ``n_offered`` is None)."""
    return None if n_offered is None else jnp.arange(k)[None, :] < n_offered[:, None]


def verify_greedy(proposals, target_logits, n_offered=None):
    """``(n_accepted (B,), next_token (B,))`` for greedy decoding: proposals (B, k) are accepted while
    they equal the target's argmax over ``target_logits`` (B, k + 1, V); the target's own argmax
    follows the accepted prefix.  ``n_offered`` (B,): only each row's first proposals count (all by
    default)."""
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # (B, k + 1)
    k = proposals.shape[1]
    ok = proposals == best[:, :k]
    if n_offered is not None:
        ok &= _offered(k, n_offered)
    n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]


def verify_sampled(proposals, draft_probs, target_probs, key, n_offered=None):
    """``(n_accepted (B,), next_token (B,))`` by the speculative-sampling rule: proposal ``d_i ~ q_i``
    is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection the next
    token is drawn from ``norm(max(0, p_i - q_i))``, after all offered proposals are accepted from
    ``p`` at the next position.  ``draft_probs`` (B, k, V) and ``target_probs`` (B, k + 1, V) are the
    distributions each proposal was drawn from / is judged by (the draft's padded with zeros to the
    target's vocabulary); ``n_offered`` (B,): each row offered only its first proposals (all by
    default; the draft's stopping rule may depend on its own distributions, never on the draws)."""
    b, k = proposals.shape
    k_accept, k_next = jax.random.split(key)
    if n_offered is not None:  # a proposal not offered has "q = 0": never accepted, and no residual subtracted
        draft_probs = jnp.where(_offered(k, n_offered)[:, :, None], draft_probs, 0.0)
    d = proposals[:, :, None]
    p_d = jnp.take_along_axis(target_probs[:, :k], d, axis=2)[:, :, 0]
    q_d = jnp.take_along_axis(draft_probs, d, axis=2)[:, :, 0]
    accept = (jax.random.uniform(k_accept, (b, k)) * q_d < p_d) & (q_d > 0)
    n = jnp.sum(jnp.cumprod(accept, axis=1), axis=1).astype(jnp.int32)
    # a zero row at k: after k acceptances the "residual" is p_k itself
    q_full = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)
    p_n = jnp.take_along_axis(target_probs, n[:, None, None], axis=1)[:, 0]
    q_n = jnp.take_along_axis(q_full, n[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)
    total = jnp.sum(residual, axis=-1, keepdims=True)
    # total == 0 only if p == q, where rejection has probability 0; guard float noise anyway
    dist = jnp.where(total > 0, residual, p_n)
    nxt = jax.random.categorical(k_next, jnp.log(dist), axis=-1).astype(jnp.int32)
    return n, nxt


RULES = ("chow", "diff", "opt")  # spec-cascade deferral rules


def deferral(q, p, rule: str, alpha):
    """Token-level deferral of a speculative cascade (Narasimhan et al., "Faster Cascades via
    Speculative Decoding", ICLR 2025): True where the position defers to the large model, from the
    small model's ``q`` and the large model's ``p`` (..., V) at the same position:

    * ``chow``: ``max q < 1 - alpha`` (the small model is not confident);
    * ``diff``: ``max q < max p - alpha`` (the large model is more confident by a margin);
    * ``opt``:  ``max q < max p - alpha * TV(p, q)``, the paper's plug-in approximation of the
      optimal rule (TV: total variation distance).
    """
    mq, mp = jnp.max(q, axis=-1), jnp.max(p, axis=-1)
    if rule == "chow":
        return mq < 1 - alpha
    if rule == "diff":
        return mq < mp - alpha
    if rule == "opt":
        return mq < mp - alpha * 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
    raise ValueError(f"unknown deferral rule {rule!r}; choose from {', '.join(RULES)}")


def _draw(logits, key, greedy: bool, sampling, want_q: bool):
    """One token per row from ``logits`` (B, V) and the distribution it came from: the sampling
    transform's, or for greedy the plain softmax when ``want_q`` (a deferral rule reads it), else None."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jax.nn.softmax(logits, axis=-1) if want_q else None
    z = filtered_logits(logits, *sampling)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32), jax.nn.softmax(z, axis=-1)


def propose(params, cfg: ModelConfig, cache: KVCache, chunk, n_feed, start, key, sampling, *, k: int, greedy: bool,
            want_q: bool = False, limit=None, confidence=None):
    """The proposer: feed ``chunk`` (B, 2; the first ``n_feed`` (B,) real) at ``start`` (B,), then
    draw up to ``k`` tokens, feeding each back in turn but the last.

    Adaptive drafting (``confidence`` given): a row stops drafting at its ``limit`` (B,) proposals
    (default ``k``), or after a proposal the draft was not confident in (the maximum of the
    distribution it drew from below ``confidence``: that token is still offered, since it cost
    nothing more, but no step is spent on the next).  The loop ends when no row drafts on, so a
    round whose rows all stop early runs fewer draft steps.  Returns ``(proposals (B, k),
    q (B, k, V_draft) or None (greedy, unless ``want_q``), n_proposed (B,), n_fed, cache)``:
    proposals past a row's ``n_proposed`` are not offered; ``n_fed`` (scalar) proposals of every
    row went into the cache."""
    logits, cache = decoder.chunk(params, cfg, chunk, decoder.rewind(cache, start), n_feed, last_only=True)
    b = chunk.shape[0]
    keys = jax.random.split(key, k)
    with_q = want_q or not greedy
    limit = jnp.full((b,), k, jnp.int32) if limit is None else jnp.minimum(limit, k)
    tok, q = _draw(logits, keys[0], greedy, sampling, with_q)
    proposals = jnp.zeros((b, k), jnp.int32).at[:, 0].set(tok)
    qs = jnp.zeros((b, k, logits.shape[-1]), jnp.float32).at[:, 0].set(q) if with_q else None
    if confidence is None:  # a fixed length: k - 1 steps, no stopping test
        def step(i, carry):
            proposals, qs, cache = carry
            logits, cache = decoder.step(params, cfg, proposals[:, i - 1], cache)
            tok, q = _draw(logits, keys[i], greedy, sampling, with_q)
            return proposals.at[:, i].set(tok), qs.at[:, i].set(q) if with_q else None, cache

        carry = (proposals, qs, cache)
        for i in range(1, k):  # unrolled: XLA on CPU runs a loop body's ops slower than the same ops inline
            carry = step(i, carry)
        proposals, qs, cache = carry
        return proposals, qs, jnp.minimum(limit, k), jnp.int32(k - 1), cache

    def top(logits, q):  # the draft's confidence: the largest probability of the distribution it drew from
        return jnp.max(q, axis=-1) if with_q else 1.0 / jnp.sum(jnp.exp(logits - jnp.max(logits, -1, keepdims=True)), -1)

    def body(i, carry):
        proposals, qs, cache, n_prop, live, _ = carry
        logits, cache = decoder.step(params, cfg, proposals[:, i - 1], cache)
        tok, q = _draw(logits, keys[i], greedy, sampling, with_q)
        proposals = proposals.at[:, i].set(tok)
        qs = qs.at[:, i].set(q) if with_q else None
        n_prop = n_prop + live.astype(jnp.int32)  # a live row offers the token it drew ...
        live = live & (top(logits, q) >= confidence) & (i + 1 < limit)  # ... and goes on only if it was sure of it
        return proposals, qs, cache, n_prop, live, jnp.int32(i)

    live = (top(logits, q) >= confidence) & (1 < limit)
    carry = (proposals, qs, cache, jnp.ones((b,), jnp.int32), live, jnp.int32(0))
    for i in range(1, k):  # unrolled (see above); a step runs only while some row drafts on
        carry = jax.lax.cond(jnp.any(carry[4]), partial(body, i), lambda c: c, carry)
    proposals, qs, cache, n_prop, _, n_fed = carry
    return proposals, qs, n_prop, n_fed, cache


class RoundState(NamedTuple):
    """What the rows carry from one speculative round to the next (a pytree: the jitted round takes
    and returns it whole, and its buffers are donated)."""

    d_cache: KVCache  # the draft's cache
    t_cache: KVCache  # the target's cache; its lengths are ``committed``, the positions both models agree on
    pending: jax.Array  # (B,) the last emitted token, in neither cache yet
    behind: jax.Array  # (B,) a token at ``committed - 1`` the draft has not fed (after a fully accepted round), or -1
    key: jax.Array  # the PRNG key of the next round


class Round(NamedTuple):
    """What one round decided for each row (the host reads these back)."""

    proposals: jax.Array  # (B, k) the draft's tokens
    n_proposed: jax.Array  # (B,) how many of them the row offered
    n_accepted: jax.Array  # (B,) how many of them the verifier accepted
    token: jax.Array  # (B,) the target's token after the accepted ones (the next round's ``pending``)
    deferred: jax.Array  # (B, k) the rule's verdict per drafted position (all True when exact)


def _round(draft_params, draft_cfg: ModelConfig, target_params, target_cfg: ModelConfig, state: RoundState,
           active, sampling, alpha=0.0, confidence=0.0, *, k: int, greedy: bool, rule: str | None = None,
           adaptive: bool = False) -> tuple[Round, RoundState]:
    """One draft-score-verify round for a batch of rows, in one device call.

    ``rule`` None: exact speculative decoding.  A :func:`deferral` rule (with ``alpha``) makes it a
    *speculative cascade*: each drafted position is judged against ``pi = q`` where the rule keeps
    the small model and ``pi = p`` where it defers (greedy: a kept position accepts the draft's
    token, a deferred one needs the large model's argmax), so the output follows that mixture
    rather than ``p``; the token after the accepted proposals comes from ``p``.

    Adaptive drafting (``adaptive``, :func:`propose`): a row drafts up to ``k`` tokens but stops
    after one the draft's confidence (its maximum probability) was below ``confidence``, so easy
    text gets long drafts and hard text short ones (the threshold is a device scalar: changing it
    compiles nothing).  Otherwise every row drafts ``k``.

    ``state``: the rows' :class:`RoundState`; ``active`` (B,) rows still generating (a finished row
    keeps its state).  ``sampling``: ``(temperature, top_k, top_p)`` device scalars.

    Returns the :class:`Round` and the next state: the caches rewound to the accepted prefix
    (``committed + 1 + n_accepted``; the draft one short when it accepted a proposal it never fed,
    ``behind`` then holds it), ``pending`` the round's token.
    """
    with whole_weights():
        d_cache, proposals, q, n_prop, n_fed, start, key, k_verify = _draft_part(
            draft_params, draft_cfg, state.d_cache, state.t_cache.lengths, state.pending, state.behind, active,
            state.key, sampling, confidence, k=k, greedy=greedy, want_q=rule is not None, adaptive=adaptive)
    n_acc, nxt, deferred, t_cache = _verify_part(
        target_params, target_cfg, state.t_cache, state.pending, proposals, q, n_prop, active, k_verify, sampling,
        alpha, k=k, greedy=greedy, rule=rule, adaptive=adaptive)
    behind, d_cache = _draft_rewind(d_cache, t_cache.lengths, proposals, n_acc, n_fed, start, active, state.behind)
    return Round(proposals, n_prop, n_acc, nxt, deferred), RoundState(d_cache, t_cache, nxt, behind, key)


# under the target's mesh (set before tracing: part of jit's cache key); the draft in it is a
# replicated copy (whole_weights above)
speculative_round = traced_on_mesh_of(2)(jax.jit(
    _round, static_argnames=("draft_cfg", "target_cfg", "k", "greedy", "rule", "adaptive"), donate_argnames=("state",)))


ROUNDS_PER_CALL = 8  # speculative_stream: rounds run by one device call (rounds_per_call)


def room_after(room, proposals, n_acc, token, eos):
    """Each row's room after a round (``room`` (B,) tokens it may still emit, 0 for a stopped row):
    the round emits the accepted proposals and the target's token, up to the room or the first id
    in ``eos`` (then the row stops, room 0).  The same rule as the host loop's
    (:func:`cascade.models.generation.decode_loop`), so a device loop over rounds stops each row
    exactly where the host would."""
    k = proposals.shape[1]
    idx = jnp.arange(k + 1)[None, :]
    seq = jnp.where(idx < n_acc[:, None], jnp.pad(proposals, ((0, 0), (0, 1))), token[:, None])
    n_emit = jnp.minimum(n_acc + 1, room)
    hit = jnp.any(jnp.isin(seq, eos) & (idx < n_emit[:, None]), axis=1)
    return jnp.where((room > 0) & ~hit, room - n_emit, 0)


@traced_on_mesh_of(2)
@partial(jax.jit, static_argnames=("draft_cfg", "target_cfg", "k", "greedy", "rule", "adaptive", "rounds"),
         donate_argnames=("state",))
def speculative_rounds(draft_params, draft_cfg: ModelConfig, target_params, target_cfg: ModelConfig,
                       state: RoundState, room, eos, sampling, alpha=0.0, confidence=0.0, *, k: int, greedy: bool,
                       rule: str | None = None, adaptive: bool = False, rounds: int = ROUNDS_PER_CALL):
    """Up to ``rounds`` rounds of :func:`speculative_round` in one device call: a loop on the device
    that runs the rows with room left (``room`` (B,): tokens each row may still emit, 0 for a
    stopped row; a row stops at an id in ``eos`` or when its room runs out, :func:`room_after`) and
    exits early once every row has stopped.  The host reads the rounds back once per call instead
    of once per round: on small models a round's dispatch and read-back cost as much as its work.

    Returns ``(Round of (rounds, B, ...) arrays, rounds run, state)``; the rounds are the ones
    :func:`speculative_round` would decide one call at a time, in order (the same PRNG splits)."""
    batch = room.shape[0]
    out = Round(jnp.zeros((rounds, batch, k), jnp.int32), jnp.zeros((rounds, batch), jnp.int32),
                jnp.zeros((rounds, batch), jnp.int32), jnp.zeros((rounds, batch), jnp.int32),
                jnp.zeros((rounds, batch, k), bool))

    def cond(carry):
        r, room, _, _ = carry
        return (r < rounds) & jnp.any(room > 0)

    def body(carry):
        r, room, state, out = carry
        decided, state = _round(draft_params, draft_cfg, target_params, target_cfg, state, room > 0, sampling,
                                alpha, confidence, k=k, greedy=greedy, rule=rule, adaptive=adaptive)
        decided = decided._replace(proposals=decided.proposals.astype(jnp.int32),
                                   n_proposed=jnp.broadcast_to(decided.n_proposed, (batch,)).astype(jnp.int32),
                                   n_accepted=decided.n_accepted.astype(jnp.int32),
                                   token=decided.token.astype(jnp.int32))
        out = jax.tree.map(lambda buf, x: buf.at[r].set(x), out, decided)
        return r + 1, room_after(room, decided.proposals, decided.n_accepted, decided.token, eos), state, out

    r, _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), room.astype(jnp.int32), state, out))
    return out, r, state


# The round's three parts: one jit above (one device call when both models share the devices), or
# three calls (:func:`split_round`) when the draft has devices of its own.

def _draft_part(draft_params, draft_cfg, d_cache, committed, pending, behind, active, key, sampling, confidence, *,
                k, greedy, want_q, adaptive):
    """The draft side of a round: feed what the draft has not seen, propose up to ``k`` tokens."""
    draft_vocab = draft_cfg.vocab_size
    has_behind = behind >= 0
    start = committed - has_behind.astype(jnp.int32)
    chunk = jnp.where(has_behind[:, None], jnp.stack([behind, pending], axis=1),
                      jnp.stack([pending, jnp.zeros_like(pending)], axis=1))
    chunk = jnp.where(chunk < draft_vocab, chunk, 0)  # a target-only id reaches the draft as 0: only acceptance suffers
    key, k_draft, k_verify = jax.random.split(key, 3)
    proposals, q, n_prop, n_fed, d_cache = propose(
        draft_params, draft_cfg, d_cache, chunk, 1 + has_behind.astype(jnp.int32), start, k_draft, sampling, k=k,
        greedy=greedy, want_q=want_q, limit=jnp.where(active, k, 1), confidence=confidence if adaptive else None)
    return d_cache, proposals, q, n_prop, n_fed, start, key, k_verify


def _verify_part(target_params, target_cfg, t_cache, pending, proposals, q, n_prop, active, k_verify, sampling, alpha, *,
                 k, greedy, rule, adaptive):
    """The target side of a round: score the proposals, accept a prefix, rewind the target's cache."""
    committed = t_cache.lengths
    offered = _offered(k, n_prop)
    # scorer: the target over [pending, d_1 .. d_k]; adaptive rounds score only as far as the longest
    # draft (the next of a few static lengths): a verification's cost grows with its positions
    sizes = verify_sizes(k) if adaptive else (k,)

    def score(size):
        def call(cache):
            logits, cache = decoder.chunk(target_params, target_cfg,
                                          jnp.concatenate([pending[:, None], proposals[:, :size]], axis=1), cache)
            return jnp.pad(logits, ((0, 0), (0, k - size), (0, 0))), cache  # rows past a draft are never read
        return call

    if len(sizes) == 1:
        t_logits, t_cache = score(k)(t_cache)
    else:
        longest = jnp.max(jnp.where(active, n_prop, 1))
        t_logits, t_cache = jax.lax.switch(jnp.searchsorted(jnp.asarray(sizes), longest), [score(n) for n in sizes],
                                           t_cache)
    vocab = t_logits.shape[-1]
    if q is not None:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, vocab - q.shape[-1])))
    if rule is None:
        deferred = jnp.ones(proposals.shape, bool)
        if greedy:
            n_acc, nxt = verify_greedy(proposals, t_logits, n_prop)
        else:
            n_acc, nxt = verify_sampled(proposals, q, token_probs(t_logits, *sampling), k_verify, n_prop)
    else:
        p = jax.nn.softmax(t_logits, axis=-1) if greedy else token_probs(t_logits, *sampling)
        deferred = deferral(q, p[:, :k], rule, alpha)
        if greedy:
            best = jnp.argmax(t_logits, axis=-1).astype(jnp.int32)
            ok = (~deferred | (proposals == best[:, :k])) & offered
            n_acc = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
            nxt = jnp.take_along_axis(best, n_acc[:, None], axis=1)[:, 0]  # a rejection only happens where it deferred
        else:
            pi = jnp.where(deferred[:, :, None], p[:, :k], q)
            n_acc, nxt = verify_sampled(proposals, q, jnp.concatenate([pi, p[:, k:]], axis=1), k_verify, n_prop)
    new_committed = jnp.where(active, committed + 1 + n_acc, committed)
    return n_acc, nxt, deferred, decoder.rewind(t_cache, new_committed)


def _draft_rewind(d_cache, new_committed, proposals, n_acc, n_fed, start, active, behind):
    """The draft's cache rewound to the accepted prefix (one short when it accepted a proposal it
    never fed: ``behind`` then holds it)."""
    unfed = n_acc > n_fed  # accepted a proposal the draft never fed (its last, when it drafted to the end)
    d_len = jnp.where(active, jnp.where(unfed, new_committed - 1, new_committed), start)
    behind = jnp.where(active, jnp.where(unfed, jnp.take_along_axis(proposals, jnp.maximum(n_acc - 1, 0)[:, None],
                                                                    axis=1)[:, 0], -1), behind)
    return behind, decoder.rewind(d_cache, d_len)


_draft_jit = traced_on_mesh_of(0)(jax.jit(_draft_part, static_argnames=("draft_cfg", "k", "greedy", "want_q", "adaptive"),
                                          donate_argnames=("d_cache",)))
_verify_jit = traced_on_mesh_of(0)(jax.jit(_verify_part, static_argnames=("target_cfg", "k", "greedy", "rule", "adaptive"),
                                           donate_argnames=("t_cache",)))
_rewind_jit = jax.jit(_draft_rewind, donate_argnames=("d_cache",))


def devices_of(tree) -> frozenset:
    """The devices ``tree``'s arrays live on."""
    return frozenset(d for a in jax.tree.leaves(tree) if isinstance(a, jax.Array) for d in a.sharding.device_set)


def split_round(draft_params, draft_cfg: ModelConfig, target_params, target_cfg: ModelConfig, state: RoundState,
                active, sampling, alpha=0.0, confidence=0.0, *, k: int, greedy: bool, rule: str | None = None,
                adaptive: bool = False) -> tuple[Round, RoundState]:
    """:func:`speculative_round` as three device calls, for a draft on devices of its own
    (``--small-devices``): the draft proposes on its devices, the proposals (and the draft's
    probabilities when the verification needs them) move to the target's devices, which verify,
    and the accepted count moves back for the draft's rewind.  The same functions as the one-call
    round, so the same tokens; what moves between the device sets is a few (B, k) arrays."""
    from jax.sharding import NamedSharding, PartitionSpec

    def onto(params, tree):
        mesh = jax.tree.leaves(params)[0].sharding.mesh
        return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))

    d_in = onto(draft_params, (state.t_cache.lengths, state.pending, state.behind, active, state.key, sampling,
                               confidence))
    d_cache, proposals, q, n_prop, n_fed, start, key, k_verify = _draft_jit(
        draft_params, draft_cfg, state.d_cache, *d_in, k=k, greedy=greedy, want_q=rule is not None, adaptive=adaptive)
    t_in = onto(target_params, (state.pending, proposals, q, n_prop, active, k_verify, sampling, alpha))
    n_acc, nxt, deferred, t_cache = _verify_jit(target_params, target_cfg, state.t_cache, *t_in, k=k, greedy=greedy,
                                                 rule=rule, adaptive=adaptive)
    back = onto(draft_params, (t_cache.lengths, n_acc))
    behind, d_cache = _rewind_jit(d_cache, back[0], proposals, back[1], n_fed, start, d_in[3], d_in[2])
    return Round(proposals, n_prop, n_acc, nxt, deferred), RoundState(d_cache, t_cache, nxt, behind, key)


AUTO_DRAFT_LEN = 8  # draft_len="auto": draft up to this many tokens per round ...
AUTO_CONFIDENCE = 0.5  # ... stopping after a token whose draft probability was below this


def draft_setting(draft_len: int | str = 4, draft_confidence: float | None = None) -> tuple[int, float]:
    """``(k, confidence)`` of a round from the user's settings: ``draft_len`` a number of tokens, or
    ``"auto"`` (up to :data:`AUTO_DRAFT_LEN`, stopping at draft confidence :data:`AUTO_CONFIDENCE`);
    ``draft_confidence`` overrides the stopping confidence (0: draft all ``k``, the default for a
    fixed length)."""
    if isinstance(draft_len, str) and draft_len.strip().lower() == "auto":
        k, conf = AUTO_DRAFT_LEN, AUTO_CONFIDENCE
    else:
        try:
            k, conf = int(draft_len), 0.0
        except (TypeError, ValueError):
            raise ValueError(f"draft_len must be a number of tokens or 'auto', got {draft_len!r}") from None
        if k != draft_len and str(k) != str(draft_len).strip():
            raise ValueError(f"draft_len must be a whole number of tokens or 'auto', got {draft_len!r}")
        if not 1 <= k <= 32:
            raise ValueError(f"draft_len must be between 1 and 32 tokens (or 'auto'), got {draft_len!r}")
    if draft_confidence is not None:
        conf = float(draft_confidence)
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"draft_confidence must be in [0, 1], got {conf}")
    return k, conf


def verify_sizes(k: int) -> tuple[int, ...]:
    """The draft lengths an adaptive round of up to ``k`` proposals verifies at (powers of two, and
    ``k``): a round whose longest draft is ``n`` scores the first size >= ``n``."""
    return tuple(sorted({n for n in (1, 2, 4, 8, 16) if n < k} | {k}))


def speculative_generate(draft_params, draft_cfg: ModelConfig, target_params, target_cfg: ModelConfig,
                         prompt: list[int], *, max_new_tokens: int, draft_len: int | str = 4,
                         sampling: SamplingConfig = SamplingConfig(), eos_ids=None,
                         draft_kv: KVSpec | str | None = None, target_kv: KVSpec | str | None = None,
                         rule: str | None = None, alpha: float = 0.0,
                         draft_confidence: float | None = None) -> SpeculativeResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` (ids) with the draft/target pair: one row
    of :func:`speculative_generate_batch`."""
    return speculative_generate_batch(draft_params, draft_cfg, target_params, target_cfg, [prompt],
                                      max_new_tokens=max_new_tokens, draft_len=draft_len, sampling=sampling,
                                      eos_ids=eos_ids, draft_kv=draft_kv, target_kv=target_kv, rule=rule,
                                      alpha=alpha, draft_confidence=draft_confidence)[0]


def speculative_generate_batch(draft_params, draft_cfg: ModelConfig, target_params, target_cfg: ModelConfig,
                               prompts: list[list[int]], **kwargs) -> list[SpeculativeResult]:
    """Generate up to ``max_new_tokens`` after each prompt (lists of ids) with the draft/target pair,
    the rows together (each its own lengths, acceptance, rewinds and stop): :func:`speculative_stream`
    run to its end (same keyword arguments)."""
    return drain(speculative_stream(draft_params, draft_cfg, target_params, target_cfg, prompts, **kwargs))


def speculative_stream(draft_params, draft_cfg: ModelConfig, target_params, target_cfg: ModelConfig,
                       prompts: list[list[int]], *, max_new_tokens: int, draft_len: int | str = 4,
                       sampling: SamplingConfig = SamplingConfig(), eos_ids=None,
                       draft_kv: KVSpec | str | None = None, target_kv: KVSpec | str | None = None,
                       rule: str | None = None, alpha: float = 0.0, draft_confidence: float | None = None,
                       rounds_per_call: int = ROUNDS_PER_CALL):
    """A generator: after the prefill and after every round it yields the tokens each row emitted
    (``list[list[int]]``, empty for a finished row); it returns the list of
    :class:`SpeculativeResult` (``StopIteration.value``; :func:`drain` runs it to the end).

    The two models must share the tokenizer (same vocabulary ids); the draft's vocabulary may not
    be larger than the target's.  ``draft_kv``/``target_kv``: each model's KV cache precision
    (:mod:`cascade.quant.kv`); greedy output equals the target's own greedy output with ``target_kv``.
    ``rule``/``alpha``: a speculative cascade (:func:`speculative_round`, :func:`deferral`) instead of
    exact speculation; ``alpha`` in [0, 1].  ``draft_len``/``draft_confidence``: how many tokens the
    draft proposes per round (:func:`draft_setting`; ``"auto"``: adaptive).  ``rounds_per_call``: rounds
    run by one device call (:func:`speculative_rounds`; 1: a call and a read-back per round); the
    tokens are the same either way, the rounds are yielded one by one as they are read back.
    """
    if rule is not None and rule not in RULES:
        raise ValueError(f"unknown deferral rule {rule!r}; choose from {', '.join(RULES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    k, confidence = draft_setting(draft_len, draft_confidence)
    if draft_cfg.vocab_size > target_cfg.vocab_size:
        raise ValueError(f"the draft vocabulary ({draft_cfg.vocab_size}) is larger than the target's "
                         f"({target_cfg.vocab_size}); the pair must share a tokenizer")
    context = min(draft_cfg.max_seq_len, target_cfg.max_seq_len)
    check_prompts(prompts, max_new_tokens, draft_cfg.vocab_size, context, "the context of the pair")
    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    longest = int(lengths.max())
    room = cache_room(longest, max_new_tokens, k, context)
    tokens = pad_prompts(prompts, prompt_bucket(longest))
    params = sampling.arrays()
    stats = [SpeculativeStats(accepted_at=[0] * k, offered_at=[0] * k) for _ in range(batch)]
    # a round moves a cache length back by at most draft_len (rejected proposals): size the rings for it
    state = RoundState(d_cache=cache_like(draft_params, KVCache.create(draft_cfg, batch, room, draft_kv, rewind=k + 1)),
                       t_cache=cache_like(target_params, KVCache.create(target_cfg, batch, room, target_kv, rewind=k + 1)),
                       pending=None, behind=jnp.full((batch,), -1, jnp.int32), key=jax.random.key(sampling.seed))
    decided_rounds: list[Round] = []  # rounds read back to the host and not yet accounted (oldest first)
    # a draft on devices of its own (--small-devices) runs its side of each round there, one round a call
    draft_devices, target_devices = devices_of(draft_params), devices_of(target_params)
    own = draft_devices and target_devices and draft_devices.isdisjoint(target_devices)
    round_fn = split_round if own else speculative_round
    per_call = 1 if own else max(1, int(rounds_per_call))
    stop_ids = jnp.asarray(sorted(set(target_cfg.eos_token_ids if eos_ids is None else eos_ids)), jnp.int32)

    def first():  # both prefills; the first token is the target's
        nonlocal state
        _, d_cache = prefill(draft_params, draft_cfg, tokens, lengths, state.d_cache)
        t_logits, t_cache = prefill(target_params, target_cfg, tokens, lengths, state.t_cache)
        key, sub = jax.random.split(state.key)
        tokens0 = np.asarray(sample_logits(t_logits, sub, *params))
        state = state._replace(d_cache=d_cache, t_cache=t_cache, pending=jnp.asarray(tokens0, jnp.int32), key=key)
        return tokens0.tolist()

    def step(room):  # rounds: each live row's accepted proposals, then the target's token
        nonlocal state
        if per_call > 1:  # several rounds in one device call, handed out one by one (decode_loop's Steps)
            decided, ran, state = speculative_rounds(
                draft_params, draft_cfg, target_params, target_cfg, state, jnp.asarray(room, jnp.int32), stop_ids,
                params, jnp.float32(alpha), jnp.float32(confidence), k=k, greedy=sampling.greedy, rule=rule,
                adaptive=confidence > 0, rounds=per_call)
            decided, ran = jax.device_get((decided, ran))
            rounds = [Round(*(np.asarray(a[r]) for a in decided)) for r in range(int(ran))]
        else:
            active = jnp.asarray([n > 0 for n in room])
            decided, state = round_fn(draft_params, draft_cfg, target_params, target_cfg, state, active, params,
                                      jnp.float32(alpha), jnp.float32(confidence), k=k, greedy=sampling.greedy,
                                      rule=rule, adaptive=confidence > 0)
            rounds = [Round(*(np.asarray(a) for a in decided))]
        decided_rounds.extend(rounds)
        return Steps([[*r.proposals[i, :n].tolist(), int(t)] for i, (n, t) in enumerate(zip(r.n_accepted, r.token))]
                     for r in rounds)

    def account(kept, room):  # the round's counters, over the proposals that could still be emitted
        last = decided_rounds.pop(0)  # decode_loop accounts each round once, in order
        for i, (n_kept, n_room) in enumerate(zip(kept, room)):
            if n_room == 0:
                continue
            n, offered = int(last.n_accepted[i]), int(last.n_proposed[i])
            stats[i].record_round(offered=min(offered, n_room), accepted=min(n, n_kept))
            if rule is not None:  # positions the verifier judged: the accepted ones and the one that stopped it
                judged = min(n + 1, offered, n_room)
                stats[i].judged_tokens += judged
                stats[i].deferred_tokens += int(last.deferred[i, :judged].sum())

    done = yield from decode_loop(first, step, max_new_tokens=max_new_tokens,
                                  eos=target_cfg.eos_token_ids if eos_ids is None else eos_ids, account=account)
    for st, row in zip(stats, done.tokens):
        st.emitted_tokens = len(row)
    return [SpeculativeResult(tokens=row, prompt_length=int(n), stop_reason=stop, stats=st, prefill_s=done.prefill_s,
                              decode_s=done.decode_s, steady_tokens=steady, steady_s=done.steady_s)
            for row, n, stop, st, steady in zip(done.tokens, lengths, done.stop_reasons, stats, done.steady_tokens)]
