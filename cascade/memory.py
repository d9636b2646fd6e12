"""Device memory of a cascade: weights plus KV caches of both models, against a budget.

Two ways to get a plan: :func:`plan_memory` counts a *loaded* pair's weights as they are;
:func:`plan_from_configs` computes the same numbers from the models' configs, their precision rules
and the KV specs alone, before any weight is loaded (the bytes of each tensor under its spec, from
the parameter shapes), so a budget can be refused without reading the weights.

The plan counts what the runtime allocates for ``batch`` sequences of up to ``ctx`` positions
(prompt plus generated tokens): each model's weights as stored (codes, scales and zero points of
quantized tensors) and its KV cache at its precision (:func:`cascade.models.kv_cache_memory`) at the
length the runtime gives it: :func:`cascade.models.decoder.cache_length` alone, or
:func:`cascade.models.decoder.cache_room` in a cascade (room for one more draft round, and a
full-precision ring sized for ``draft_len + 1`` rewound positions), for the longest prompt that
fits in ``ctx``.  Plus the **workspace** of the largest single call (:func:`workspace_bytes`):
activations, attention scores, logits, and the float32 weights the reference matmul dequantizes
on calls of many rows (a prefill); the models run one call at a time, so the plan adds the larger
of the two models' workspaces, not their sum.  It is an upper estimate: XLA's own buffer
assignment (``compiled.memory_analysis().temp_size_in_bytes``) for the runtime's calls stays below
it (tested), at half to three quarters of it for a full-context prefill.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax

from cascade.models import kv_cache_memory, weight_bytes
from cascade.models.decoder import cache_length, cache_room, prompt_bucket

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
    workspace_bytes: int = 0  # scratch of this model's largest call (the plan adds the larger model's)

    @property
    def total(self) -> int:
        """Weights and KV cache: what stays allocated."""
        return self.weight_bytes + self.kv_bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    ctx: int
    batch: int
    models: tuple[ModelMemory, ...]
    budget: int | None

    @property
    def workspace(self) -> int:
        """Scratch of the largest single call of either model (they run one call at a time)."""
        return max((m.workspace_bytes for m in self.models), default=0)

    @property
    def total(self) -> int:
        """Weights and KV caches of both models plus the workspace of the largest call."""
        return sum(m.total for m in self.models) + self.workspace

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def to_json(self) -> dict:
        return {"ctx": self.ctx, "batch": self.batch, "budget": self.budget, "total_bytes": self.total,
                "workspace_bytes": self.workspace, "fits": self.fits,
                "models": [{**dataclasses.asdict(m), "total_bytes": m.total} for m in self.models]}

    def table(self) -> str:
        lines = [f"{'model':<6} {'weights':<14} {'kv':<8} {'weight bytes':>14} {'KV positions':>12} {'KV bytes':>14} "
                 f"{'total':>14}"]
        for m in self.models:
            lines.append(f"{m.role:<6} {str(m.quant or 'as loaded'):<14} {m.kv:<8} {m.weight_bytes:>14,} {m.kv_positions:>12,} "
                         f"{m.kv_bytes:>14,} {m.total:>14,}")
        lines.append(f"workspace of the largest call (activations, attention scores, logits): {self.workspace:,} bytes")
        lines.append(f"total for {self.batch} sequence(s) of up to {self.ctx} positions: {self.total:,} bytes "
                     f"({self.total / 2**20:.1f} MiB)")
        if self.budget is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"budget {self.budget:,} bytes ({self.budget / 2**20:.1f} MiB): {verdict}")
        return "\n".join(lines)


def planned_weight_bytes(cfg, rules, *, scale_dtype="float16") -> int:
    """Bytes of a model's weights after quantizing under ``rules`` (what :func:`cascade.models.quantize_model`
    stores), from the config alone: each parameter's shape and the spec its rule gives it (codes,
    scales and zero points of an integer spec; the cast of a float spec; float32 for a parameter no
    rule touches, as quantization leaves a dequantized import)."""
    from cascade.models.quantize import reduction_axis
    from cascade.quant.rules import PrecisionRules
    from cascade.quant.spec import FloatSpec

    parsed = PrecisionRules.parse(rules)
    total = 0
    for path, shape in _param_shapes(cfg):
        spec = parsed.spec_for(path, len(shape))
        n = math.prod(shape)
        if spec is None:
            total += 4 * n
        elif isinstance(spec, FloatSpec):
            total += n * spec.bits // 8
        else:
            total += _quantized_nbytes(tuple(shape), spec, reduction_axis(path, shape), str(scale_dtype))
    return total


@functools.lru_cache(maxsize=64)
def _param_shapes(cfg) -> tuple:
    """``(path, shape)`` of every parameter of ``cfg`` (traced once per config: a budget check plans
    several times)."""
    from cascade.models.llama import param_shapes

    return tuple(param_shapes(cfg).items())


@functools.lru_cache(maxsize=4096)
def _quantized_nbytes(shape: tuple, spec, axis: int, scale_dtype: str) -> int:
    """Bytes of a ``shape`` tensor quantized under ``spec`` (traced with ``jax.eval_shape``, never
    allocated; cached, since a model repeats a few shapes and a budget check plans several times)."""
    import jax
    import jax.numpy as jnp

    from cascade.quant.qtensor import quantize

    return jax.eval_shape(functools.partial(quantize, spec=spec, axis=axis, scale_dtype=scale_dtype),
                          jax.ShapeDtypeStruct(shape, jnp.float32)).nbytes


def workspace_bytes(cfg, *, batch: int, positions: int, prompt_tokens: int, verify_tokens: int,
                    quantized_kv: bool, quantized_weights: bool) -> int:
    """Scratch bytes of a model's largest call: a prefill of ``prompt_tokens`` per row (logits of the
    last position only) or a call of ``verify_tokens`` per row with all their logits (decode steps,
    a speculative verification), ``batch`` rows against a cache of ``positions``.

    Per call, one and a half times (a layer's buffers overlap the next one's) the float32 hidden
    states, q/k/v and MLP activations, the attention scores, probabilities and mask, and for a
    quantized cache the float32 copy of one layer's keys and values; plus four layers' float32 keys
    and values (cache writes), the float32 logits, and, when the call has more rows than the native kernel takes
    (:data:`cascade.quant.kernels.cpu.MAX_ROWS`), every quantized linear weight dequantized to
    float32 by the reference matmul."""
    from cascade.quant.kernels.cpu import MAX_ROWS

    layer_kv = batch * positions * cfg.n_kv_heads * cfg.head_dim * 4 * 2
    linear = sum(math.prod(shape) for path, shape in _param_shapes(cfg) if len(shape) == 2 and not path.startswith("embed"))
    worst = 0
    for tokens, logit_rows in ((prompt_tokens, 1), (verify_tokens, verify_tokens)):
        rows = batch * tokens
        act = rows * (4 * cfg.dim + 2 * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + 3 * cfg.hidden_dim) * 4
        att = 3 * batch * cfg.n_heads * tokens * positions * 4
        dequantized = 4 * linear if quantized_weights and rows > MAX_ROWS else 0
        logits = batch * logit_rows * cfg.vocab_size * 4
        worst = max(worst, 3 * (act + att + (layer_kv if quantized_kv else 0)) // 2 + 4 * layer_kv + dequantized + logits)
    return worst


def plan_from_configs(small: str | None, large: str | None, *, small_quant: str | None = "int4",
                      large_quant: str | None = "int8", ctx: int | None = None, batch: int = 1, small_kv: str = "fp32",
                      large_kv: str = "fp32", draft_len: int | str = 4, budget: int | str | None = None,
                      scale_dtype="float16") -> MemoryPlan:
    """:func:`plan_memory` for the pair ``small``/``large`` (names or paths; None: absent) quantized
    under ``*_quant``, computed from the configs without loading weights.  A model kept as stored
    (``*_quant`` None or "none") cannot be counted this way: ValueError (use :func:`plan_memory`)."""
    from cascade.models.loaders import read_config

    roles = [(role, src, quant, kv) for role, src, quant, kv in (("small", small, small_quant, small_kv),
                                                                  ("large", large, large_quant, large_kv))
             if src is not None]
    if not roles:
        raise ValueError("the pair has no model to plan for")
    configs = {role: read_config(src) for role, src, _, _ in roles}
    weights = {}
    for role, src, quant, _ in roles:
        if quant is None or str(quant).strip().lower() in ("none", "source"):
            raise ValueError(f"the {role} model keeps its stored weights: its bytes are counted from the loaded "
                             "model (plan_memory), not from its config")
        weights[role] = planned_weight_bytes(configs[role], quant, scale_dtype=scale_dtype)
    return _plan([(role, src, quant, kv, configs[role], weights[role], _has_integer_spec(quant))
                  for role, src, quant, kv in roles], ctx=ctx, batch=batch, draft_len=draft_len, budget=budget)


def _has_integer_spec(rules) -> bool:
    from cascade.quant.rules import PrecisionRules
    from cascade.quant.spec import IntSpec

    parsed = PrecisionRules.parse(rules)
    return any(isinstance(spec, IntSpec) for spec in (*(s for _, s in parsed.rules), parsed.default))


def over_budget_message(plan: MemoryPlan, **request) -> str:
    """One line for a plan over its budget: by how much, and which single changes would fit
    (``request``: the :func:`plan_from_configs` arguments that made ``plan``)."""
    over = plan.total - plan.budget
    tries = []
    kinds = {m.role: m for m in plan.models}
    if any(not m.kv.startswith("int4") for m in plan.models):
        tries.append(("--kv int4", {"small_kv": "int4", "large_kv": "int4"}))
    for role in ("large", "small"):
        if role in kinds and str(kinds[role].quant) not in ("int4", "int4-g128"):
            tries.append((f"--{role} int4", {f"{role}_quant": "int4"}))
    ctx = plan.ctx // 2
    while ctx >= 16:
        tries.append((f"--ctx {ctx}", {"ctx": ctx}))
        ctx //= 2
    batch = plan.batch // 2
    while batch >= 1:
        tries.append((f"--batch {batch}", {"batch": batch}))
        batch //= 2
    fits, seen = [], set()
    for label, change in tries:
        flag = label.split()[0]
        if flag in seen:
            continue
        try:
            alt = plan_from_configs(**{**request, **change})
        except ValueError:
            continue
        if alt.total <= plan.budget:
            fits.append(f"{label} ({alt.total:,} bytes)")
            seen.add(flag)
    hint = f"; would fit: {', '.join(fits)}" if fits else "; nothing smaller in one change fits"
    return (f"the plan needs {plan.total:,} bytes for {plan.batch} sequence(s) of {plan.ctx} positions; the budget "
            f"is {plan.budget:,} bytes ({over:,} over){hint}")


def plan_memory(pair, *, ctx: int | None = None, batch: int = 1, small_kv: str = "fp32", large_kv: str = "fp32",
                draft_len: int | str = 4, budget: int | str | None = None) -> MemoryPlan:
    """The memory plan of a loaded :class:`cascade.pair.ModelPair` (either model may be absent)."""
    from cascade.quant.qtensor import QuantizedTensor

    def quantized(params) -> bool:
        return any(isinstance(leaf, QuantizedTensor) for leaf in
                   jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedTensor)))

    models = [(role, m.source, m.quant, kv, m.config, weight_bytes(m.params), quantized(m.params))
              for role, m, kv in (("small", pair.small, small_kv), ("large", pair.large, large_kv)) if m is not None]
    if not models:
        raise ValueError("the pair has no model to plan for")
    return _plan(models, ctx=ctx, batch=batch, draft_len=draft_len, budget=budget)


def _plan(models, *, ctx, batch, draft_len, budget) -> MemoryPlan:
    """``models``: (role, source, quant, kv, config, weight bytes, quantized weights?) per model."""
    context = min(m[4].max_seq_len for m in models)
    ctx = ctx or context
    if ctx > context:
        raise ValueError(f"ctx {ctx} exceeds the context of the pair ({context})")
    from cascade.speculative import draft_setting

    draft_len = draft_setting(draft_len)[0]  # "auto": its longest draft
    speculative = len(models) == 2
    rewind = draft_len + 1 if speculative else 0
    # the runtime's cache length for sequences of at most ctx positions (any prompt/new split)
    positions = (max(cache_room(n, ctx - n, draft_len, context) for n in range(1, ctx + 1)) if speculative
                 else cache_length(models[0][4], ctx))
    longest_prompt = prompt_bucket(ctx - 1)  # the prefill of the longest prompt that leaves room for a token
    rows = []
    for role, source, quant, kv, cfg, wbytes, quantized in models:
        mem = kv_cache_memory(cfg, kv, positions, batch=batch, rewind=rewind)
        work = workspace_bytes(cfg, batch=batch, positions=positions, prompt_tokens=min(longest_prompt, positions),
                               verify_tokens=draft_len + 1 if speculative else 1, quantized_kv=mem["kv"] not in
                               ("fp32", "bf16", "fp16"), quantized_weights=quantized)
        rows.append(ModelMemory(role=role, source=source, quant=quant, kv=mem["kv"], weight_bytes=wbytes,
                                kv_positions=positions, kv_bytes=mem["bytes"], kv_bytes_per_token=mem["bytes_per_token"],
                                workspace_bytes=work))
    return MemoryPlan(ctx=ctx, batch=batch, models=tuple(rows),
                      budget=None if budget is None else parse_bytes(budget) if isinstance(budget, str) else int(budget))
