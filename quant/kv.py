"""KV-cache precisions: the spec grammar, the stored layout, and its bytes per token.

Grammar (the ``--kv`` flag; canonical form omits the defaults)::

    fp32 | bf16 | fp16
    int8 | int4 [-g{N}] [-kg{G}] [-r{R}] [-s{S}]

* ``fp32``/``bf16``/``fp16``: keys and values stored as floats of that type.
* ``int8``/``int4``: quantized on write in the KIVI layout (Liu et al. 2024, "KIVI: A
  Tuning-Free Asymmetric 2bit Quantization for KV Cache"):

  - **keys per channel**: each of the ``D = n_kv_heads * head_dim`` channels is quantized over
    groups of ``G`` consecutive positions (default 32), asymmetric over the group's own
    ``[min, max]`` (float16 scale and real-valued zero point per group and channel,
    :func:`quantize_key_groups`).  Keys have fixed outlier channels, which per-token groups cannot
    absorb at 4 bits (measured: stories260K perplexity x4 with per-token int4 keys).
  - **values per token**: groups of ``N`` consecutive values of one token's vector, symmetric
    (float16 scale).  The default ``N`` is one head, or the fewest whole heads with at least 32
    values when heads are narrower.
  - **residual window** of up to ``R`` positions (default ``R = G``; a multiple of ``G``): the
    query at position ``p`` sees position ``j`` in full precision (float16) when
    ``j >= G * floor(p / G) - (R - G)``, i.e. ``j`` is in the key group of ``p`` (itself
    included) or in the ``R/G - 1`` groups before it; every older position is dequantized.  A key group is quantized
    once it is complete, from the full-precision copies, which live in a ring buffer of the last
    ``R + rewind`` positions (``rewind``: how far a caller may move the cache length back, as
    speculative decoding does with rejected proposals).  The rule depends only on ``p`` and
    ``j``, so a prefill of many tokens sees exactly what decoding them one by one would.
  - ``-s{S}``: attention sinks (Xiao et al. 2024, StreamingLLM): positions ``0 .. S-1`` are
    also kept in full precision.

Stored layout of a quantized layer (each a :class:`cascade.quant.QuantizedTensor` of logical shape
(batch, max_len, D); ``max_len`` is rounded up to a multiple of ``G``):

* keys: quantized along axis 1 (positions) in groups of ``G``: ``packed`` uint8
  (batch, max_len * bits / 8, D), ``scale`` and ``zero`` float16 (batch, max_len / G, D);
* values: quantized along axis 2 in groups of ``N``: ``packed`` uint8 (batch, max_len,
  D * bits / 8), ``scale`` float16 (batch, max_len, D / N);
* ring: float16 (batch, R + rewind, n_kv_heads, head_dim) for keys and for values; sinks: float16
  (batch, S, n_kv_heads, head_dim) for each.

Bytes per token per layer (:func:`bytes_per_token_per_layer`), keys plus values::

    D * bits / 8 + D * 2 * 2 / G   +   D * bits / 8 + (D / N) * 2

e.g. head_dim 64, int4, G = 32: D * (0.625 + 0.531) = 28.9 % of the fp16 cache's 4 * D.  The
ring and sinks add a fixed ``2 * (R + rewind + S) * D * 2`` bytes per layer and sequence
(:func:`fixed_bytes_per_layer`): at context ``n`` that is ``(R + rewind + S) / n`` of the fp16
cache (6.25 % at n = 512 with R = 32, 1.6 % at 2048).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax.numpy as jnp

from cascade.quant import packing
from cascade.quant.spec import IntSpec

FLOAT_KV = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2), "fp16": ("float16", 2)}
INT_KV = {"int8": 8, "int4": 4}
SCALE_BYTES = 2  # float16 scales and zero points
RESIDUAL_DTYPE, RESIDUAL_BYTES = "float16", 2  # the full-precision ring and sinks (KIVI keeps fp16)
DEFAULT_KEY_GROUP = 32  # positions per key group (KIVI's G)
MIN_DEFAULT_GROUP = 32  # the default value group spans whole heads until it has at least this many values

KV_FORMS = ("fp32 | bf16 | fp16 | int8 | int4, ints optionally with -g<N> (value group), -kg<G> (key group), "
            "-r<R> (full-precision window, a multiple of G), -s<S> (sinks)")
_INT_RE = re.compile(r"^(int8|int4)((?:-(?:g\d+|kg\d+|r\d+|s\d+))*)$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVSpec:
    """How a KV cache stores keys and values (see the module docstring)."""

    name: str = "fp32"  # fp32, bf16, fp16, int8 or int4
    group_size: int | None = None  # values per scale within one token's value vector (None: the model's default)
    key_group: int | None = None  # positions per key group (None: 32 for int caches)
    residual: int | None = None  # positions kept in full precision (None: key_group)
    sinks: int = 0  # first positions kept in full precision

    def __post_init__(self):
        if self.name not in FLOAT_KV and self.name not in INT_KV:
            raise ValueError(f"unknown KV cache precision {self.name!r}; expected {KV_FORMS}")
        if not self.quantized:
            if self.group_size is not None or self.key_group is not None or self.residual is not None or self.sinks:
                raise ValueError(f"a {self.name} cache stores floats: groups, residual and sinks apply to int8/int4 only")
            return
        for name in ("group_size", "key_group"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"KV {name} must be positive, got {value}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.residual is not None and (self.residual <= 0 or self.residual % self.key_positions):
            raise ValueError(f"the residual window ({self.residual}) must be a positive multiple of the key group "
                             f"({self.key_positions})")
        if self.bits == 4 and self.key_positions % 2:
            raise ValueError(f"an int4 key group must be even (codes pack two positions per byte), got {self.key_positions}")
        if self.bits == 4 and self.group_size is not None and self.group_size % 2:
            raise ValueError(f"an int4 value group must be even (codes pack two values per byte), got {self.group_size}")
        # one object per meaning (a static jit argument): defaults are stored as None
        if self.key_group == DEFAULT_KEY_GROUP:
            object.__setattr__(self, "key_group", None)
        if self.residual == self.key_positions:
            object.__setattr__(self, "residual", None)

    @property
    def quantized(self) -> bool:
        return self.name in INT_KV

    @property
    def bits(self) -> int:
        return INT_KV[self.name] if self.quantized else 8 * FLOAT_KV[self.name][1]

    @property
    def float_dtype(self) -> str:
        """The stored type of a float cache (float32 for int caches: what dequantizing returns)."""
        return FLOAT_KV[self.name][0] if not self.quantized else "float32"

    @property
    def key_positions(self) -> int:
        """``G``: positions per key group."""
        return self.key_group or DEFAULT_KEY_GROUP

    @property
    def residual_positions(self) -> int:
        """``R``: the full-precision window (0 for float caches)."""
        return 0 if not self.quantized else (self.residual or self.key_positions)

    def value_group(self, n_kv_heads: int, head_dim: int) -> int:
        """``N`` for a model: the spec's, or one head, or the fewest whole heads with >= 32 values."""
        width = n_kv_heads * head_dim
        if self.group_size is not None:
            if width % self.group_size:
                raise ValueError(f"KV value group {self.group_size} does not divide the {width} values a token "
                                 f"stores per layer ({n_kv_heads} heads x {head_dim})")
            return self.group_size
        heads = min(n_kv_heads, math.ceil(MIN_DEFAULT_GROUP / head_dim))
        while n_kv_heads % heads:  # whole heads that tile the token's vector
            heads += 1
        return heads * head_dim

    def check_context(self, context: int) -> None:
        """Raise ValueError unless the spec fits a model of ``context`` positions: sinks, the key
        group and the full-precision window must each be shorter than (or, for the window and the
        group, at most) the context, or the cache would allocate positions no sequence can reach."""
        if not self.quantized:
            return
        for what, n, ok in (("sink", self.sinks, self.sinks < context),
                            ("key group", self.key_positions, self.key_positions <= context),
                            ("full-precision window", self.residual_positions, self.residual_positions <= context)):
            if not ok:
                raise ValueError(f"KV cache spec {self}: {n} {what} positions do not fit the model's context of "
                                 f"{context} positions")

    def check_model(self, *, context: int, n_kv_heads: int, head_dim: int) -> None:
        """Raise ValueError unless the spec fits a model of this shape: :meth:`check_context`, and a
        value group (``-g``) that divides the ``n_kv_heads * head_dim`` values a token stores.  What
        needs no model is checked when the spec is parsed; this is the rest, from a config alone."""
        self.check_context(context)
        if self.quantized:
            self.value_group(n_kv_heads, head_dim)

    def key_spec(self) -> IntSpec:
        """Keys: along positions, groups of ``G``, asymmetric."""
        return IntSpec(bits=self.bits, granularity="group", group_size=self.key_positions, symmetric=False)

    def value_spec(self, n_kv_heads: int, head_dim: int) -> IntSpec:
        """Values: along one token's vector, groups of ``N``, symmetric."""
        # the narrow symmetric grid, as measured in docs/guides/kv-cache.md (pinned: the weight specs'
        # default grid at 2-4 bits became the full one in spec grammar version 2)
        return IntSpec(bits=self.bits, granularity="group", group_size=self.value_group(n_kv_heads, head_dim),
                       full_range=False)

    def __str__(self) -> str:
        parts = [self.name]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if self.key_group is not None and self.key_group != DEFAULT_KEY_GROUP:
            parts.append(f"kg{self.key_group}")
        if self.residual is not None and self.residual != self.key_positions:
            parts.append(f"r{self.residual}")
        if self.sinks:
            parts.append(f"s{self.sinks}")
        return "-".join(parts)


def quantize_key_groups(x, bits: int, group: int):
    """Per-channel asymmetric quantization of keys over groups of ``group`` positions (KIVI).

    ``x`` (n * group, D) float32 -> ``(packed, scale, zero)``: codes packed along axis 0 as
    :mod:`cascade.quant.packing` lays them out, and float16 ``scale``, ``zero`` of shape (n, D), so that
    ``x_hat = (q - zero) * scale``, the :class:`cascade.quant.QuantizedTensor` convention.  Unlike the
    weight quantizer, the range is each group's own ``[min, max]``, not widened to contain 0, and
    the zero point is a real number (``-min / scale`` in float16, as precise as a float16 copy of
    the minimum): a key channel that sits far from 0 over a group, as outlier channels and slow
    RoPE dimensions do, keeps all ``2**bits`` levels for its spread.
    """
    n = x.shape[0] // group
    xg = x.reshape(n, group, -1)
    lo, hi = xg.min(axis=1), xg.max(axis=1)
    levels = 2**bits - 1
    # a step finer than 1/2**15 of the values is below float16 resolution anyway; the floor keeps
    # |zero| = |min| / scale under 2**15, inside float16's range
    s = jnp.maximum((hi - lo) / levels, jnp.maximum(jnp.abs(lo), jnp.abs(hi)) * 2.0**-15)
    s = jnp.where(s > 0, s, 1.0)
    scale = s.astype(jnp.float16)
    scale = jnp.where(scale.astype(jnp.float32) < s, jnp.nextafter(scale, jnp.float16(jnp.inf)), scale)  # range fits
    zero = (-lo / scale.astype(jnp.float32)).astype(jnp.float16)
    q = jnp.round(xg / scale.astype(jnp.float32)[:, None] + zero.astype(jnp.float32)[:, None])
    codes = jnp.clip(q, 0, levels).astype(jnp.int32).reshape(x.shape)
    return packing.pack_codes(codes, bits, 0), scale, zero


def parse_kv_spec(spec: "KVSpec | str | None") -> KVSpec:
    """A :class:`KVSpec` from its string form (``None`` is ``fp32``)."""
    if spec is None:
        return KVSpec()
    if isinstance(spec, KVSpec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a KV cache spec is a string like 'int8', got {type(spec).__name__}")
    text = spec.strip().lower()
    if text in FLOAT_KV:
        return KVSpec(name=text)
    m = _INT_RE.match(text)
    if not m:
        raise ValueError(f"unknown KV cache spec {spec!r}; expected {KV_FORMS}")
    fields: dict = {"name": m.group(1)}
    for part in m.group(2).split("-")[1:]:
        key = {"g": "group_size", "kg": "key_group", "r": "residual", "s": "sinks"}[part.rstrip("0123456789")]
        if key in fields:
            raise ValueError(f"KV cache spec {spec!r} sets {key} twice")
        fields[key] = int(part.lstrip("gkrs"))
    return KVSpec(**fields)


def bytes_per_token_per_layer(spec: KVSpec | str, n_kv_heads: int, head_dim: int) -> float:
    """Bytes one token adds to one layer's cache: keys plus values, codes plus scales and zero
    points (a key group's scale and zero point are shared by its ``G`` positions, hence a float)."""
    spec = parse_kv_spec(spec)
    width = n_kv_heads * head_dim
    if not spec.quantized:
        return 2 * width * FLOAT_KV[spec.name][1]
    keys = width * spec.bits / 8 + width * 2 * SCALE_BYTES / spec.key_positions
    values = width * spec.bits / 8 + width // spec.value_group(n_kv_heads, head_dim) * SCALE_BYTES
    return keys + values


def fixed_bytes_per_layer(spec: KVSpec | str, n_kv_heads: int, head_dim: int, *, rewind: int = 0) -> int:
    """Bytes per layer and sequence that do not grow with the context: the full-precision ring
    (``R + rewind`` positions) and sinks, keys plus values."""
    spec = parse_kv_spec(spec)
    if not spec.quantized:
        return 0
    return 2 * (spec.residual_positions + rewind + spec.sinks) * n_kv_heads * head_dim * RESIDUAL_BYTES
