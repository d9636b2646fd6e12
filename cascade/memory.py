"""Device memory of a cascade: weights plus KV caches of both models, against a budget.

The plan counts what the runtime allocates for ``batch`` sequences of up to ``ctx`` positions
(prompt plus generated tokens): each model's weights as stored (codes, scales and zero points of
quantized tensors) and its KV cache at its precision (:func:`cascade.models.kv_cache_memory`) at the
length the runtime gives it: :func:`cascade.models.decoder.cache_length` alone, or
:func:`cascade.models.decoder.cache_room` in a cascade (room for one more draft round, and a
full-precision ring sized for ``draft_len + 1`` rewound positions), for the longest prompt that
fits in ``ctx``.  Not counted: activations and XLA scratch space, which include a float32 copy
of one layer's dequantized keys and values and the attention scores of the current call.
"""

from __future__ import annotations

import dataclasses
import re

from cascade.models import kv_cache_memory, weight_bytes
from cascade.models.decoder import cache_length, cache_room

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "t": 1000**4, "tb": 1000**4}


def parse_bytes(text: str) -> int:
    """``"2GiB"``, ``"512 MB"``, ``"1.5g"``, ``"1000000"`` -> bytes (SI and binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 2GiB, 512MB or 1000000")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelMemory:
    role: str  # "small" or "large"
    source: str
    quant: str | None
    kv: str
    weight_bytes: int
    kv_positions: int  # the cache length the runtime allocates
    kv_bytes: int
    kv_bytes_per_token: float

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    ctx: int
    batch: int
    models: tuple[ModelMemory, ...]
    budget: int | None

    @property
    def total(self) -> int:
        return sum(m.total for m in self.models)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def to_json(self) -> dict:
        return {"ctx": self.ctx, "batch": self.batch, "budget": self.budget, "total_bytes": self.total,
                "fits": self.fits, "models": [{**dataclasses.asdict(m), "total_bytes": m.total} for m in self.models]}

    def table(self) -> str:
        lines = [f"{'model':<6} {'weights':<14} {'kv':<8} {'weight bytes':>14} {'KV positions':>12} {'KV bytes':>14} "
                 f"{'total':>14}"]
        for m in self.models:
            lines.append(f"{m.role:<6} {str(m.quant or 'as loaded'):<14} {m.kv:<8} {m.weight_bytes:>14,} {m.kv_positions:>12,} "
                         f"{m.kv_bytes:>14,} {m.total:>14,}")
        lines.append(f"total for {self.batch} sequence(s) of up to {self.ctx} positions: {self.total:,} bytes "
                     f"({self.total / 2**20:.1f} MiB)")
        if self.budget is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"budget {self.budget:,} bytes ({self.budget / 2**20:.1f} MiB): {verdict}")
        return "\n".join(lines)


def plan_memory(pair, *, ctx: int | None = None, batch: int = 1, small_kv: str = "fp32", large_kv: str = "fp32",
                draft_len: int = 4, budget: int | str | None = None) -> MemoryPlan:
    """The memory plan of a loaded :class:`cascade.pair.ModelPair` (either model may be absent)."""
    models = [(role, m, kv) for role, m, kv in (("small", pair.small, small_kv), ("large", pair.large, large_kv))
              if m is not None]
    if not models:
        raise ValueError("the pair has no model to plan for")
    context = min(m.config.max_seq_len for _, m, _ in models)
    ctx = ctx or context
    if ctx > context:
        raise ValueError(f"ctx {ctx} exceeds the context of the pair ({context})")
    speculative = len(models) == 2
    rewind = draft_len + 1 if speculative else 0
    # the runtime's cache length for sequences of at most ctx positions (any prompt/new split)
    positions = (max(cache_room(n, ctx - n, draft_len, context) for n in range(1, ctx + 1)) if speculative
                 else cache_length(models[0][1].config, ctx))
    rows = []
    for role, m, kv in models:
        mem = kv_cache_memory(m.config, kv, positions, batch=batch, rewind=rewind)
        rows.append(ModelMemory(role=role, source=m.source, quant=m.quant, kv=mem["kv"], weight_bytes=weight_bytes(m.params),
                                kv_positions=positions, kv_bytes=mem["bytes"], kv_bytes_per_token=mem["bytes_per_token"]))
    return MemoryPlan(ctx=ctx, batch=batch, models=tuple(rows),
                      budget=None if budget is None else parse_bytes(budget) if isinstance(budget, str) else int(budget))
