"""Memory plans of a cascade: weights plus KV caches against a budget."""

import pytest

from cascade.memory import parse_bytes, plan_memory
from cascade.pair import load_pair
from models import weight_bytes
from models.llama import KVCache


@pytest.mark.parametrize("text, value", [("2GiB", 2 * 2**30), ("512 MB", 512 * 10**6), ("1.5k", 1500), ("1000", 1000),
                                         ("3mib", 3 * 2**20)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "2 GiBs", "-1MB", "0", "lots"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_plan_counts_the_weights_and_the_caches_the_runtime_allocates():
    pair = load_pair("default-small", "default-large", small_quant="int4", large_quant="int8")
    plan = plan_memory(pair, ctx=300, batch=2, small_kv="int4", large_kv="int8", draft_len=4)
    small, large = plan.models
    assert small.weight_bytes == weight_bytes(pair.small.params) and large.weight_bytes == weight_bytes(pair.large.params)
    assert small.kv_bytes == KVCache.create(pair.small.config, 2, 300, "int4", rewind=5).nbytes
    assert large.kv_bytes == KVCache.create(pair.large.config, 2, 300, "int8", rewind=5).nbytes
    assert plan.total == small.total + large.total and plan.fits is None
    assert plan_memory(pair, ctx=300, budget=plan.total * 10).fits
    tight = plan_memory(pair, ctx=300, batch=2, small_kv="int4", large_kv="int8", budget=plan.total - 1)
    assert tight.fits is False
    with pytest.raises(ValueError, match="exceeds the context"):
        plan_memory(pair, ctx=100_000)
