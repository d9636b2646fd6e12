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
import math
import re

import jax

from cascade.console import format_table
from cascade.models import kv_cache_memory, weight_bytes
from cascade.models.decoder import cache_length, cache_room, prompt_bucket
from cascade.models.quantize import config_param_shapes as _param_shapes
from cascade.models.quantize import planned_weight_bytes

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "t": 1000**4, "tb": 1000**4}


def parse_bytes(text) -> int:
    """``"2GiB"``, ``"512 MB"``, ``"1.5g"``, ``"1000000"`` (or a number) -> bytes (SI and binary units,
    a fraction of a byte rounded down).  The one parser of every memory budget: a size that is not a
    number with a unit, negative, zero or under one byte is a ValueError saying so."""
    import decimal

    if isinstance(text, bool) or not isinstance(text, (str, int, float, decimal.Decimal)):
        raise ValueError(f"a memory budget is a size such as 2GiB, 512MB or 1000000, got {text!r}")
    if isinstance(text, str):
        m = re.fullmatch(r"\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))\s*([a-zA-Z]*)\s*", text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read {text!r} as a size; write e.g. 2GiB, 512MB or 1000000")
        value = decimal.Decimal(m.group(1)) * _UNITS[m.group(2).lower()]  # exact: "0.57k" is 570 bytes
    else:
        try:
            value = decimal.Decimal(text)
        except (ValueError, decimal.InvalidOperation):
            raise ValueError(f"cannot read {text!r} as a size") from None
        if not value.is_finite():
            raise ValueError(f"a memory budget must be a finite number of bytes, got {text!r}")
    if value <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    if value < 1:
        raise ValueError(f"a memory budget must be at least 1 byte, got {text!r} ({value.normalize():f} bytes)")
    return int(value)  # whole bytes: rounded down


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
    prompt_tokens: int | None = None  # a plan for one run: its longest prompt's tokens (None: any split of ctx)
    max_new_tokens: int | None = None  # ... and the tokens it generates (ctx = prompt_tokens + max_new_tokens)

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
        return {"ctx": self.ctx, "batch": self.batch, "prompt_tokens": self.prompt_tokens,
                "max_new_tokens": self.max_new_tokens, "budget": self.budget, "total_bytes": self.total,
                "workspace_bytes": self.workspace, "fits": self.fits, "devices": self.devices,
                "small_devices": self.small_devices, "bytes_per_device": self.bytes_per_device,
                "device_groups": self.device_groups,
                "models": [{**dataclasses.asdict(m), "total_bytes": m.total, "total_bytes_per_device": m.total_per_device}
                           for m in self.models]}

    def table(self) -> str:
        rows = [(m.role, str(m.quant or "as loaded"), m.kv, f"{m.weight_bytes:,}", f"{m.kv_positions:,}", f"{m.kv_bytes:,}",
                 f"{m.total:,}") for m in self.models]
        lines = [format_table(rows, ("model", "weights", "kv", "weight bytes", "KV positions", "KV bytes", "total"),
                              align="<<<>>>>")]
        lines.append(f"workspace of the largest call (activations, attention scores, logits): {self.workspace:,} bytes")
        run = (f" ({self.prompt_tokens} prompt tokens + {self.max_new_tokens} new)"
               if self.max_new_tokens is not None else "")
        lines.append(f"total for {self.batch} sequence(s) of up to {self.ctx} positions{run}: {self.total:,} bytes "
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


def plan_from_configs(small: str | None, large: str | None, *, small_quant: str | None = None,
                      large_quant: str | None = None, ctx: int | None = None, batch: int = 1, small_kv: str = "fp32",
                      large_kv: str = "fp32", draft_len: int | str = 4, budget: int | str | None = None,
                      scale_dtype="float16", tp: int = 1, small_devices: int | None = None,
                      prompt_tokens: int | None = None, max_new_tokens: int | None = None) -> MemoryPlan:
    """:func:`plan_memory` for the pair ``small``/``large`` (names or paths; None: absent) quantized
    under ``*_quant`` (None: the default of :func:`cascade.pair.load_pair`), computed from the configs
    without loading weights.  A model kept as stored (``*_quant`` "none", or the default for a model
    already quantized) cannot be counted this way: ValueError (use :func:`plan_memory`).
    ``tp``/``small_devices``: the placement (module docs); ``prompt_tokens``/``max_new_tokens``: the
    plan of one run (its longest prompt and the tokens it generates) instead of ``ctx``."""
    from cascade.models.sharding import shard_config

    from cascade.models.loaders import read_config
    from cascade.pair import resolve_quant

    roles = [(role, src, resolve_quant(src, quant, role), kv)
             for role, src, quant, kv in (("small", small, small_quant, small_kv), ("large", large, large_quant, large_kv))
             if src is not None]
    if not roles:
        raise ValueError("the pair has no model to plan for")
    configs = {role: read_config(src) for role, src, _, _ in roles}
    splits = _splits([r[0] for r in roles], tp, small_devices)
    weights = {}
    for role, src, quant, _ in roles:
        if quant is None or str(quant).strip().lower() in ("none", "source", "source-a8"):
            raise ValueError(f"the {role} model keeps its stored weights: its bytes are counted from the loaded "
                             "model (plan_memory), not from its config")
        shard = _shard(shard_config, configs[role], splits[role], role, small_devices)
        weights[role] = (planned_weight_bytes(configs[role], quant, scale_dtype=scale_dtype),
                         planned_weight_bytes(shard, quant, scale_dtype=scale_dtype))
    return _plan([(role, src, quant, kv, configs[role], weights[role], _has_integer_spec(quant))
                  for role, src, quant, kv in roles], ctx=ctx, batch=batch, draft_len=draft_len, budget=budget,
                 splits=splits, small_devices=small_devices, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens)


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


# How Cascade.load spells each change an over-budget message can suggest (the CLI passes its flags).
KEYWORDS = {"kv": "kv={!r}", "small_kv": "small_kv={!r}", "large_kv": "large_kv={!r}",
            "small_quant": "small_quant={!r}", "large_quant": "large_quant={!r}", "ctx": "ctx={}", "batch": "batch={}"}


def over_budget_message(plan: MemoryPlan, *, flags: dict | None = None, max_devices: int | None = None,
                        replan=None, **request) -> str:
    """One line for a plan over its budget: by how much, and which single changes would fit.

    ``request``: the :func:`plan_from_configs` arguments that made ``plan``; ``replan(**change)``:
    how to plan with a change (default: :func:`plan_from_configs` of ``request`` with the change).
    ``flags``: ``{setting: format}``, how the caller spells each setting it accepts (default
    :data:`KEYWORDS`, those of :meth:`cascade.Cascade.load`): ``kv`` (both models' KV),
    ``small_kv``, ``large_kv``, ``small_quant``, ``large_quant``, ``ctx``, ``batch``,
    ``max_new_tokens``, ``tp``.  A change the caller has no spelling for is not suggested, so every
    suggestion can be passed back as it reads.  ``max_devices``: the most devices a suggested
    ``tp`` (plus ``small_devices``) may use (None: any)."""
    flags = KEYWORDS if flags is None else flags
    replan = replan or (lambda **change: plan_from_configs(**{**request, **change}))
    need = plan.bytes_per_device
    over = need - plan.budget
    tries = []  # (label, change)
    kinds = {m.role: m for m in plan.models}
    if any(not m.kv.startswith("int4") for m in plan.models):
        change = {f"{role}_kv": "int4" for role in kinds}
        if "kv" in flags:
            tries.append((flags["kv"].format("int4"), change))
        elif all(f"{role}_kv" in flags for role in kinds):
            tries.append((" ".join(flags[f"{role}_kv"].format("int4") for role in kinds), change))
    for role in ("large", "small"):
        if role in kinds and f"{role}_quant" in flags and not _is_int4(kinds[role].quant):
            tries.append((flags[f"{role}_quant"].format("int4"), {f"{role}_quant": "int4"}))
    for name, now in (("ctx", plan.ctx), ("max_new_tokens", plan.max_new_tokens), ("batch", plan.batch)):
        if name not in flags or now is None or (name == "ctx" and plan.max_new_tokens is not None):
            continue
        n = now // 2
        while n >= (16 if name == "ctx" else 1):
            tries.append((flags[name].format(n), {name: n}))
            n //= 2
    if "tp" in flags:
        tp = request.get("tp", 1)
        for more in (2 * tp, 4 * tp, 8 * tp):  # more devices for the large model (a tp it cannot use is skipped)
            if max_devices is None or more + (request.get("small_devices") or 0) <= max_devices:
                tries.append((flags["tp"].format(more), {"tp": more}))
    fits, seen = [], set()
    for label, change in tries:
        setting = tuple(sorted(change))
        if setting in seen:
            continue
        try:
            alt = replan(**change)
        except ValueError:
            continue
        if alt.fits:
            fits.append(f"{label} ({alt.bytes_per_device:,} bytes{' per device' if alt.devices > 1 else ''})")
            seen.add(setting)
    hint = f"; would fit: {', '.join(fits)}" if fits else "; nothing smaller in one change fits"
    where = f" on the fullest of {plan.devices} devices" if plan.devices > 1 else ""
    return (f"the plan needs {need:,} bytes{where} for {plan.batch} sequence(s) of {plan.ctx} positions; the budget "
            f"is {plan.budget:,} bytes ({over:,} over){hint}")


def run_shape(tokenizer, context: int, prompts: list[str], max_new_tokens: int) -> dict:
    """What generating ``max_new_tokens`` after each of ``prompts`` allocates, as plan arguments:
    ``batch`` (the rows that can run: a prompt that encodes to nothing or does not fit the
    ``context`` is an error row, not run), ``prompt_tokens`` (the longest of their prompts) and
    ``max_new_tokens``; ``{}`` when no row can run."""
    from cascade.pair import row_problem

    lengths = []
    for p in prompts:
        ids = tokenizer.encode(p)
        if row_problem(p, ids, context, max_new_tokens) is None:
            lengths.append(len(ids))
    return dict(batch=len(lengths), prompt_tokens=max(lengths), max_new_tokens=max_new_tokens) if lengths else {}


def plan_for_prompts(small: str | None, large: str | None, prompts: list[str], *, max_new_tokens: int,
                     **request) -> tuple[MemoryPlan, dict]:
    """The plan of generating ``max_new_tokens`` after each of ``prompts`` (what ``cascade run``
    allocates): :func:`plan_from_configs` of :func:`run_shape`, the prompts counted with the pair's
    tokenizer read without the weights (:func:`cascade.pair.read_tokenizer`).  Without a tokenizer
    to read, or no prompt that can run, the plan is that of the whole context (an upper bound).
    Returns the plan and the :func:`plan_from_configs` arguments that made it (for
    :func:`over_budget_message`)."""
    from cascade.models.loaders import read_config
    from cascade.pair import read_tokenizer

    request = dict(small=small, large=large, **request)
    sources = [src for src in (large, small) if src is not None]
    tok = read_tokenizer(sources[0]) if sources else None
    if tok is not None:
        context = min(read_config(src).max_seq_len for src in sources)
        request.update(run_shape(tok, context, prompts, max_new_tokens))
    return plan_from_configs(**request), request


def plan_memory(pair, *, ctx: int | None = None, batch: int = 1, small_kv: str = "fp32", large_kv: str = "fp32",
                draft_len: int | str = 4, budget: int | str | None = None, tp: int = 1,
                small_devices: int | None = None, prompt_tokens: int | None = None,
                max_new_tokens: int | None = None) -> MemoryPlan:
    """The memory plan of a loaded :class:`cascade.pair.ModelPair` (either model may be absent);
    ``tp``/``small_devices``: the placement (module docs); ``prompt_tokens``/``max_new_tokens``: the
    plan of one run instead of ``ctx`` (:func:`plan_from_configs`)."""
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
        _shard(lambda cfg, tp, m=m: check_mesh(m.params, cfg, tp), m.config, splits[role], role, small_devices)
    models = [(role, m.source, m.quant, kv, m.config,
               (weight_bytes(m.params), planned_bytes_per_device(m.params, splits[role])), quantized(m.params))
              for role, m, kv in present]
    return _plan(models, ctx=ctx, batch=batch, draft_len=draft_len, budget=budget, splits=splits,
                 small_devices=small_devices, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens)


def _plan(models, *, ctx, batch, draft_len, budget, splits=None, small_devices=None, prompt_tokens=None,
          max_new_tokens=None) -> MemoryPlan:
    """``models``: (role, source, quant, kv, config, (weight bytes, per device), quantized weights?)
    per model; ``splits``: each role's tp (default 1).  ``prompt_tokens``/``max_new_tokens``: plan
    exactly the caches and prefill of one run (its longest prompt), instead of the worst split of ``ctx``."""
    from cascade.models.sharding import shard_config

    context = min(m[4].max_seq_len for m in models)
    run = prompt_tokens is not None or max_new_tokens is not None
    if run:
        if ctx is not None:
            raise ValueError("give ctx, or prompt_tokens and max_new_tokens (one run), not both")
        for name, n in (("prompt_tokens", prompt_tokens), ("max_new_tokens", max_new_tokens)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive integer, got {n!r}")
        if prompt_tokens + max_new_tokens > context:
            raise ValueError(f"prompt ({prompt_tokens} tokens) + max new tokens ({max_new_tokens}) exceeds the "
                             f"context of the pair ({context})")
        ctx = prompt_tokens + max_new_tokens
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1):
        raise ValueError(f"ctx must be a positive integer, got {ctx!r}")
    ctx = ctx or context
    if ctx > context:
        raise ValueError(f"ctx {ctx} exceeds the context of the pair ({context})")
    from cascade.speculative import draft_setting

    draft_len = draft_setting(draft_len)[0]  # "auto": its longest draft
    speculative = len(models) == 2
    rewind = draft_len + 1 if speculative else 0
    if run:  # the cache and prefill the runtime gives this run (cascade.speculative, cascade.models.generation)
        positions = (cache_room(prompt_tokens, max_new_tokens, draft_len, context) if speculative
                     else cache_length(models[0][4], ctx))
        longest_prompt = prompt_bucket(prompt_tokens)
    else:  # the runtime's cache length for sequences of at most ctx positions (any prompt/new split)
        positions = (max(cache_room(n, ctx - n, draft_len, context) for n in range(1, ctx + 1)) if speculative
                     else cache_length(models[0][4], ctx))
        longest_prompt = prompt_bucket(ctx - 1)  # the prefill of the longest prompt that leaves room for a token
    rows = []
    for role, source, quant, kv, cfg, (wbytes, wbytes_device), quantized in models:
        tp = (splits or {}).get(role, 1)
        shard = _shard(shard_config, cfg, tp, role, small_devices)
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
                      budget=None if budget is None else parse_bytes(budget),
                      prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens)


class PlacementError(ValueError):
    """A model that cannot be split over the devices asked for; ``param`` names the setting that
    asked (``"tp"``: the large model's, or a lone model's; ``"small_devices"``: the small model's own)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _placement_param(role: str, small_devices: int | None) -> str:
    return "small_devices" if role == "small" and small_devices is not None else "tp"


def _shard(fn, cfg, tp: int, role: str, small_devices: int | None):
    """``fn(cfg, tp)`` (a shard's config or bytes), its ValueError a :class:`PlacementError` naming
    the setting that split this model."""
    try:
        return fn(cfg, tp)
    except PlacementError:
        raise
    except ValueError as e:
        raise PlacementError(f"the {role} model over {tp} devices: {e}", _placement_param(role, small_devices)) from None


def _is_int4(quant) -> bool:
    """Whether precision rules text is already ``int4`` or ``int4-g128`` (any grid or range)."""
    from cascade.quant.rules import PrecisionRules
    from cascade.quant.spec import IntSpec

    try:
        rules = PrecisionRules.parse(str(quant))
    except ValueError:
        return False
    spec = rules.default
    return (not rules.rules and isinstance(spec, IntSpec) and spec.bits == 4 and spec.symmetric and spec.act is None
            and (spec.granularity == "channel" or spec.group_size == 128))
