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

**More than one device** (``tp``, ``small_devices``; :mod:`cascade.models.sharding`): the large
model split over ``tp`` devices in the Megatron layout, and the small one either replicated on
those same devices (default) or split over ``small_devices`` devices of its own.  Each model's
per-device bytes are the one-device formulas applied to the config of one shard
(:func:`cascade.models.sharding.shard_config`: heads, KV heads, MLP features and vocabulary
divided by the model's ``tp``), which are exactly the shapes each device holds.  The plan then
reports the bytes of the fullest device (``bytes_per_device``), and a budget applies to that: one
device's memory, as on a GPU or TPU.
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
    tp: int = 1  # devices the model is split over
    weight_bytes_per_device: int | None = None  # one shard's (None: tp 1, the whole)
    kv_bytes_per_device: int | None = None
    workspace_bytes_per_device: int | None = None

    def __post_init__(self):
        for name in ("weight_bytes", "kv_bytes", "workspace_bytes"):
            if getattr(self, f"{name}_per_device") is None:
                object.__setattr__(self, f"{name}_per_device", getattr(self, name))

    @property
    def total(self) -> int:
        """Weights and KV cache: what stays allocated."""
        return self.weight_bytes + self.kv_bytes

    @property
    def total_per_device(self) -> int:
        """One device's share of :attr:`total`."""
        return self.weight_bytes_per_device + self.kv_bytes_per_device


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    ctx: int
    batch: int
    models: tuple[ModelMemory, ...]
    budget: int | None
    small_devices: int | None = None  # the small model on devices of its own (None: beside the large one)

    @property
    def workspace(self) -> int:
        """Scratch of the largest single call of either model (they run one call at a time)."""
        return max((m.workspace_bytes for m in self.models), default=0)

    @property
    def total(self) -> int:
        """Weights and KV caches of both models plus the workspace of the largest call."""
        return sum(m.total for m in self.models) + self.workspace

    @property
    def device_groups(self) -> dict[str, dict]:
        """``{group: {"devices": n, "bytes": per device}}``: the devices that hold the same things.
        One group ``"all"`` unless the small model has devices of its own (``"large"``, ``"small"``);
        models sharing devices share the workspace of the larger call."""
        if self.small_devices is None:
            groups = {"all": list(self.models)}
        else:
            groups = {m.role: [m] for m in self.models}
        return {name: {"devices": max(m.tp for m in ms),
                       "bytes": sum(m.total_per_device for m in ms) + max(m.workspace_bytes_per_device for m in ms)}
                for name, ms in groups.items()}

    @property
    def devices(self) -> int:
        return sum(g["devices"] for g in self.device_groups.values())

    @property
    def bytes_per_device(self) -> int:
        """The fullest device's bytes: what a per-device budget is checked against (one device: :attr:`total`)."""
        return max(g["bytes"] for g in self.device_groups.values())

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.bytes_per_device <= self.budget

    def to_json(self) -> dict:
        return {"ctx": self.ctx, "batch": self.batch, "budget": self.budget, "total_bytes": self.total,
                "workspace_bytes": self.workspace, "fits": self.fits, "devices": self.devices,
                "small_devices": self.small_devices, "bytes_per_device": self.bytes_per_device,
                "device_groups": self.device_groups,
                "models": [{**dataclasses.asdict(m), "total_bytes": m.total, "total_bytes_per_device": m.total_per_device}
                           for m in self.models]}

    def table(self) -> str:
        lines = [f"{'model':<6} {'weights':<14} {'kv':<8} {'weight bytes':>14} {'KV positions':>12} {'KV bytes':>14} "
                 f"{'total':>14}"]
        for m in self.models:
            lines.append(f"{m.role:<6} {str(m.quant or 'as loaded'):<14} {m.kv:<8} {m.weight_bytes:>14,} {m.kv_positions:>12,} "
                         f"{m.kv_bytes:>14,} {m.total:>14,}")
        lines.append(f"workspace of the largest call (activations, attention scores, logits): {self.workspace:,} bytes")
        lines.append(f"total for {self.batch} sequence(s) of up to {self.ctx} positions: {self.total:,} bytes "
                     f"({self.total / 2**20:.1f} MiB)")
        if self.devices > 1:
            for name, g in self.device_groups.items():
                held = [m.role for m in self.models if name in ("all", m.role)]
                who = " and ".join(held) + (" models" if len(held) > 1 else " model")
                split = ", ".join(f"{m.role} tp={m.tp}" + (" (replicated)" if m.tp == 1 and g["devices"] > 1 else "")
                                  for m in self.models if name in ("all", m.role))
                lines.append(f"on each of {g['devices']} device(s) holding the {who} ({split}): "
                             f"{g['bytes']:,} bytes ({g['bytes'] / 2**20:.1f} MiB)")
        if self.budget is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            what = "per device" if self.devices > 1 else ""
            lines.append(f"budget {self.budget:,} bytes ({self.budget / 2**20:.1f} MiB){' ' + what if what else ''}: {verdict}")
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
                      scale_dtype="float16", tp: int = 1, small_devices: int | None = None) -> MemoryPlan:
    """:func:`plan_memory` for the pair ``small``/``large`` (names or paths; None: absent) quantized
    under ``*_quant``, computed from the configs without loading weights.  A model kept as stored
    (``*_quant`` None or "none") cannot be counted this way: ValueError (use :func:`plan_memory`).
    ``tp``/``small_devices``: the placement (module docs)."""
    from cascade.models.sharding import shard_config

    from cascade.models.loaders import read_config

    roles = [(role, src, quant, kv) for role, src, quant, kv in (("small", small, small_quant, small_kv),
                                                                  ("large", large, large_quant, large_kv))
             if src is not None]
    if not roles:
        raise ValueError("the pair has no model to plan for")
    configs = {role: read_config(src) for role, src, _, _ in roles}
    splits = _splits([r[0] for r in roles], tp, small_devices)
    weights = {}
    for role, src, quant, _ in roles:
        if quant is None or str(quant).strip().lower() in ("none", "source"):
            raise ValueError(f"the {role} model keeps its stored weights: its bytes are counted from the loaded "
                             "model (plan_memory), not from its config")
        weights[role] = (planned_weight_bytes(configs[role], quant, scale_dtype=scale_dtype),
                         planned_weight_bytes(shard_config(configs[role], splits[role]), quant, scale_dtype=scale_dtype))
    return _plan([(role, src, quant, kv, configs[role], weights[role], _has_integer_spec(quant))
                  for role, src, quant, kv in roles], ctx=ctx, batch=batch, draft_len=draft_len, budget=budget,
                 splits=splits, small_devices=small_devices)


def _splits(roles: list[str], tp: int, small_devices: int | None) -> dict[str, int]:
    """Each model's tp: the large model (or a lone one) over ``tp``; the small one replicated beside
    it (1) or over its own ``small_devices``."""
    for name, n in (("tp", tp), ("small_devices", small_devices)):
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    if small_devices is not None and "small" not in roles:
        raise ValueError("small_devices needs a small model")
    if roles == ["small"]:
        return {"small": tp if small_devices is None else small_devices}
    return {"large": tp, **({"small": 1 if small_devices is None else small_devices} if "small" in roles else {})}


def _has_integer_spec(rules) -> bool:
    from cascade.quant.rules import PrecisionRules
    from cascade.quant.spec import IntSpec

    parsed = PrecisionRules.parse(rules)
    return any(isinstance(spec, IntSpec) for spec in (*(s for _, s in parsed.rules), parsed.default))


def over_budget_message(plan: MemoryPlan, **request) -> str:
    """One line for a plan over its budget: by how much, and which single changes would fit
    (``request``: the :func:`plan_from_configs` arguments that made ``plan``)."""
    need = plan.bytes_per_device
    over = need - plan.budget
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
    tp = request.get("tp", 1)
    for more in (2 * tp, 4 * tp, 8 * tp):  # more devices for the large model (a tp it cannot use is skipped)
        tries.append((f"--mesh tp={more}", {"tp": more}))
    fits, seen = [], set()
    for label, change in tries:
        flag = label.split()[0]
        if flag in seen:
            continue
        try:
            alt = plan_from_configs(**{**request, **change})
        except ValueError:
            continue
        if alt.fits:
            fits.append(f"{label} ({alt.bytes_per_device:,} bytes{' per device' if alt.devices > 1 else ''})")
            seen.add(flag)
    hint = f"; would fit: {', '.join(fits)}" if fits else "; nothing smaller in one change fits"
    where = f" on the fullest of {plan.devices} devices" if plan.devices > 1 else ""
    return (f"the plan needs {need:,} bytes{where} for {plan.batch} sequence(s) of {plan.ctx} positions; the budget "
            f"is {plan.budget:,} bytes ({over:,} over){hint}")


def plan_memory(pair, *, ctx: int | None = None, batch: int = 1, small_kv: str = "fp32", large_kv: str = "fp32",
                draft_len: int | str = 4, budget: int | str | None = None, tp: int = 1,
                small_devices: int | None = None) -> MemoryPlan:
    """The memory plan of a loaded :class:`cascade.pair.ModelPair` (either model may be absent);
    ``tp``/``small_devices``: the placement (module docs)."""
    from cascade.models.sharding import check_mesh, planned_bytes_per_device
    from cascade.quant.qtensor import QuantizedTensor

    def quantized(params) -> bool:
        return any(isinstance(leaf, QuantizedTensor) for leaf in
                   jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedTensor)))

    present = [(role, m, kv) for role, m, kv in (("small", pair.small, small_kv), ("large", pair.large, large_kv))
               if m is not None]
    if not present:
        raise ValueError("the pair has no model to plan for")
    splits = _splits([role for role, _, _ in present], tp, small_devices)
    for role, m, _ in present:
        check_mesh(m.params, m.config, splits[role])
    models = [(role, m.source, m.quant, kv, m.config,
               (weight_bytes(m.params), planned_bytes_per_device(m.params, splits[role])), quantized(m.params))
              for role, m, kv in present]
    return _plan(models, ctx=ctx, batch=batch, draft_len=draft_len, budget=budget, splits=splits,
                 small_devices=small_devices)


def _plan(models, *, ctx, batch, draft_len, budget, splits=None, small_devices=None) -> MemoryPlan:
    """``models``: (role, source, quant, kv, config, (weight bytes, per device), quantized weights?)
    per model; ``splits``: each role's tp (default 1)."""
    from cascade.models.sharding import shard_config

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
    for role, source, quant, kv, cfg, (wbytes, wbytes_device), quantized in models:
        tp = (splits or {}).get(role, 1)
        shard = shard_config(cfg, tp)
        mem, mem_device = (kv_cache_memory(c, kv, positions, batch=batch, rewind=rewind) for c in (cfg, shard))
        work, work_device = (
            workspace_bytes(c, batch=batch, positions=positions, prompt_tokens=min(longest_prompt, positions),
                            verify_tokens=draft_len + 1 if speculative else 1, quantized_kv=mem["kv"] not in
                            ("fp32", "bf16", "fp16"), quantized_weights=quantized) for c in (cfg, shard))
        rows.append(ModelMemory(role=role, source=source, quant=quant, kv=mem["kv"], weight_bytes=wbytes,
                                kv_positions=positions, kv_bytes=mem["bytes"], kv_bytes_per_token=mem["bytes_per_token"],
                                workspace_bytes=work, tp=tp, weight_bytes_per_device=wbytes_device,
                                kv_bytes_per_device=mem_device["bytes"], workspace_bytes_per_device=work_device))
    return MemoryPlan(ctx=ctx, batch=batch, models=tuple(rows), small_devices=small_devices,
                      budget=None if budget is None else parse_bytes(budget) if isinstance(budget, str) else int(budget))
