"""Generation with one model: prefill, then one jitted decode-and-sample step per token, over the
decoder of :mod:`cascade.models.decoder` (its shape buckets: a session compiles a handful of
programs).  Rows keep their own lengths, so a batch of prompts of different lengths needs no left
padding and every row sees exactly the positions it would see alone.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import jax
import numpy as np

from cascade.console import plural
from cascade.models import decoder
from cascade.models.config import ModelConfig
from cascade.models.decoder import cache_length, prefill, prompt_bucket
from cascade.models.kv_cache import KVCache
from cascade.models.sampling import SamplingConfig, sample_logits
from cascade.models.sharding import cache_like, traced_on_mesh_of
from cascade.quant.kv import KVSpec


_compiles = [0]  # JAX compilation events so far in this process (tracing, lowering, backend compiles)


def _count_compiles(event: str, seconds: float, **kwargs) -> None:
    if event.startswith("/jax/core/compile/") or event.startswith("/jax/compilation_cache/"):
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def compile_count() -> int:
    """JAX compilation events so far in this process (any thread): a timed step during which it
    changed compiled something (or loaded it from the persistent cache), and its time is not
    decoding time.  The decode loops leave such steps out of their tokens/s."""
    return _compiles[0]


@traced_on_mesh_of(0)
@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_and_sample(params, cfg: ModelConfig, tokens, cache: KVCache, key, temperature, top_k, top_p):
    """One decode step as one jitted call: the forward pass, the PRNG split and the sampling
    (the only host round trip per token is the sampled ids)."""
    logits, cache = decoder.step(params, cfg, tokens, cache)
    key, sub = jax.random.split(key)
    return sample_logits(logits, sub, temperature, top_k, top_p), key, cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (stop token included if one was hit)
    prompt_lengths: list[int]
    stop_reasons: list[str]  # "eos" or "max_tokens"
    prefill_s: float  # wall time of the prefill (compilation included on first use)
    decode_s: float  # wall time of the whole decode loop (compilation included on first use)
    steady_steps: int  # decode steps that compiled nothing (compile_count() unchanged across the step)
    steady_s: float  # their wall time (each step's device call and read-back; not the time between yields)

    @property
    def n_generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode throughput per row, compilation excluded: the decode steps that compiled nothing
        per second of their time; None when there were none (nothing decoded after the prefill, or
        only steps that compiled)."""
        return self.steady_steps / self.steady_s if self.steady_steps > 0 and self.steady_s > 0 else None


def drain(stream):
    """Run a token stream (:func:`generate_stream`, :func:`cascade.speculative.speculative_stream`) to
    its end; returns its result."""
    while True:
        try:
            next(stream)
        except StopIteration as end:
            return end.value


def generate(params, cfg: ModelConfig, prompts: list[list[int]], **kwargs) -> Generation:
    """Generate up to ``max_new_tokens`` for each prompt (lists of ids), stopping a row at EOS:
    :func:`generate_stream` run to its end (same keyword arguments)."""
    return drain(generate_stream(params, cfg, prompts, **kwargs))


def generate_stream(params, cfg: ModelConfig, prompts: list[list[int]], *, max_new_tokens: int,
                    sampling: SamplingConfig = SamplingConfig(), key=None, eos_ids=None,
                    kv: KVSpec | str | None = None):
    """A generator: after the prefill and after every decode step it yields the token each row
    emitted (``list[list[int]]``, empty for a finished row); it returns the :class:`Generation`.

    ``key``: the PRNG key for sampling (default ``jax.random.key(sampling.seed)``); ``kv``: the KV
    cache precision (:mod:`cascade.quant.kv`, default fp32).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    bad = [t for p in prompts for t in p if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    if longest >= cfg.max_seq_len:
        raise ValueError(f"the prompt is {longest} tokens; the model context is {cfg.max_seq_len}, "
                         "so the prompt alone leaves no room to generate: shorten the prompt")
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({plural(longest, 'token')}) + max new tokens ({max_new_tokens}) exceeds the model "
                         f"context ({cfg.max_seq_len}); generate at most {plural(cfg.max_seq_len - longest, 'token')}")
    eos = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
    batch = len(prompts)
    t_pad = min(prompt_bucket(longest), cache_length(cfg, longest + max_new_tokens))
    tokens = np.zeros((batch, t_pad), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    cache = cache_like(params, KVCache.create(cfg, batch, cache_length(cfg, longest + max_new_tokens), kv))
    key = jax.random.key(sampling.seed) if key is None else key
    temp, top_k, top_p = sampling.arrays()

    t0 = time.perf_counter()
    logits, cache = prefill(params, cfg, tokens, np.asarray(lengths, np.int32), cache)
    key, sub = jax.random.split(key)
    nxt = sample_logits(logits, sub, temp, top_k, top_p)
    nxt_host = np.asarray(nxt)
    t1 = time.perf_counter()

    out = [[int(t)] for t in nxt_host]
    done = [int(t) in eos for t in nxt_host]
    yield [list(row) for row in out]
    t_decode = 0.0  # the loop's own time: the time between yields is the caller's
    steady_steps, steady_s = 0, 0.0
    for _ in range(max_new_tokens - 1):
        if all(done):
            break
        compiles, t_step = compile_count(), time.perf_counter()
        nxt, key, cache = _decode_and_sample(params, cfg, nxt, cache, key, temp, top_k, top_p)
        nxt_host = np.asarray(nxt)
        step_s = time.perf_counter() - t_step
        t_decode += step_s
        if compile_count() == compiles:  # a step that compiled is not decoding speed
            steady_steps, steady_s = steady_steps + 1, steady_s + step_s
        emitted = [[] for _ in out]
        for i, t in enumerate(nxt_host):
            if not done[i]:
                out[i].append(int(t))
                emitted[i].append(int(t))
                done[i] = int(t) in eos
        yield emitted
    reasons = ["eos" if d else "max_tokens" for d in done]
    return Generation(tokens=out, prompt_lengths=lengths, stop_reasons=reasons, prefill_s=t1 - t0, decode_s=t_decode,
                      steady_steps=steady_steps, steady_s=steady_s)


def first_divergence(a, b) -> int | None:
    """The first index where token sequences ``a`` and ``b`` differ (a length difference counts at
    the shorter one's end), or None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
