"""Continuous batching: rows join a running batch and leave it at step (or round) boundaries.

A :class:`SlotBatch` holds ``slots`` rows of one kind (a mode and its sampling settings, which the
jitted step takes as device scalars shared by the rows) in KV caches of ``ctx`` positions per row,
allocated once.  :meth:`SlotBatch.add` prefills a new prompt alone (a one-row cache, the same
program as any one-prompt run) and writes that row into a free slot of the running caches;
:meth:`SlotBatch.step` runs one decode step (``large``/``small``) or one speculative round
(``speculative``/``spec-cascade``) over every slot, with free slots masked out (a speculative round
leaves an inactive row's state untouched; a plain step's free rows are reset to length 0), and
returns the tokens each live row emitted; :meth:`SlotBatch.remove` frees a slot (a finished row, or
a client that went away).  Each row stops at its own EOS or ``max_new_tokens``.

Rows never see each other: attention, the kernels' row results (tested bit for bit alone and with
others) and a speculative row's acceptance are per row, so greedy output equals the same prompt run
alone (``tests/cascade/test_batching.py``).  Sampled rows share the batch's random stream, so a
sampled row's draw depends on its neighbours; a request that must be reproducible from its seed
runs in a batch of its own (the server does that).

The server (:mod:`cascade.server`) keeps one running batch and a queue; ``defer`` (which answers
only once the small model's whole answer is scored) is not joinable and runs through
:func:`cascade.pair.generate_batch`.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cascade.models.config import ModelConfig
from cascade.models.decoder import prefill, prompt_bucket
from cascade.models.generation import _decode_and_sample, pad_prompts
from cascade.models.kv_cache import KVCache
from cascade.models.sampling import SamplingConfig, sample_logits
from cascade.models.sharding import cache_like
from cascade.pair import SPECULATIVE, ModelPair, cascade_rule
from cascade.speculative import RoundState, SpeculativeStats, draft_setting, speculative_round

JOINABLE = ("large", "small", "speculative", "spec-cascade")


def room_for(ctx: int, n_prompt: int, mode: str, draft_len: int) -> int:
    """The most new tokens a prompt of ``n_prompt`` tokens may ask for in caches of ``ctx`` positions
    (0: the prompt itself does not fit): its padded prefill must fit, and the prompt, the answer and
    (in a speculative mode) one round's ``draft_len + 2`` positions past the last token."""
    if prompt_bucket(n_prompt) > ctx:
        return 0
    extra = draft_len + 2 if mode in SPECULATIVE else 0
    return max(0, ctx - n_prompt - extra)


@dataclasses.dataclass
class Row:
    """One request's row: its prompt ids, what it has emitted, and why it stopped (None: running)."""

    ids: list[int]
    max_new_tokens: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    stop: str | None = None  # "eos", "max_tokens" (or the caller's own reason, e.g. a stop sequence)
    stats: SpeculativeStats | None = None


@partial(jax.jit, donate_argnums=(0,))
def _put_rows(big, rows, start):
    """``big`` (a cache or state of ``slots`` rows) with rows ``start ..`` replaced by ``rows``' rows.
    Leaf by leaf: a quantized cache's static metadata names its batch size, so the two trees differ
    in structure though not in leaves."""
    leaves, tree = jax.tree.flatten(big)
    news = jax.tree.leaves(rows)
    return tree.unflatten([jax.lax.dynamic_update_slice_in_dim(b, o.astype(b.dtype), start, axis=0)
                           for b, o in zip(leaves, news, strict=True)])


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _slots_step(params, cfg: ModelConfig, tokens, cache: KVCache, key, active, temperature, top_k, top_p):
    """One decode step of every slot; free slots' lengths go back to 0 (they never grow past the cache)."""
    tokens, key, cache = _decode_and_sample(params, cfg, tokens, cache, key, temperature, top_k, top_p)
    return tokens, key, cache.replace(lengths=jnp.where(active, cache.lengths, 0))


class SlotBatch:
    """A running batch of up to ``slots`` rows of one mode and sampling setting (module docs).

    ``settings``: ``draft_len``, ``draft_confidence``, ``rule``, ``alpha``, ``small_kv``, ``large_kv``
    (as :func:`cascade.pair.stream_batch`); ``eos``: the ids a row stops at.
    """

    def __init__(self, pair: ModelPair, mode: str, *, slots: int, ctx: int, sampling: SamplingConfig, eos,
                 key=None, draft_len: int | str = 4, draft_confidence: float | None = None, rule: str = "chow",
                 alpha: float = 0.1, small_kv: str | None = None, large_kv: str | None = None, **_ignored):
        if mode not in JOINABLE:
            raise ValueError(f"mode {mode!r} does not run in a continuous batch; joinable: {', '.join(JOINABLE)}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.mode, self.slots, self.ctx, self.sampling, self.eos = mode, slots, ctx, sampling, set(eos)
        self.rows: list[Row | None] = [None] * slots
        self._params = sampling.arrays()
        key = jax.random.key(sampling.seed) if key is None else key
        if mode in SPECULATIVE:
            self.k, self.confidence = draft_setting(draft_len, draft_confidence)
            rule_args = cascade_rule(mode, rule, alpha)
            self.rule, self.alpha = rule_args.get("rule"), rule_args.get("alpha", 0.0)
            self.draft, self.target = pair.small, pair.large
            self.kv = (small_kv, large_kv)
            d = cache_like(self.draft.params, KVCache.create(self.draft.config, slots, ctx, small_kv, rewind=self.k + 1))
            t = cache_like(self.target.params, KVCache.create(self.target.config, slots, ctx, large_kv, rewind=self.k + 1))
            self.state = RoundState(d_cache=d, t_cache=t, pending=jnp.zeros((slots,), jnp.int32),
                                    behind=jnp.full((slots,), -1, jnp.int32), key=key)
        else:
            self.model = pair.large if mode == "large" else pair.small
            self.kv = large_kv if mode == "large" else small_kv
            self.cache = cache_like(self.model.params, KVCache.create(self.model.config, slots, ctx, self.kv))
            self.tokens = jnp.zeros((slots,), jnp.int32)
            self.key = key

    def grow(self, slots: int) -> None:
        """Make room for ``slots`` rows (more than now): new caches, the running rows copied into their
        first rows.  A batch starts as small as its first rows need and grows as more join, so a lone
        request does not pay for the rows it does not use (each size compiles its own step)."""
        if slots <= self.slots:
            return
        extra = slots - self.slots
        if self.mode in SPECULATIVE:
            s = self.state
            d = cache_like(self.draft.params, KVCache.create(self.draft.config, slots, self.ctx, self.kv[0], rewind=self.k + 1))
            t = cache_like(self.target.params, KVCache.create(self.target.config, slots, self.ctx, self.kv[1], rewind=self.k + 1))
            self.state = RoundState(d_cache=_put_rows(d, s.d_cache, 0), t_cache=_put_rows(t, s.t_cache, 0),
                                    pending=jnp.concatenate([s.pending, jnp.zeros((extra,), jnp.int32)]),
                                    behind=jnp.concatenate([s.behind, jnp.full((extra,), -1, jnp.int32)]), key=s.key)
        else:
            m = self.model
            cache = cache_like(m.params, KVCache.create(m.config, slots, self.ctx, self.kv))
            self.cache = _put_rows(cache, self.cache, 0)
            self.tokens = jnp.concatenate([self.tokens, jnp.zeros((extra,), jnp.int32)])
        self.rows += [None] * extra
        self.slots = slots

    # ----------------------------------------------------------------------------------- rows

    @property
    def live(self) -> int:
        return sum(r is not None for r in self.rows)

    def free(self) -> int:
        return self.slots - self.live

    def room_for(self, n_prompt: int) -> int:
        """The most new tokens a prompt of ``n_prompt`` tokens may ask for in this batch's caches
        (:func:`room_for`)."""
        return room_for(self.ctx, n_prompt, self.mode, self.k if self.mode in SPECULATIVE else 0)

    def add(self, ids: list[int], max_new_tokens: int) -> tuple[int, list[int]]:
        """Prefill ``ids`` into a free slot; returns (slot, the tokens it emitted: its first)."""
        if not ids:
            raise ValueError("an empty prompt cannot run")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens > self.room_for(len(ids)):
            raise ValueError(f"the prompt ({len(ids)} tokens) and max_tokens ({max_new_tokens}) do not fit the "
                             f"context of {self.ctx} positions")
        slot = self.rows.index(None)  # ValueError when full: callers check free() first
        tokens = pad_prompts([ids], prompt_bucket(len(ids)))
        lengths = np.asarray([len(ids)], np.int32)
        p = self._params
        if self.mode in SPECULATIVE:
            d1 = cache_like(self.draft.params, KVCache.create(self.draft.config, 1, self.ctx, self.kv[0], rewind=self.k + 1))
            t1 = cache_like(self.target.params, KVCache.create(self.target.config, 1, self.ctx, self.kv[1], rewind=self.k + 1))
            _, d1 = prefill(self.draft.params, self.draft.config, tokens, lengths, d1)
            logits, t1 = prefill(self.target.params, self.target.config, tokens, lengths, t1)
            key, sub = jax.random.split(self.state.key)
            first = int(np.asarray(sample_logits(logits, sub, *p))[0])
            s = self.state
            self.state = RoundState(d_cache=_put_rows(s.d_cache, d1, slot), t_cache=_put_rows(s.t_cache, t1, slot),
                                    pending=s.pending.at[slot].set(first), behind=s.behind.at[slot].set(-1), key=key)
            stats = SpeculativeStats(accepted_at=[0] * self.k, offered_at=[0] * self.k)
        else:
            m = self.model
            c1 = cache_like(m.params, KVCache.create(m.config, 1, self.ctx, self.kv))
            logits, c1 = prefill(m.params, m.config, tokens, lengths, c1)
            self.key, sub = jax.random.split(self.key)
            first = int(np.asarray(sample_logits(logits, sub, *p))[0])
            self.cache = _put_rows(self.cache, c1, slot)
            self.tokens = self.tokens.at[slot].set(first)
            stats = None
        row = Row(ids=list(ids), max_new_tokens=max_new_tokens, tokens=[first], stats=stats)
        self._check_stop(row)
        self.rows[slot] = row
        return slot, [first]

    def remove(self, slot: int) -> Row:
        """Free ``slot``; returns its row."""
        row, self.rows[slot] = self.rows[slot], None
        return row

    def _check_stop(self, row: Row) -> None:
        if row.stop is None:
            if row.tokens and row.tokens[-1] in self.eos:
                row.stop = "eos"
            elif len(row.tokens) >= row.max_new_tokens:
                row.stop = "max_tokens"

    # ----------------------------------------------------------------------------------- steps

    def step(self) -> dict[int, list[int]]:
        """One step (or round) of every running row; returns ``{slot: tokens emitted}`` for the rows
        that were running (a row that stopped keeps its slot until :meth:`remove`)."""
        running = [i for i, r in enumerate(self.rows) if r is not None and r.stop is None]
        if not running:
            return {}
        active = np.zeros(self.slots, bool)
        active[running] = True
        if self.mode in SPECULATIVE:
            decided, self.state = speculative_round(
                self.draft.params, self.draft.config, self.target.params, self.target.config, self.state,
                jnp.asarray(active), self._params, jnp.float32(self.alpha), jnp.float32(self.confidence), k=self.k,
                greedy=self.sampling.greedy, rule=self.rule, adaptive=self.confidence > 0)
            props, n_prop, n_acc, token, deferred = (np.asarray(a) for a in decided)
            candidates = {i: [*props[i, :n_acc[i]].tolist(), int(token[i])] for i in running}
        else:
            m = self.model
            self.tokens, self.key, self.cache = _slots_step(m.params, m.config, self.tokens, self.cache, self.key,
                                                            jnp.asarray(active), *self._params)
            nxt = np.asarray(self.tokens)
            candidates = {i: [int(nxt[i])] for i in running}
        out = {}
        for i in running:
            row = self.rows[i]
            room = row.max_new_tokens - len(row.tokens)
            emitted = []
            for t in candidates[i]:
                emitted.append(t)
                if t in self.eos or len(emitted) == room:
                    break
            if row.stats is not None:  # the round's counters, over the proposals that could still be emitted
                n, offered = int(n_acc[i]), int(n_prop[i])
                row.stats.record_round(offered=min(offered, room), accepted=min(n, len(emitted)))
                if self.rule is not None:
                    judged = min(n + 1, offered, room)
                    row.stats.judged_tokens += judged
                    row.stats.deferred_tokens += int(deferred[i, :judged].sum())
            row.tokens += emitted
            self._check_stop(row)
            out[i] = emitted
        return out
