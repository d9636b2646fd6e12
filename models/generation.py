"""Generation with one model: prefill, then one jitted decode-and-sample step per token, over the
decoder of :mod:`cascade.models.decoder` (its shape buckets: a session compiles a handful of
programs).  Rows keep their own lengths, so a batch of prompts of different lengths needs no left
padding and every row sees exactly the positions it would see alone.  The host side (prefill
timing, per-row stop at EOS or max tokens, the steady-step timing behind ``tokens_per_s``) is
:func:`decode_loop`, which speculative decoding (:mod:`cascade.speculative`) shares; the prompt
check and the EOS ids every caller uses are here too (:func:`check_prompts`, :func:`eos_ids`).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
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


STEPS_PER_CALL = 8  # generate_stream: decode steps run by one device call (steps_per_call)


@traced_on_mesh_of(0)
@partial(jax.jit, static_argnames=("cfg", "steps"), donate_argnames=("cache",))
def _decode_steps(params, cfg: ModelConfig, tokens, cache: KVCache, key, temperature, top_k, top_p, room, eos, *,
                  steps: int):
    """Up to ``steps`` decode steps in one device call: :func:`_decode_and_sample` in a loop on the
    device while any row has room (``room`` (B,): tokens each row may still emit; a row stops at an
    id in ``eos`` or when its room runs out, the host loop's rule), exiting early once every row has
    stopped.  The host reads the tokens back once per call: on small models a step's dispatch and
    read-back cost about a third of the step.  Every row is stepped every time, as one step a call
    does, so the tokens are the same.  Returns ``(tokens (steps, B), steps run, last tokens, key, cache)``."""
    out = jnp.zeros((steps, tokens.shape[0]), jnp.int32)

    def cond(carry):
        i, room = carry[0], carry[1]
        return (i < steps) & jnp.any(room > 0)

    def body(carry):
        i, room, tokens, key, cache, out = carry
        logits, cache = decoder.step(params, cfg, tokens, cache)
        key, sub = jax.random.split(key)
        tokens = sample_logits(logits, sub, temperature, top_k, top_p).astype(jnp.int32)
        room = jnp.where((room > 0) & ~jnp.isin(tokens, eos), room - 1, 0)
        return i + 1, room, tokens, key, cache, out.at[i].set(tokens)

    i, _, tokens, key, cache, out = jax.lax.while_loop(
        cond, body, (jnp.int32(0), room.astype(jnp.int32), tokens.astype(jnp.int32), key, cache, out))
    return out, i, tokens, key, cache


def decode_rate(tokens: int, seconds: float) -> float | None:
    """Decoding speed, compilation excluded: ``tokens`` emitted in the steps that compiled nothing
    per second of those steps' time; None when there were none (nothing decoded after the prefill,
    or only steps that compiled).  The one definition behind every ``tokens_per_s``."""
    return tokens / seconds if tokens > 0 and seconds > 0 else None


def eos_ids(tokenizer, cfg: ModelConfig) -> tuple[int, ...]:
    """The ids a completion stops at: the tokenizer's end-of-sequence ids, or the config's when the
    tokenizer names none."""
    return tuple(tokenizer.eos_ids or cfg.eos_token_ids)


def prompt_problem(n_prompt: int, max_new_tokens: int, context: int, name: str = "the model context") -> str | None:
    """Why a prompt of ``n_prompt`` tokens cannot generate ``max_new_tokens`` in ``context``
    positions, or None when it fits; ``name`` is how the message calls that context."""
    if n_prompt >= context:
        return (f"the prompt is {n_prompt} tokens; {name} is {context}, so the prompt alone leaves no room to "
                "generate: shorten the prompt")
    if n_prompt + max_new_tokens > context:
        return (f"prompt ({plural(n_prompt, 'token')}) + max new tokens ({max_new_tokens}) exceeds {name} "
                f"({context}); generate at most {plural(context - n_prompt, 'token')}")
    return None


def check_prompts(prompts: list[list[int]], max_new_tokens: int, vocab_size: int, context: int,
                  name: str = "the model context") -> None:
    """Raise ValueError unless every prompt (ids) is non-empty, inside ``[0, vocab_size)`` and leaves
    room for ``max_new_tokens`` in ``context`` (:func:`prompt_problem`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    bad = [t for p in prompts for t in p if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    problem = prompt_problem(max(len(p) for p in prompts), max_new_tokens, context, name)
    if problem:
        raise ValueError(problem)


def pad_prompts(prompts: list[list[int]], width: int) -> np.ndarray:
    """The prompts as one (B, ``width``) int32 array, each row zero-padded on the right (rows keep
    their own lengths: no left padding)."""
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decoded:
    """What :func:`decode_loop` returns: each row's tokens and why it stopped, and the loop's timing."""

    tokens: list[list[int]]  # emitted ids per row (stop token included if one was hit)
    stop_reasons: list[str]  # "eos" or "max_tokens"
    prefill_s: float  # wall time of the prefill (compilation included on first use)
    decode_s: float  # wall time of all steps (compilation included on first use)
    steady_steps: int  # steps that compiled nothing (compile_count() unchanged across the step)
    steady_tokens: list[int]  # per row: tokens emitted in those steps
    steady_s: float  # their wall time (each step's device call and read-back; not the time between yields)


class Steps(list):
    """Several steps' candidates decided by one device call (what ``step`` of :func:`decode_loop` may
    return instead of one step's): the loop hands them out one at a time, as if each were its own
    step; the call's time is split evenly among them, and all of them count as compiling when the
    call compiled."""


def decode_loop(prefill, step, *, max_new_tokens: int, eos, account=None):
    """The host side of decoding, one loop for plain and speculative generation.  A generator: after
    the prefill and after every step it yields the tokens each row emitted (``list[list[int]]``,
    empty for a row that has stopped); it returns the :class:`Decoded`.

    ``prefill()``: the first token of every row (host ints), timed as the prefill.  ``step(room)``:
    one decoding step; ``room[i]`` is how many tokens row ``i`` may still emit (0: it has stopped);
    returns each row's candidate tokens (host ints, one or more per live row: one per plain decode
    step, a speculative round's accepted proposals and the target's token), or :class:`Steps` of
    several steps' candidates, which the loop takes one step at a time.  A row keeps its
    candidates up to its first id in ``eos`` or its room, whichever comes first, and stops there.
    ``account(kept, room)``, when given, hears after each step how many candidates each row kept.
    Steps during which JAX compiled (:func:`compile_count`) are left out of the steady counts.
    """
    eos = set(eos)
    t0 = time.perf_counter()
    first = prefill()
    prefill_s = time.perf_counter() - t0
    out = [[int(t)] for t in first]
    live = [row[-1] not in eos and len(row) < max_new_tokens for row in out]
    yield [list(row) for row in out]
    decode_s, steady_s, steady_steps, steady_tokens = 0.0, 0.0, 0, [0] * len(out)
    while any(live):
        room = [max_new_tokens - len(row) if on else 0 for row, on in zip(out, live)]
        compiles, t_step = compile_count(), time.perf_counter()
        result = step(room)
        call_s = time.perf_counter() - t_step
        decode_s += call_s
        compiled = compile_count() != compiles  # a call that compiled is not decoding speed
        steps = result if isinstance(result, Steps) else [result]
        for j, candidates in enumerate(steps):
            if j:  # the next step of the same call: the room the previous one left
                room = [max_new_tokens - len(row) if on else 0 for row, on in zip(out, live)]
            emitted = [[] for _ in out]
            for i, n in enumerate(room):
                for t in candidates[i] if n else ():
                    emitted[i].append(int(t))
                    if int(t) in eos or len(emitted[i]) == n:
                        break
                out[i] += emitted[i]
                live[i] = live[i] and out[i][-1] not in eos and len(out[i]) < max_new_tokens
            if account is not None:
                account([len(e) for e in emitted], room)
            if not compiled:
                steady_steps, steady_s = steady_steps + 1, steady_s + call_s / len(steps)
                steady_tokens = [s + len(e) for s, e in zip(steady_tokens, emitted)]
            yield emitted
            if not any(live):
                break
    return Decoded(tokens=out, stop_reasons=["eos" if row[-1] in eos else "max_tokens" for row in out],
                   prefill_s=prefill_s, decode_s=decode_s, steady_steps=steady_steps, steady_tokens=steady_tokens,
                   steady_s=steady_s)


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
        """Decode throughput per row (:func:`decode_rate` of the steady steps: one token each for
        the rows still decoding)."""
        return decode_rate(self.steady_steps, self.steady_s)


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
                    kv: KVSpec | str | None = None, steps_per_call: int = STEPS_PER_CALL):
    """A generator: after the prefill and after every decode step it yields the token each row
    emitted (``list[list[int]]``, empty for a finished row); it returns the :class:`Generation`.
    The host loop is :func:`decode_loop`; a step is one jitted decode-and-sample call.

    ``key``: the PRNG key for sampling (default ``jax.random.key(sampling.seed)``); ``kv``: the KV
    cache precision (:mod:`cascade.quant.kv`, default fp32); ``eos_ids``: the ids a row stops at
    (default the config's); ``steps_per_call``: decode steps run by one device call
    (:func:`_decode_steps`; 1: a call and a read-back per token), yielded one by one as they are
    read back: the tokens are the same either way.
    """
    check_prompts(prompts, max_new_tokens, cfg.vocab_size, cfg.max_seq_len)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    room = cache_length(cfg, longest + max_new_tokens)
    tokens = pad_prompts(prompts, min(prompt_bucket(longest), room))
    cache = cache_like(params, KVCache.create(cfg, len(prompts), room, kv))
    key = jax.random.key(sampling.seed) if key is None else key
    temp, top_k, top_p = sampling.arrays()
    nxt = None

    def first():
        nonlocal cache, key, nxt
        logits, cache = prefill(params, cfg, tokens, np.asarray(lengths, np.int32), cache)
        key, sub = jax.random.split(key)
        nxt = sample_logits(logits, sub, temp, top_k, top_p)
        return np.asarray(nxt).tolist()

    eos = cfg.eos_token_ids if eos_ids is None else eos_ids
    stop_ids = jnp.asarray(sorted(set(eos)), jnp.int32)

    def step(room):
        nonlocal cache, key, nxt
        if steps_per_call <= 1:
            nxt, key, cache = _decode_and_sample(params, cfg, nxt, cache, key, temp, top_k, top_p)
            return [[t] for t in np.asarray(nxt).tolist()]
        out, ran, nxt, key, cache = _decode_steps(params, cfg, nxt, cache, key, temp, top_k, top_p,
                                                  jnp.asarray(room, jnp.int32), stop_ids, steps=steps_per_call)
        out, ran = jax.device_get((out, ran))
        return Steps([[t] for t in row] for row in np.asarray(out[:int(ran)]).tolist())

    done = yield from decode_loop(first, step, max_new_tokens=max_new_tokens, eos=eos)
    return Generation(tokens=done.tokens, prompt_lengths=lengths, stop_reasons=done.stop_reasons,
                      prefill_s=done.prefill_s, decode_s=done.decode_s, steady_steps=done.steady_steps,
                      steady_s=done.steady_s)


def first_divergence(a, b) -> int | None:
    """The first index where token sequences ``a`` and ``b`` differ (a length difference counts at
    the shorter one's end), or None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
