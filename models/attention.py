"""Attention arithmetic shared by the network and the KV cache: masks, grouped-query attention,
and softmax *partials* that combine exactly (log-sum-exp) when the keys come in parts (a quantized
cache, a full-precision window, sinks).

Shapes: queries ``q`` (B, T, H, hd), keys/values (B, S, KV, hd) with ``H`` a multiple of ``KV``
(grouped-query attention); scores and softmax in float32.  :mod:`cascade.models.kv_cache` builds
cached attention on these; :mod:`cascade.models.llama` uses :func:`attention` for a cache-less pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite "minus infinity": a fully masked row (padding) stays NaN-free


def visibility(q_pos, k_pos, window: int | None):
    """(B, T, S) mask: key at ``k_pos[b, s]`` is visible to the query at ``q_pos[b, t]`` when it is
    not in the future (and within ``window`` if set)."""
    visible = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        visible &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    return visible


def attend(q, k, v, visible):
    """Grouped-query attention: q (B, T, H, hd), k/v (B, S, KV, hd), ``visible`` (B, T, S).
    Scores and softmax in float32."""
    return attend_parts(q, [(k, v, visible)])


def attend_parts(q, parts):
    """:func:`attend` over keys and values given in parts ``[(k_i, v_i, visible_i), ...]`` (e.g. a
    dequantized cache and a full-precision window): one softmax over all parts' scores, with no
    concatenated copy of the keys or values (each part's dequantization feeds its own dot)."""
    b, t, h, hd = q.shape
    kv = parts[0][0].shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd).astype(jnp.float32) * (hd ** -0.5)
    scores = [jnp.where(vis[:, None, None], jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)), _MASKED)
              for k, _, vis in parts]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(parts) > 1 else scores[0], axis=-1)
    out, offset = 0.0, 0
    for k, v, _ in parts:
        p = jax.lax.slice_in_dim(probs, offset, offset + k.shape[1], axis=-1)
        out = out + jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
        offset += k.shape[1]
    return out.reshape(b, t, h * hd).astype(q.dtype)


def attention(q, k, v, q_pos, k_pos, window: int | None):
    """:func:`attend` with the causal (and sliding-window) mask of the given positions."""
    return attend(q, k, v, visibility(q_pos, k_pos, window))


def attend_partial(q, k, v, visible):
    """The softmax *partial* of queries over one part of the context (reference implementation).

    q (B, T, H, hd) float32 already scaled by hd^-0.5; k/v (B, S, KV, hd); ``visible`` (B, T, S).
    Returns ``(acc (B, T, H, hd), m (B, T, H), l (B, T, H))``: ``m`` the largest visible score,
    ``l`` the sum of ``exp(score - m)``, ``acc`` the sum of ``exp(score - m) * value``; a query
    that sees nothing gets ``m = -inf``, ``l = 0``, ``acc = 0``.  :func:`merge_partials` combines
    parts exactly as one softmax over all of them would.
    """
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    vis = visible[:, :, None, None, :]
    scores = jnp.where(vis, jnp.einsum("btkgd,bskd->btkgs", qg, k.astype(jnp.float32)), _MASKED)
    seen = jnp.any(visible, axis=-1)[:, :, None, None]
    m = jnp.where(seen, jnp.max(scores, axis=-1), -jnp.inf)
    p = jnp.where(vis, jnp.exp(scores - jnp.where(seen, m, 0.0)[..., None]), 0.0)
    acc = jnp.einsum("btkgs,bskd->btkgd", p, v.astype(jnp.float32))
    return acc.reshape(b, t, h, hd), m.reshape(b, t, h), jnp.sum(p, axis=-1).reshape(b, t, h)


def merge_partials(parts, dtype):
    """Attention output (B, T, H * hd) in ``dtype`` from softmax partials ``[(acc, m, l), ...]``
    (:func:`attend_partial`, :func:`cache_partial`): the log-sum-exp merge."""
    m = parts[0][1]
    for _, mi, _ in parts[1:]:
        m = jnp.maximum(m, mi)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    acc, total = 0.0, 0.0
    for a, mi, li in parts:
        w = jnp.where(jnp.isfinite(mi), jnp.exp(mi - m_safe), 0.0)
        acc = acc + a * w[..., None]
        total = total + li * w
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    b, t, h, hd = out.shape
    return out.reshape(b, t, h * hd).astype(dtype)
