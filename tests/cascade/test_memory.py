"""Memory plans of a cascade: weights plus KV caches against a budget."""

import pytest

from cascade.memory import parse_bytes, plan_memory
from cascade.models import weight_bytes
from cascade.models.kv_cache import KVCache


@pytest.mark.parametrize("text, value", [("2GiB", 2 * 2**30), ("512 MB", 512 * 10**6), ("1.5k", 1500), ("1000", 1000),
                                         ("3mib", 3 * 2**20)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "2 GiBs", "-1MB", "0", "lots"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
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
    assert plan.total == small.total + large.total and plan.fits is None
    assert plan_memory(pair, ctx=300, budget=plan.total * 10).fits
    two = plan_memory(pair, ctx=512, batch=2, small_kv="int4", large_kv="int8")
    assert two.models[1].kv_bytes == 2 * large.kv_bytes
    assert plan_memory(pair, ctx=512, small_kv="int4", large_kv="int8", budget=plan.total - 1).fits is False
    with pytest.raises(ValueError, match="exceeds the context"):
        plan_memory(pair, ctx=100_000)
