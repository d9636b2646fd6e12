"""Memory plans of a cascade: weights plus KV caches against a budget."""

import pytest

from cascade.memory import parse_bytes, plan_memory
from cascade.models import weight_bytes
from cascade.models.kv_cache import KVCache


@pytest.mark.parametrize("text, value", [("2GiB", 2 * 2**30), ("512 MB", 512 * 10**6), ("1.5k", 1500), ("1000", 1000),
                                         ("3mib", 3 * 2**20), ("0.57k", 570), ("1.9", 1), (4096, 4096), (1e3, 1000)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad, why", [("", "cannot read"), ("2 GiBs", "cannot read"), ("lots", "cannot read"),
                                      ("-1MB", "must be positive"), ("0", "must be positive"), (-5, "must be positive"),
                                      (0, "must be positive"), ("0.5", "at least 1 byte"), (0.5, "at least 1 byte"),
                                      ("0.0001k", "at least 1 byte"), (float("nan"), "finite"), (True, "a size"),
                                      (None, "a size")])
def test_parse_bytes_rejects(bad, why):
    """Every budget goes through parse_bytes: anything that is not a size of at least one byte is a
    ValueError saying why (issue 38: "0.5" became a budget of 0 bytes, -5 a budget of -5 bytes)."""
    with pytest.raises(ValueError, match=why):
        parse_bytes(bad)


def test_plan_counts_the_weights_and_the_caches_the_runtime_allocates(monkeypatch, default_pair):
    """The plan's KV bytes are those of the caches a real run allocates (recorded by wrapping
    KVCache.create), for a short prompt and for one that fills the context."""
    import cascade.speculative as speculative

    pair = default_pair
    allocated = []
    create = KVCache.create

    class Allocated(Exception):
        """Both caches exist: what the run allocates is known, the generation itself is not needed."""

    def recording(*args, **kwargs):
        cache = create(*args, **kwargs)
        allocated.append(cache.nbytes)
        if len(allocated) == 2:
            raise Allocated
        return cache

    monkeypatch.setattr(speculative.KVCache, "create", staticmethod(recording))
    tok = pair.tokenizer
    for ctx, prompt_tokens in ((300, 5), (512, 400)):
        ids = (tok.encode("Once upon a time " * 200))[:prompt_tokens]
        allocated.clear()
        with pytest.raises(Allocated):
            speculative.speculative_generate(pair.small.params, pair.small.config, pair.large.params,
                                             pair.large.config, ids, max_new_tokens=ctx - len(ids), draft_len=4,
                                             draft_kv="int4", target_kv="int8")
        plan = plan_memory(pair, ctx=ctx, small_kv="int4", large_kv="int8", draft_len=4)
        small, large = plan.models
        assert allocated[0] <= small.kv_bytes and allocated[1] <= large.kv_bytes  # an upper bound for any prompt
        if ctx == 512:  # a prompt this long sets the bound
            assert allocated == [small.kv_bytes, large.kv_bytes]
    assert small.weight_bytes == weight_bytes(pair.small.params) and large.weight_bytes == weight_bytes(pair.large.params)
    assert plan.workspace == max(small.workspace_bytes, large.workspace_bytes) > 0  # one call at a time
    assert plan.total == small.total + large.total + plan.workspace and plan.fits is None
    assert plan_memory(pair, ctx=300, budget=plan.total * 10).fits
    two = plan_memory(pair, ctx=512, batch=2, small_kv="int4", large_kv="int8")
    assert two.models[1].kv_bytes == 2 * large.kv_bytes
    assert plan_memory(pair, ctx=512, small_kv="int4", large_kv="int8", budget=plan.total - 1).fits is False
    with pytest.raises(ValueError, match="exceeds the context"):
        plan_memory(pair, ctx=100_000)


@pytest.mark.parametrize("source, rules", [
    ("default-small", "int4"), ("default-large", "int8"),
    ("stories260K/stories260K.bin", "attn=int8,*=int4-g32-asym"),
    ("stories260K/stories260K.bin", "embed=int8,*=int3-g16"),
    ("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf", "int4-g128"),
])
def test_planned_weight_bytes_from_the_config_equal_the_quantized_model(source, rules):
    """Bytes from the config and rules alone (no weights read) equal the bytes of the model loaded
    and quantized under the same rules."""
    import os
    import warnings

    from cascade.memory import planned_weight_bytes
    from cascade.models import load_model, quantize_model
    from cascade.models.loaders import read_config
    from tests.shared_data import DATA

    path = source if source.startswith("default") else os.path.join(DATA, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-quantizing an imported GGUF warns
        quantized = quantize_model(load_model(path), rules, progress=False)[0]
    assert planned_weight_bytes(read_config(path), rules) == weight_bytes(quantized.params)


def test_plan_from_configs_equals_the_plan_of_the_loaded_pair(default_pair):
    from cascade.memory import plan_from_configs

    for kw in ({}, {"ctx": 200, "batch": 3, "small_kv": "int4", "large_kv": "int8-r32"}):
        loaded = plan_memory(default_pair, budget="64MB", **kw)
        planned = plan_from_configs("default-small", "default-large", small_quant="int4", large_quant="int8",
                                    budget="64MB", **kw)
        assert planned.total == loaded.total and planned.fits == loaded.fits
        assert [(m.role, m.weight_bytes, m.kv_positions, m.kv_bytes) for m in planned.models] == \
            [(m.role, m.weight_bytes, m.kv_positions, m.kv_bytes) for m in loaded.models]
    with pytest.raises(ValueError, match="keeps its stored weights"):
        plan_from_configs("default-small", "default-large", small_quant="none")


def test_a_budget_too_small_is_refused_before_loading(monkeypatch):
    """Over budget: one error with the excess and the single changes that would fit, each of which
    really fits; no model is loaded."""
    import cascade.router as router
    from cascade import Cascade
    from cascade.memory import plan_from_configs

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(router, "load_pair", no_loading)
    with pytest.raises(ValueError) as e:
        Cascade.load(budget="310MB", ctx=512, batch=8)
    msg = str(e.value)
    need = plan_from_configs("default-small", "default-large", ctx=512, batch=8).total
    assert f"needs {need:,} bytes" in msg and f"({need - 310_000_000:,} over)" in msg and "would fit: kv='int4'" in msg
    assert plan_from_configs("default-small", "default-large", ctx=512, batch=8, small_kv="int4",
                             large_kv="int4").total <= 310_000_000
    assert "batch=4" in msg and plan_from_configs("default-small", "default-large", batch=4).total <= 310_000_000
    assert "ctx=256" in msg and plan_from_configs("default-small", "default-large", ctx=256, batch=8).total <= 310_000_000


def test_live_buffers_after_loading_agree_with_the_plan():
    """The device buffers a loaded router holds are its planned weights (within 5%), and a cache
    the runtime allocates at the planned length holds the planned KV bytes."""
    import gc

    import jax

    from cascade import Cascade

    gc.collect()
    before = {id(a): a.nbytes for a in jax.live_arrays()}
    router = Cascade.load(budget="64MB")
    live = sum(a.nbytes for a in jax.live_arrays() if id(a) not in before)
    plan = router.plan(budget="64MB")
    weights = sum(m.weight_bytes for m in plan.models)
    assert abs(live - weights) <= 0.05 * weights, (live, weights)
    for m, model in zip(plan.models, (router.pair.small, router.pair.large)):
        cache = KVCache.create(model.config, plan.batch, m.kv_positions, m.kv, rewind=5)
        assert cache.nbytes == m.kv_bytes


def test_the_workspace_bounds_what_xla_assigns_for_the_runtimes_calls(default_pair):
    """The plan's workspace of each model is at least the scratch XLA's buffer assignment gives its
    largest calls (a full-context prefill, a batched prefill, a verification chunk), and not more
    than 2.5 times it for the prefill that sets the peak."""
    import jax
    import jax.numpy as jnp

    from cascade.memory import workspace_bytes
    from cascade.models import decoder

    def xla_scratch(model, kv, batch, tokens, positions, last_only):
        cache = KVCache.create(model.config, batch, positions, kv, rewind=5)
        call = jax.jit(lambda p, t, c: decoder.chunk(p, model.config, t, c, last_only=last_only), donate_argnums=2)
        return call.lower(model.params, jnp.ones((batch, tokens), jnp.int32), cache).compile().memory_analysis() \
            .temp_size_in_bytes

    plan = plan_memory(default_pair, ctx=512, small_kv="fp32", large_kv="int8", draft_len=4)
    for m, model, kv in zip(plan.models, (default_pair.small, default_pair.large), (None, "int8")):
        prefill = xla_scratch(model, kv, 1, 512, m.kv_positions, True)
        assert prefill <= m.workspace_bytes <= 2.5 * prefill, (m.role, prefill, m.workspace_bytes)
    large = default_pair.large
    for batch, tokens, positions, last_only in ((4, 512, 518, True), (16, 9, 256, False), (1, 5, 518, False)):
        estimate = workspace_bytes(large.config, batch=batch, positions=positions,
                                   prompt_tokens=tokens if last_only else 1, verify_tokens=1 if last_only else tokens,
                                   quantized_kv=True, quantized_weights=True)
        assert xla_scratch(large, "int8", batch, tokens, positions, last_only) <= estimate


def test_the_per_device_plan_counts_one_shard_of_each_model(default_pair):
    """tp=2: each device holds half of the large model's split tensors (exactly what the layout
    places, from the loaded params' shapes) and half its KV heads, plus the whole small model
    beside it; or, with small devices of its own, only the large shard.  The budget applies per
    device."""
    from cascade.cli import PLAN_FLAGS
    from cascade.memory import over_budget_message, plan_from_configs
    from cascade.models import kv_cache_memory
    from cascade.models.sharding import planned_bytes_per_device

    one = plan_from_configs("default-small", "default-large", ctx=256)
    two = plan_from_configs("default-small", "default-large", ctx=256, tp=2)
    own = plan_from_configs("default-small", "default-large", ctx=256, tp=2, small_devices=1)
    small, large = two.models
    assert large.weight_bytes_per_device == planned_bytes_per_device(default_pair.large.params, 2)
    assert small.weight_bytes_per_device == small.weight_bytes == planned_bytes_per_device(default_pair.small.params, 1)
    whole = kv_cache_memory(default_pair.large.config, "fp32", large.kv_positions, rewind=5)["bytes"]
    assert large.kv_bytes == whole and large.kv_bytes_per_device == whole // 2  # fp32: the KV heads halve it exactly
    assert two.total == one.total  # the same bytes in all, spread differently
    assert two.bytes_per_device == (small.total + large.weight_bytes_per_device + large.kv_bytes_per_device
                                    + max(small.workspace_bytes, large.workspace_bytes_per_device))
    assert own.device_groups["small"] == {"devices": 1, "bytes": small.total + small.workspace_bytes}
    assert own.device_groups["large"]["bytes"] == (large.weight_bytes_per_device + large.kv_bytes_per_device
                                                   + large.workspace_bytes_per_device)
    assert own.devices == 3 and own.bytes_per_device < two.bytes_per_device < one.bytes_per_device
    # a budget between one device's share and the whole: fits split, not on one device, and says so
    budget = (two.bytes_per_device + one.bytes_per_device) // 2
    request = dict(small="default-small", large="default-large", ctx=256, budget=budget)
    assert plan_from_configs(**request, tp=2).fits is True
    refused = plan_from_configs(**request)
    assert refused.fits is False and "--mesh tp=2" in over_budget_message(refused, flags=PLAN_FLAGS, **request)
    assert "tp=" not in over_budget_message(refused, **request)  # Cascade.load has no tp keyword: not suggested
    with pytest.raises(ValueError, match="tp=4 does not divide n_kv_heads=2"):
        plan_from_configs("default-small", "default-large", tp=4)
    with pytest.raises(ValueError, match="small_devices needs a small model"):
        plan_from_configs(None, "default-large", small_devices=1)


@pytest.mark.parametrize("mode, prompt_tokens, new", [("speculative", 5, 6), ("speculative", 40, 200), ("large", 5, 6),
                                                      ("large", 100, 300)])
def test_the_plan_of_one_run_is_what_that_run_allocates(monkeypatch, default_pair, mode, prompt_tokens, new):
    """A plan for one run (its longest prompt and max_new_tokens) counts exactly the KV caches the
    runtime allocates for it (recorded by wrapping KVCache.create), not the whole context (issue 38:
    `run --max-tokens 6` was planned for 512 positions)."""
    import cascade.models.generation as generation
    import cascade.speculative as speculative
    from cascade.memory import plan_from_configs

    pair = default_pair
    allocated = []
    create = KVCache.create

    class Allocated(Exception):
        pass

    want = 2 if mode == "speculative" else 1

    def recording(*args, **kwargs):
        cache = create(*args, **kwargs)
        allocated.append((cache.max_len, cache.nbytes))
        if len(allocated) == want:
            raise Allocated
        return cache

    monkeypatch.setattr(KVCache, "create", staticmethod(recording))
    ids = pair.tokenizer.encode("Once upon a time " * 100)[:prompt_tokens]
    with pytest.raises(Allocated):
        if mode == "speculative":
            speculative.speculative_generate(pair.small.params, pair.small.config, pair.large.params, pair.large.config,
                                             ids, max_new_tokens=new, draft_len=4, draft_kv="int4", target_kv="int8")
        else:
            generation.generate(pair.large.params, pair.large.config, [ids], max_new_tokens=new, kv="int8")
    small, large = ("default-small", "default-large") if mode == "speculative" else (None, "default-large")
    plan = plan_from_configs(small, large, small_kv="int4", large_kv="int8", draft_len=4, prompt_tokens=prompt_tokens,
                             max_new_tokens=new)
    assert [(m.kv_positions, m.kv_bytes) for m in plan.models] == allocated
    assert plan.ctx == prompt_tokens + new and plan.to_json()["max_new_tokens"] == new
    assert plan.total <= plan_from_configs(small, large, small_kv="int4", large_kv="int8", draft_len=4).total
    with pytest.raises(ValueError, match="not both"):
        plan_from_configs(small, large, ctx=64, prompt_tokens=prompt_tokens, max_new_tokens=new)
    with pytest.raises(ValueError, match="exceeds the context"):
        plan_from_configs(small, large, prompt_tokens=prompt_tokens, max_new_tokens=600)


def test_a_split_that_cannot_be_made_names_the_setting_that_asked():
    """tp=3 of the large model blames ``tp``; 3 devices of the small model's own blame ``small_devices``
    (issue 38: `plan --mesh tp=2 --small-devices 3` blamed --mesh)."""
    from cascade.memory import PlacementError, plan_from_configs

    with pytest.raises(PlacementError, match="the small model over 3 devices: tp=3 does not divide") as e:
        plan_from_configs("default-small", "default-large", tp=2, small_devices=3)
    assert e.value.param == "small_devices"
    with pytest.raises(PlacementError, match="the large model over 3 devices") as e:
        plan_from_configs("default-small", "default-large", tp=3)
    assert e.value.param == "tp"
    with pytest.raises(PlacementError) as e:
        plan_from_configs(None, "default-large", tp=3)
    assert e.value.param == "tp"


@pytest.mark.parametrize("source", ["default-large", "stories260K/stories260K.bin",
                                    "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"])
def test_prompts_are_counted_with_the_tokenizer_read_without_weights(source):
    """`run --budget` counts prompt tokens before loading: the tokenizer read alone encodes as the
    loaded model's does; whether the model stores quantized weights is read from its header."""
    import os
    import warnings

    from cascade.models import load_model
    from cascade.pair import _has_quantized, holds_quantized_weights, read_tokenizer
    from tests.shared_data import DATA

    path = source if source.startswith("default") else os.path.join(DATA, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(path)
    text = "Once upon a time, Lily said: \"héllo 1234!\"\n  the end."
    assert read_tokenizer(path).encode(text) == model.tokenizer.encode(text)
    assert holds_quantized_weights(path) == _has_quantized(model.params) == source.endswith(".gguf")
