"""Sampling: one transform from logits to the distribution a token is drawn from.

:func:`filtered_logits` applies temperature, top-k and top-p (nucleus over the renormalised top-k
distribution, as Hugging Face applies top-k, then top-p) and returns logits with every excluded
token at ``-inf``.  Everything that samples or judges a sample goes through it:
:func:`sample_logits` (generation and the speculative draft) draws from it, :func:`token_probs`
(the speculative verifier's ``p`` and ``q``) is its softmax.  Greedy decoding (temperature 0) is
the argmax of the raw logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MAX_SEED = 2**63 - 1  # seeds are non-negative int64s: what jax.random.key and numpy's Generator both take


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int = 0  # PRNG seed for sampling

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}] (2**63 - 1), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def arrays(self):
        """``(temperature, top_k, top_p)`` as the device scalars the jitted functions take."""
        return jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p)


def filtered_logits(logits, temperature, top_k, top_p):
    """``logits / temperature`` (float32, (..., V)) with the tokens outside the top ``top_k``
    (0 = all; ties at the k-th value are kept) and outside the nucleus of mass ``top_p`` of the
    renormalised top-k distribution set to ``-inf``.  ``temperature`` must be > 0."""
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, scaled.shape[:-1] + (1,)), axis=-1)
    in_top_k = jnp.arange(vocab) < k
    probs_sorted = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    mass_above = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    nucleus_min = jnp.min(jnp.where((mass_above < top_p) & in_top_k, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    keep = (scaled >= kth) & (scaled >= nucleus_min)
    return jnp.where(keep, scaled, -jnp.inf)


def token_probs(logits, temperature, top_k, top_p):
    """The sampling distribution (float32, (..., V), sums to 1) of ``logits``: the softmax of
    :func:`filtered_logits`."""
    return jax.nn.softmax(filtered_logits(logits, temperature, top_k, top_p), axis=-1)


@jax.jit
def sample_logits(logits, key, temperature, top_k, top_p):
    """Next tokens (B,) from logits (B, V): greedy when ``temperature == 0``, else a draw from
    :func:`filtered_logits`."""
    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(key):
        return jax.random.categorical(key, filtered_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, key)
