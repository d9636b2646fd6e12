"""The static KV cache: preallocated per-layer key/value buffers, written at each row's length and
read under a position mask, so decoding compiles once per (batch, cache length).

A cache stores float32/bf16/fp16, or int8/int4 codes in the KIVI layout (:mod:`cascade.quant.kv`:
keys per channel over groups of positions, values per token), quantized on write and dequantized
inside the jitted step, with a float16 window of recent positions (and optional sinks) kept at
full precision.  :class:`KVCache` is the pytree the decoder threads through its calls;
:func:`cached_attention` is one layer's write-then-attend; :func:`kv_cache_memory` its bytes
without allocating it.  The network (:mod:`cascade.models.llama`) only calls
:func:`cached_attention`.
"""

from __future__ import annotations

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp

from cascade import quant
from cascade.models.attention import attend_partial, merge_partials, visibility
from cascade.models.config import ModelConfig
from cascade.quant import packing
from cascade.quant.kv import (RESIDUAL_DTYPE, KVSpec, bytes_per_token_per_layer, fixed_bytes_per_layer, parse_kv_spec,
                              quantize_key_groups)
from cascade.quant.kernels import cpu as cpu_kernels
from cascade.quant.dequant_matmul import TP_AXIS, tp_size
from cascade.quant.qtensor import QuantizedTensor


@flax.struct.dataclass
class KVCache:
    """Static per-layer key/value buffers, each row's filled length, and how they are stored.

    Per layer ``i`` (``D = n_kv_heads * head_dim``; layouts and bytes in :mod:`cascade.quant.kv`):

    * ``k[i]``, ``v[i]``: every position's keys/values: (batch, max_len, n_kv_heads, head_dim)
      floats for a float spec; for int8/int4 a :class:`cascade.quant.QuantizedTensor` of logical shape
      (batch, max_len, D): keys per channel over groups of positions, values per token.
    * ``k_recent[i]``, ``v_recent[i]`` (int specs): float16 copies of the last
      ``C = R + rewind`` positions, (batch, C, n_kv_heads, head_dim), position ``p`` in slot
      ``p % C``: the full-precision window, and the source a key group is quantized from.
    * ``k_sink[i]``, ``v_sink[i]`` (specs with sinks ``-s{S}``): positions ``0 .. S-1`` in float16.

    ``lengths``: (batch,) int32, positions already written (the next token goes at ``lengths[b]``).
    Callers may move ``lengths`` back (speculative decoding) by at most ``rewind`` positions.
    """

    k: tuple
    v: tuple
    lengths: jnp.ndarray
    k_recent: tuple = ()
    v_recent: tuple = ()
    k_sink: tuple = ()
    v_sink: tuple = ()
    spec: KVSpec = flax.struct.field(pytree_node=False, default=KVSpec())

    @property
    def max_len(self) -> int:
        return int(self.k[0].shape[1])

    @property
    def batch(self) -> int:
        return int(self.k[0].shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes actually held: buffers (codes, scales, zero points) plus ring and sink buffers."""
        def size(a):
            return a.nbytes if isinstance(a, QuantizedTensor) else int(a.size) * a.dtype.itemsize
        return sum(size(a) for a in (*self.k, *self.v, *self.k_recent, *self.v_recent, *self.k_sink, *self.v_sink))

    @staticmethod
    def create(cfg: ModelConfig, batch: int, max_len: int, kv: KVSpec | str | None = None, *,
               rewind: int = 0) -> "KVCache":
        """An empty cache in precision ``kv`` (default fp32) holding at least ``max_len`` positions
        (an int cache rounds up to whole key groups).  ``rewind``: how far callers may move
        ``lengths`` back; it sizes the full-precision ring of an int cache."""
        spec = parse_kv_spec(kv)
        spec.check_context(cfg.max_seq_len)
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"KV cache needs positive batch and length, got batch={batch}, max_len={max_len}")
        if rewind < 0:
            raise ValueError(f"rewind must be >= 0, got {rewind}")
        kvh, hd, n = cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
        if not spec.quantized:
            def zeros():
                return tuple(jnp.zeros((batch, max_len, kvh, hd), spec.float_dtype) for _ in range(n))
            return KVCache(k=zeros(), v=zeros(), lengths=jnp.zeros((batch,), jnp.int32), spec=spec)
        width, g = kvh * hd, spec.key_positions
        max_len = -(-max_len // g) * g
        kspec, vspec = spec.key_spec(), spec.value_spec(kvh, hd)

        def keys():
            groups = (batch, max_len // g, width)
            return QuantizedTensor(jnp.zeros((batch, packing.packed_length(max_len, spec.bits), width), jnp.uint8),
                                   jnp.ones(groups, jnp.float16), jnp.zeros(groups, jnp.float16),
                                   spec=kspec, shape=(batch, max_len, width), axis=1, dtype="float32")

        def values():
            groups = (batch, max_len, width // vspec.group_size)
            return QuantizedTensor(jnp.zeros((batch, max_len, packing.packed_length(width, spec.bits)), jnp.uint8),
                                   jnp.ones(groups, jnp.float16), None,
                                   spec=vspec, shape=(batch, max_len, width), axis=2, dtype="float32")

        def fp(positions):
            return tuple(jnp.zeros((batch, positions, kvh, hd), RESIDUAL_DTYPE) for _ in range(n)) if positions else ()

        ring = spec.residual_positions + rewind
        return KVCache(k=tuple(keys() for _ in range(n)), v=tuple(values() for _ in range(n)),
                       lengths=jnp.zeros((batch,), jnp.int32), k_recent=fp(ring), v_recent=fp(ring),
                       k_sink=fp(spec.sinks), v_sink=fp(spec.sinks), spec=spec)

    def check_compatible(self, cfg: ModelConfig) -> None:
        """Raise a clear error if this cache was not made for ``cfg`` (layers, heads, dtypes)."""
        if len(self.k) != cfg.n_layers or len(self.v) != cfg.n_layers:
            raise ValueError(f"KV cache has {len(self.k)} layers; the model has {cfg.n_layers}")
        kvh, hd, spec = cfg.n_kv_heads, cfg.head_dim, self.spec
        for name, bufs in (("k", self.k), ("v", self.v)):
            for a in bufs:
                if spec.quantized:
                    want_spec = spec.key_spec() if name == "k" else spec.value_spec(kvh, hd)
                    ok = isinstance(a, QuantizedTensor) and a.shape[2:] == (kvh * hd,) and a.spec == want_spec
                    want = f"{spec} codes of {kvh * hd} values per token"
                else:
                    ok = (not isinstance(a, QuantizedTensor) and tuple(a.shape[2:]) == (kvh, hd)
                          and str(a.dtype) == spec.float_dtype)
                    want = f"{spec.float_dtype} buffers of ({kvh}, {hd}) per token"
                if not ok:
                    got = a if isinstance(a, QuantizedTensor) else f"{a.dtype} {tuple(a.shape)}"
                    raise ValueError(f"KV cache {name} buffer does not match the model: expected {want}, got {got}")
        for name in ("k_recent", "v_recent", "k_sink", "v_sink"):
            for a in getattr(self, name):
                if tuple(a.shape[2:]) != (kvh, hd):
                    raise ValueError(f"KV cache {name} buffer is {tuple(a.shape)}; the model stores ({kvh}, {hd}) per token")
        if (spec.quantized and len(self.k_recent) != cfg.n_layers) or len(self.k_sink) != (cfg.n_layers if spec.sinks else 0):
            raise ValueError(f"KV cache buffers do not match its spec {spec}")


def kv_cache_memory(cfg: ModelConfig, kv: KVSpec | str | None, ctx: int, *, batch: int = 1, rewind: int = 0) -> dict:
    """The memory a KV cache of precision ``kv`` takes for ``batch`` sequences of ``ctx`` positions:
    exactly ``KVCache.create(cfg, batch, ctx, kv, rewind=rewind).nbytes``, without allocating it.

    Keys: ``bytes_per_token`` (one position, all layers, keys plus values, scales included),
    ``fixed_bytes_per_sequence`` (ring and sinks), ``bytes_per_sequence`` at ``ctx`` (an int cache
    rounds ``ctx`` up to whole key groups), ``bytes`` for the batch, and the ratios to an fp16
    cache of the same positions: ``vs_fp16_per_token`` and ``vs_fp16_per_sequence``.
    """
    spec = parse_kv_spec(kv)
    spec.check_context(cfg.max_seq_len)
    if ctx <= 0 or batch <= 0:
        raise ValueError(f"ctx and batch must be positive, got ctx={ctx}, batch={batch}")
    kvh, hd, n = cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    positions = -(-ctx // spec.key_positions) * spec.key_positions if spec.quantized else ctx
    per_token = n * bytes_per_token_per_layer(spec, kvh, hd)
    fixed = n * fixed_bytes_per_layer(spec, kvh, hd, rewind=rewind)
    per_sequence = int(round(per_token * positions)) + fixed
    fp16_token = n * bytes_per_token_per_layer("fp16", kvh, hd)
    return {"kv": str(spec), "ctx": ctx, "batch": batch, "bytes_per_token": per_token,
            "bytes_per_token_per_layer": per_token / n, "fixed_bytes_per_sequence": fixed,
            "bytes_per_sequence": per_sequence, "bytes": batch * per_sequence,
            "vs_fp16_per_token": per_token / fp16_token, "vs_fp16_per_sequence": per_sequence / (fp16_token * ctx)}


class LayerKV(NamedTuple):
    """One layer's slice of a :class:`KVCache` (empty tuples stand for absent buffers)."""

    k: object
    v: object
    k_recent: object = ()
    v_recent: object = ()
    k_sink: object = ()
    v_sink: object = ()


def cache_partial(q, k, v, lo, hi):
    """:func:`attend_partial` of queries ``q`` (B, T, H, hd, scaled) over the cache positions
    ``[lo[b, t], hi[b, t])`` of a layer's stored buffers ``k``, ``v`` (float (B, S, KV, hd), or
    int8/int4 :class:`cascade.quant.QuantizedTensor`s in the KIVI layout).  Decode-sized calls run
    the native CPU kernel, which reads the cache in place (no float or transposed copy); the
    reference dequantizes the buffers and masks (``CASCADE_ATTENTION_BACKEND=xla`` forces it)."""
    if cpu_kernels.attention_supported(q, k, v):
        tp = tp_size()
        if tp > 1 and _heads_split_evenly(q, k, v, tp):
            return _per_shard_attention(q, lo, hi, k, v)
        return cpu_kernels.cache_attention(q, lo, hi, k, v)
    kvh = k.shape[2] // q.shape[3] if isinstance(k, QuantizedTensor) else k.shape[2]
    keys, values = read_kv(k, kvh), read_kv(v, kvh)
    pos = jnp.arange(keys.shape[1], dtype=jnp.int32)[None, None, :]
    visible = (pos >= lo[:, :, None]) & (pos < hi[:, :, None])
    return attend_partial(q, keys, values, visible)


def _heads_split_evenly(q, k, v, tp: int) -> bool:
    """Can each of ``tp`` devices hold whole query and KV heads of ``q`` and the buffers, with a
    quantized buffer's packed bytes and value groups whole too?"""
    hd = q.shape[3]
    if q.shape[2] % tp:
        return False
    if not isinstance(k, QuantizedTensor):
        return k.shape[2] % tp == 0
    width = k.shape[2]
    if (width // hd) % tp:
        return False
    local = width // tp
    return all(a.packed.shape[-1] % tp == 0 and a.scale.shape[-1] % tp == 0 for a in (k, v)) \
        and local % v.spec.group_size == 0


def _per_shard_attention(q, lo, hi, k, v):
    """:func:`cpu_kernels.cache_attention` on each device's heads under a tensor-parallel mesh
    (``jax.shard_map``): the cache is split by KV heads (:func:`cascade.models.sharding.shard_cache`),
    the queries by heads, so each device reads its own slice of the cache in place; a query head's
    KV head stays on its device, since both splits keep whole groups of ``n_heads / n_kv_heads``."""
    from jax.sharding import PartitionSpec as P

    heads, rows = P(None, None, TP_AXIS, None), P(None, None, TP_AXIS)

    def spec_of(a):
        if not isinstance(a, QuantizedTensor):
            return heads
        return QuantizedTensor(rows, rows, None if a.zero is None else rows, None, spec=a.spec, shape=a.shape,
                               axis=a.axis, dtype=a.dtype)

    def local(a, whole):
        if not isinstance(whole, QuantizedTensor):
            return a
        shape = whole.shape[:2] + (a.packed.shape[-1] * whole.shape[2] // whole.packed.shape[-1],)
        return QuantizedTensor(a.packed, a.scale, a.zero, None, spec=whole.spec, shape=shape, axis=whole.axis,
                               dtype=whole.dtype)

    def body(q, lo, hi, k_local, v_local):
        return cpu_kernels.cache_attention(q, lo, hi, local(k_local, k), local(v_local, v))

    return jax.shard_map(body, in_specs=(heads, P(), P(), spec_of(k), spec_of(v)),
                         out_specs=(heads, rows, rows))(q, lo, hi, k, v)


def _write_rows(buf, new, starts):
    """Write ``new`` (B, T, ...) into ``buf`` (B, S, ...) at row-wise offsets ``starts`` (B,)."""
    def one(b, n, s):
        return jax.lax.dynamic_update_slice(b, n.astype(b.dtype), (s,) + (0,) * (b.ndim - 1))
    return jax.vmap(one)(buf, new, starts)


def _gather_rows(x, idx):
    """``x[b, idx[b, j]]`` for x (B, T, ...) and idx (B, J), indices clipped into range."""
    return jax.vmap(lambda a, i: a[i])(x, jnp.clip(idx, 0, x.shape[1] - 1))


def _ring_positions(lengths, ring: int):
    """(B, ring): the position ring slot ``s`` holds once ``lengths`` positions are written
    (the largest ``p < lengths`` with ``p % ring == s``; negative: none yet)."""
    last = lengths[:, None] - 1
    return last - jnp.remainder(last - jnp.arange(ring, dtype=jnp.int32)[None, :], ring)


def full_precision_from(positions, spec: KVSpec):
    """(B, T): the first position the query at ``positions`` sees in full precision (see
    :mod:`cascade.quant.kv`): the start of its own key group, minus ``R - G``."""
    g = spec.key_positions
    return positions // g * g - (spec.residual_positions - g)


def _write_values(buf: QuantizedTensor, new, starts):
    """Quantize ``new`` (B, T, KV, hd) per token and store it at ``starts`` (quantize on write)."""
    b, t = new.shape[:2]
    q = quant.quantize(new.reshape(b, t, -1).astype(jnp.float32), buf.spec, axis=2, scale_dtype=buf.scale.dtype)
    return QuantizedTensor(_write_rows(buf.packed, q.packed, starts), _write_rows(buf.scale, q.scale, starts), None,
                           spec=buf.spec, shape=buf.shape, axis=buf.axis, dtype=buf.dtype)


def _write_keys(buf: QuantizedTensor, ring_k, new, lengths):
    """(Re)quantize every key group this call fills into, per channel, from full precision.

    The groups from the one holding ``lengths`` to the one holding the last new position are
    gathered from the ring (positions before ``lengths``) and ``new`` (B, T, KV, hd), quantized
    and written; a group still incomplete is rewritten by the call that completes it, and is
    read in full precision until then.
    """
    spec, g = buf.spec, buf.spec.group_size
    b, t = new.shape[:2]
    n_groups = buf.shape[1] // g
    touched = min((t + g - 2) // g + 1, n_groups)  # static: the most groups t consecutive positions span
    rows = packing.packed_length(g, spec.bits)  # packed rows per group
    ring = ring_k.shape[1]

    def one(packed, scale, zero, ring_row, new_row, length):
        first = length // g
        start = jnp.minimum(first, n_groups - touched)  # stay inside the buffer; groups before `first` are kept
        pos = start * g + jnp.arange(touched * g, dtype=jnp.int32)
        fresh = jnp.where((pos >= length)[:, None], new_row[jnp.clip(pos - length, 0, t - 1)],
                          ring_row[jnp.remainder(pos, ring)].astype(jnp.float32))
        q_packed, q_scale, q_zero = quantize_key_groups(fresh, spec.bits, g)
        keep = (start + jnp.arange(touched)) < first  # (touched,)
        old_p = jax.lax.dynamic_slice_in_dim(packed, start * rows, touched * rows, axis=0)
        old_s = jax.lax.dynamic_slice_in_dim(scale, start, touched, axis=0)
        old_z = jax.lax.dynamic_slice_in_dim(zero, start, touched, axis=0)
        new_p = jnp.where(jnp.repeat(keep, rows)[:, None], old_p, q_packed)
        new_s = jnp.where(keep[:, None], old_s, q_scale)
        new_z = jnp.where(keep[:, None], old_z, q_zero)
        return (jax.lax.dynamic_update_slice_in_dim(packed, new_p, start * rows, axis=0),
                jax.lax.dynamic_update_slice_in_dim(scale, new_s, start, axis=0),
                jax.lax.dynamic_update_slice_in_dim(zero, new_z, start, axis=0))

    # quantized from float16 like the ring it is completed from, so codes do not depend on call boundaries
    flat_new = new.reshape(b, t, -1).astype(RESIDUAL_DTYPE).astype(jnp.float32)
    packed, scale, zero = jax.vmap(one)(buf.packed, buf.scale, buf.zero, ring_k.reshape(b, ring, -1), flat_new, lengths)
    return QuantizedTensor(packed, scale, zero, spec=spec, shape=buf.shape, axis=buf.axis, dtype=buf.dtype)


def read_kv(buf, kv_heads: int):
    """A layer buffer as float (B, S, KV, hd): a quantized buffer is dequantized (inside the jitted
    step, where XLA fuses the dequantization into its consumers where it can)."""
    if not isinstance(buf, QuantizedTensor):
        return buf
    b, s, width = buf.shape
    return quant.dequantize(buf, jnp.float32).reshape(b, s, kv_heads, width // kv_heads)


def cached_attention(q, k_new, v_new, positions, layer: LayerKV, lengths, n_new, spec: KVSpec, window: int | None):
    """Write this call's keys/values into the cache, then attend over it (see :class:`KVCache`).

    q (B, T, H, hd); k_new/v_new (B, T, KV, hd) at ``positions = lengths + arange(T)``, of which
    the first ``n_new`` (B,) per row are real.  A float cache is written and read as it is.  An
    int cache stores every position quantized; the query at ``p`` reads position ``j``
    dequantized when ``j < full_precision_from(p)`` (and ``j`` is not a sink), and in float16
    otherwise, from the ring (positions written by earlier calls), from this call's own keys and
    values, or from the sink buffer.  Returns ``(out, new LayerKV)``.
    """
    b, t, kvh, hd = k_new.shape
    qs = q.astype(jnp.float32) * (hd ** -0.5)
    # the cache positions each query may see (causal, and the sliding window if any)
    lo = jnp.zeros_like(positions) if window is None else jnp.maximum(positions - window + 1, 0)
    if not spec.quantized:
        k_buf, v_buf = _write_rows(layer.k, k_new, lengths), _write_rows(layer.v, v_new, lengths)
        out = merge_partials([cache_partial(qs, k_buf, v_buf, lo, positions + 1)], q.dtype)
        return out, LayerKV(k_buf, v_buf)

    def fp16(x):  # what the ring and sinks hold: the full-precision path sees the same values from either
        return x.astype(RESIDUAL_DTYPE)

    k_recent, v_recent, k_sink, v_sink = layer.k_recent, layer.v_recent, layer.k_sink, layer.v_sink
    ring = k_recent.shape[1]
    k_buf = _write_keys(layer.k, k_recent, k_new, lengths)
    v_buf = _write_values(layer.v, v_new, lengths)
    fp_from = full_precision_from(positions, spec)  # (B, T)
    # the quantized part: visible positions before the full-precision window, sinks excluded
    parts = [cache_partial(qs, k_buf, v_buf, jnp.maximum(lo, spec.sinks), jnp.minimum(positions + 1, fp_from))]
    fp_from = fp_from[:, :, None]
    if spec.sinks:  # sink positions this call writes go in first
        sink_pos = jnp.broadcast_to(jnp.arange(spec.sinks, dtype=jnp.int32), (b, spec.sinks))
        idx = sink_pos - lengths[:, None]
        take = ((idx >= 0) & (idx < t))[:, :, None, None]
        k_sink = jnp.where(take, fp16(_gather_rows(k_new, idx)), k_sink)
        v_sink = jnp.where(take, fp16(_gather_rows(v_new, idx)), v_sink)
        vis_sink = visibility(positions, sink_pos, window) & (sink_pos[:, None, :] < fp_from)
        parts.append(attend_partial(qs, k_sink, v_sink, vis_sink))
    ring_pos = _ring_positions(lengths, ring)
    vis_ring = visibility(positions, ring_pos, window) & (ring_pos[:, None, :] >= jnp.maximum(fp_from, 0))
    vis_new = visibility(positions, positions, window) & (positions[:, None, :] >= fp_from)
    parts.append(attend_partial(qs, k_recent, v_recent, vis_ring))
    parts.append(attend_partial(qs, fp16(k_new), fp16(v_new), vis_new))
    # the ring keeps the last `ring` positions written: old slots, or this call's rows
    idx = _ring_positions(lengths + n_new, ring) - lengths[:, None]
    from_new = (idx >= 0)[:, :, None, None]
    k_recent = jnp.where(from_new, fp16(_gather_rows(k_new, idx)), k_recent)
    v_recent = jnp.where(from_new, fp16(_gather_rows(v_new, idx)), v_recent)
    return merge_partials(parts, q.dtype), LayerKV(k_buf, v_buf, k_recent, v_recent, k_sink, v_sink)
