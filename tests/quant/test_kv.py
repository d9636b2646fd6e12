"""KV-cache specs and their byte accounting (quant.kv)."""

import pytest

from cascade.quant.kv import (KVSpec, bytes_per_token_per_layer, fixed_bytes_per_layer, parse_kv_spec)


@pytest.mark.parametrize("text, fields", [
    ("fp32", dict(name="fp32")),
    ("BF16", dict(name="bf16")),
    ("int8", dict(name="int8")),
    ("int4-g16", dict(name="int4", group_size=16)),
    ("int4-kg64-r128-s4", dict(name="int4", key_group=64, residual=128, sinks=4)),
])
def test_parse_kv_spec(text, fields):
    spec = parse_kv_spec(text)
    assert spec == KVSpec(**fields)
    assert parse_kv_spec(str(spec)) == spec  # the printed form parses back


def test_defaults_are_canonical():
    """Spelling a default out gives the same spec (one static jit argument per meaning)."""
    assert parse_kv_spec("int4-kg32-r32") == parse_kv_spec("int4")
    assert str(parse_kv_spec("int4-kg32-r32")) == "int4"
    assert parse_kv_spec("int8").residual_positions == 32 and parse_kv_spec("int8").key_positions == 32
    assert parse_kv_spec(None) == KVSpec(name="fp32")


@pytest.mark.parametrize("bad, message", [
    ("int5", "unknown KV cache spec"),
    ("int4-asym", "unknown KV cache spec"),
    ("fp8", "unknown KV cache spec"),
    ("int4-g16-g32", "twice"),
    ("int4-r48", "multiple of the key group"),
    ("int4-kg15", "must be even"),
    ("int4-g0", "must be positive"),
])
def test_bad_specs_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_kv_spec(bad)


def test_float_caches_take_no_int_options():
    with pytest.raises(ValueError, match="int8/int4 only"):
        KVSpec(name="bf16", sinks=4)
    with pytest.raises(ValueError, match="a KV cache spec is a string"):
        parse_kv_spec(8)


def test_value_group_defaults_to_whole_heads():
    spec = parse_kv_spec("int4")
    assert spec.value_group(3, 64) == 64  # SmolLM2: one head
    assert spec.value_group(2, 24) == 48  # default-small: two heads of 24 reach 32 values
    assert spec.value_group(4, 8) == 32  # stories260K: four heads of 8
    assert spec.value_group(3, 8) == 24  # only whole heads that tile the vector: all three
    with pytest.raises(ValueError, match="does not divide"):
        parse_kv_spec("int4-g40").value_group(2, 24)


def test_bytes_per_token_hand_computed():
    # SmolLM2 layer: D = 3 * 64 = 192 values per token for keys and for values
    assert bytes_per_token_per_layer("fp16", 3, 64) == 2 * 192 * 2
    assert bytes_per_token_per_layer("fp32", 3, 64) == 2 * 192 * 4
    # int4: keys 96 B codes + 192 channels * (scale + zero) * 2 B / 32 positions = 24 B;
    # values 96 B codes + 3 groups * 2 B
    assert bytes_per_token_per_layer("int4", 3, 64) == 96 + 24 + 96 + 6
    assert bytes_per_token_per_layer("int8", 3, 64) == 192 + 24 + 192 + 6
    assert bytes_per_token_per_layer("int4", 3, 64) / bytes_per_token_per_layer("fp16", 3, 64) < 0.30
    # ring of R + rewind positions and S sinks, keys and values, float16
    assert fixed_bytes_per_layer("int4-s4", 3, 64, rewind=5) == 2 * (32 + 5 + 4) * 192 * 2
    assert fixed_bytes_per_layer("bf16", 3, 64, rewind=5) == 0


def test_key_groups_use_their_own_range():
    """Per-channel asymmetric keys against numpy: a channel far from 0 keeps every level for its
    spread (the weight quantizer would widen the range to 0 and use a fraction of them), a channel
    that barely moves and an all-zero channel stay finite and exact to float16 resolution."""
    import numpy as np

    from cascade import quant
    from cascade.quant.kv import quantize_key_groups
    from cascade.quant.spec import IntSpec

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    x[:, 1] += 6.0  # offset channel
    x[:, 2] = 9.0 + 1e-4 * x[:, 2]  # nearly constant, far from 0
    x[:, 3] = 0.0
    for bits in (8, 4):
        packed, scale, zero = quantize_key_groups(x, bits, 32)
        qt = quant.QuantizedTensor(packed, scale, zero, spec=IntSpec(bits=bits, granularity="group", group_size=32,
                                                                     symmetric=False), shape=x.shape, axis=0)
        got = np.asarray(quant.dequantize(qt), np.float64)
        assert np.isfinite(got).all()
        for g in range(2):
            block = x[32 * g: 32 * (g + 1)].astype(np.float64)
            step = (block.max(0) - block.min(0)) / (2**bits - 1)
            err = np.abs(got[32 * g: 32 * (g + 1)] - block).max(0)
            assert np.all(err <= step / 2 * 1.01 + np.abs(block).max(0) * 2.0**-10 + 1e-7)
        widened = quant.dequantize(quant.quantize(x, f"int{bits}-g32-asym", axis=0))
        err_widened = np.abs(np.asarray(widened, np.float64) - x)[:, 1].max()
        assert np.abs(got - x)[:, 1].max() < 0.8 * err_widened  # the offset channel: finer steps
