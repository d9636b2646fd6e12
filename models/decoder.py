"""One decoder over ``(params, config, KV cache)``: prefill, step, chunk and rewind, and the shape
buckets every decoding loop uses.

Everything that decodes goes through these functions: :func:`cascade.models.generate` (one model),
the speculative round (:mod:`cascade.speculative`: the draft's steps, the target's chunk, the
rewind after verification), evaluation with a cache.

* :func:`prefill` writes right-padded prompts at each row's current length (rows keep their own
  lengths: no left padding, every row sees the positions it would see alone) and returns the
  logits at each row's last prompt token;
* :func:`step` feeds one token per row at its length;
* :func:`chunk` feeds ``T`` tokens per row (the first ``n_new`` real), e.g. a draft's proposals
  for the target to score;
* :func:`rewind` moves each row's length back (rejected proposals are never seen again: attention
  masks keys by position, and the next writes overwrite them).

``step`` and ``chunk`` are traceable (they run inside a caller's jitted loop); :func:`forward` and
:func:`forward_cached` are the jitted single calls.  Every jitted entry point that takes a model's
parameters traces under their mesh (:func:`cascade.models.sharding.traced_on_mesh_of`), so a
sharded model's quantized matmuls run their kernels per shard.

**Shape buckets** (one place): a prompt is right-padded to :func:`prompt_bucket` (a power of two,
at least 16), a cache holds :func:`cache_length` positions (a power of two, at least 64, at most
the context), and a speculative pair's caches :func:`cache_room` (room for one more round), so a
session compiles a handful of programs.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from cascade.models.config import ModelConfig
from cascade.models.kv_cache import KVCache
from cascade.models.llama import Transformer
from cascade.models.sharding import traced_on_mesh_of


@traced_on_mesh_of(0)
@partial(jax.jit, static_argnames=("cfg", "last_only"))
def forward(params, cfg: ModelConfig, tokens, positions, cache=None, n_new=None, last_only: bool = False):
    """One model call (see :class:`cascade.models.llama.Transformer`); returns ``(logits, cache)``."""
    return Transformer(cfg).apply({"params": params}, tokens, positions, cache, n_new, last_only)


@traced_on_mesh_of(0)
@partial(jax.jit, static_argnames=("cfg", "last_only"), donate_argnames=("cache",))
def forward_cached(params, cfg: ModelConfig, tokens, positions, cache: KVCache, n_new=None, last_only: bool = False):
    """:func:`forward` that updates ``cache`` in place (the argument is donated: do not reuse it)."""
    return Transformer(cfg).apply({"params": params}, tokens, positions, cache, n_new, last_only)


def logits_of(params, cfg: ModelConfig, tokens) -> jnp.ndarray:
    """Logits (B, T, V) of a plain causal forward over ``tokens`` (B, T), no cache."""
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return forward(params, cfg, tokens, positions)[0]


def prefill(params, cfg: ModelConfig, tokens, lengths, cache: KVCache):
    """Write right-padded prompts ``tokens`` (B, T) of ``lengths`` (B,) into ``cache`` (at each row's
    current length); returns the logits at each row's last prompt token (B, V) and the cache."""
    tokens = jnp.asarray(tokens, jnp.int32)
    cache.check_compatible(cfg)
    check_cache_room(cache, tokens.shape[1])
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    return forward(params, cfg, tokens, positions, cache, jnp.asarray(lengths, jnp.int32), last_only=True)


def check_cache_room(cache: KVCache, n_new: int) -> None:
    """Raise if writing ``n_new`` more positions would run past the cache (a host sync).

    :func:`forward` itself does not check: inside jit a write past the end would be clamped
    silently, so every entry point that feeds it (``prefill``, ``generate``) checks first.
    """
    longest = int(jnp.max(cache.lengths))
    if longest + n_new > cache.max_len:
        raise ValueError(f"KV cache overflow: a row holds {longest} positions and {n_new} more do not fit "
                         f"in a cache of {cache.max_len}")


def step(params, cfg: ModelConfig, tokens, cache: KVCache):
    """Feed one token per row (``tokens`` (B,)) at each row's length; returns ``(logits (B, V), cache)``."""
    return Transformer(cfg).apply({"params": params}, tokens[:, None], cache.lengths[:, None], cache, None, True)


def chunk(params, cfg: ModelConfig, tokens, cache: KVCache, n_new=None, *, last_only: bool = False):
    """Feed ``tokens`` (B, T) at each row's length, of which the first ``n_new`` (B,) are real (all by
    default); returns ``(logits, cache)``: (B, T, V), or (B, V) at each row's last real token."""
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    return Transformer(cfg).apply({"params": params}, tokens, positions, cache, n_new, last_only)


def rewind(cache: KVCache, lengths) -> KVCache:
    """``cache`` with each row's length set to ``lengths`` (B,): positions from there on are dropped.
    A quantized cache may move back at most the ``rewind`` it was created with."""
    return cache.replace(lengths=jnp.asarray(lengths, jnp.int32))


# -- shape buckets ---------------------------------------------------------------------------------

def bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def cache_length(cfg: ModelConfig, needed: int) -> int:
    """The cache bucket for ``needed`` positions: a power of two >= 64, capped at the context."""
    if needed > cfg.max_seq_len:
        raise ValueError(f"needs {needed} positions but the model context is {cfg.max_seq_len}")
    return min(bucket(needed, 64), cfg.max_seq_len)


def prompt_bucket(n: int) -> int:
    """The padded length of a prompt of ``n`` tokens: a power of two, at least 16."""
    return bucket(n, 16)


def cache_room(n_prompt: int, max_new_tokens: int, draft_len: int, context: int) -> int:
    """Positions each model's KV cache gets in a speculative pair: the prompt padded to its prefill
    bucket, and one round of ``draft_len + 1`` past the last token, rounded to a power of two unless
    that would pass the context (a quantized cache further rounds up to whole key groups)."""
    needed = max(n_prompt + max_new_tokens + draft_len + 2, prompt_bucket(n_prompt))
    return bucket(needed, 64) if bucket(needed, 64) <= context else needed
