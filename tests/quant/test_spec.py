import dataclasses

import pytest

from cascade.quant.spec import FloatSpec, IntSpec, parse_spec

CANONICAL = ["int8", "int4-g128", "int4-g64-asym", "int8-tensor", "int3-g32", "int2-g16", "int4-g128-mse",
             "int8-p99.9", "int4-tensor-asym-p99", "bf16", "fp16", "fp32"]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_round_trip(text):
    assert str(parse_spec(text)) == text


def test_fields_of_examples():
    assert parse_spec("int8") == IntSpec(bits=8, granularity="channel", symmetric=True)
    assert parse_spec("int4-g64-asym") == IntSpec(bits=4, granularity="group", group_size=64, symmetric=False)
    assert parse_spec("int8-tensor").granularity == "tensor"
    assert parse_spec("INT4-G128 ") == parse_spec("int4-g128")
    assert parse_spec("bf16") == FloatSpec(name="bf16")
    # explicit defaults parse to the canonical form
    assert str(parse_spec("int8-channel-sym-minmax")) == "int8"


def test_integer_ranges():
    assert (parse_spec("int8").qmin, parse_spec("int8").qmax) == (-127, 127)
    assert (parse_spec("int4-asym").qmin, parse_spec("int4-asym").qmax) == (0, 15)
    # 2-4 bits: the full grid by default (all 2^b levels), the narrow one by name
    assert (parse_spec("int3-g32").qmin, parse_spec("int3-g32").qmax) == (-4, 3)
    assert (parse_spec("int2-g16").qmin, parse_spec("int2-g16").qmax) == (-2, 1)
    assert (parse_spec("int4").qmin, parse_spec("int4").qmax) == (-8, 7)
    assert (parse_spec("int3-g32-narrow").qmin, parse_spec("int3-g32-narrow").qmax) == (-3, 3)
    assert (parse_spec("int2-g16-narrow").qmin, parse_spec("int2-g16-narrow").qmax) == (-1, 1)


@pytest.mark.parametrize("bad", ["int5", "int4-g0", "int4-g-8", "int4-gx", "int8-foo", "float8", "", "int4-g32-tensor",
                                 "int4-asym-sym", "int8-p101", "int8-p10", "int8-mse-minmax", "fp64"])
def test_unknown_spec_raises_naming_allowed_forms(bad):
    with pytest.raises(ValueError, match="spec|percentile"):
        parse_spec(bad)


def test_error_lists_allowed_forms():
    with pytest.raises(ValueError, match=r"int4-g128.*bf16"):
        parse_spec("int7")


@pytest.mark.parametrize("kwargs", [dict(bits=4, granularity="group", group_size=0),
                                    dict(bits=4, granularity="group", group_size=-3),
                                    dict(bits=4, granularity="group"),
                                    dict(bits=4, granularity="channel", group_size=32),
                                    dict(bits=6), dict(bits=8, clip="p5")])
def test_constructor_validates(kwargs):
    with pytest.raises(ValueError):
        IntSpec(**kwargs)


def test_percentile_names_are_canonical():
    assert parse_spec("int8-p99.90") == parse_spec("int8-p099.9") == parse_spec("int8-p99.9")
    assert str(parse_spec("int8-p99.90")) == "int8-p99.9"
    assert str(parse_spec("int4-p100.0")) == "int4-p100"
    with pytest.raises(ValueError):
        parse_spec("int\u0668")  # a non-ASCII digit is not a bit width


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(bits=st.sampled_from([8, 4, 3, 2]),
       gran=st.one_of(st.just(""), st.just("-tensor"), st.just("-channel"), st.integers(1, 4096).map(lambda g: f"-g{g}")),
       sym=st.sampled_from(["", "-sym", "-asym"]),
       clip=st.one_of(st.sampled_from(["", "-minmax", "-mse"]), st.decimals("50.01", "100", places=2).map(lambda p: f"-p{p}")))
def test_any_valid_spec_round_trips(bits, gran, sym, clip):
    spec = parse_spec(f"int{bits}{gran}{sym}{clip}")
    assert parse_spec(str(spec)) == spec
    assert spec.bits == bits and spec.symmetric == (sym != "-asym")
    assert (spec.group_size is not None) == gran.startswith("-g")


@pytest.mark.parametrize("bad", ["int4-g0", "int4-g32-tensor"])
def test_structural_errors_also_list_allowed_forms(bad):
    with pytest.raises(ValueError, match="allowed: int"):
        parse_spec(bad)


def test_the_full_symmetric_grid_is_the_default_at_2_to_4_bits():
    s = parse_spec("int3-g32-full")
    assert (s.qmin, s.qmax, s.scale_divisor, s.full_range, s.symmetric) == (-4, 3, 3.5, True, True)
    assert str(s) == "int3-g32" and parse_spec(str(s)) == s == parse_spec("int3-g32") and s.grid == "full"
    n = parse_spec("int3-g32-narrow")
    assert (n.qmin, n.scale_divisor, n.grid, str(n)) == (-3, 3.0, "narrow", "int3-g32-narrow")
    assert parse_spec("int3-g32-sym") == n  # the old name of the narrow grid
    assert parse_spec("int8-full").qmin == -128 and parse_spec("int4-full").code_offset == 8  # codes 0..15
    assert parse_spec("int8").full_range is False and parse_spec("int8-narrow") == parse_spec("int8")
    assert IntSpec(bits=3).full_range is True and IntSpec(bits=8).full_range is False
    assert IntSpec(bits=4, symmetric=False).full_range is False
    with pytest.raises(ValueError, match="sets the symmetry twice"):
        parse_spec("int4-full-asym")
    with pytest.raises(ValueError, match="full_range applies only to symmetric"):
        IntSpec(bits=4, symmetric=False, full_range=True)


def test_w8a8_specs_are_int8_per_channel_weights_with_int8_activations():
    dyn, static = parse_spec("w8a8"), parse_spec("W8A8-static")
    assert (dyn.bits, dyn.granularity, dyn.symmetric, dyn.act) == (8, "channel", True, "dynamic")
    assert static.act == "static" and str(static) == "w8a8-static" and str(dyn) == "w8a8"
    assert parse_spec(str(dyn)) == dyn and parse_spec(str(static)) == static
    assert parse_spec("int8").act is None and dyn != parse_spec("int8")  # weight-only int8 is another spec
    with pytest.raises(ValueError, match="w8a8"):
        IntSpec(bits=4, act="dynamic")
    with pytest.raises(ValueError, match="act must be one of"):
        IntSpec(bits=8, act="token")
    with pytest.raises(ValueError, match="allowed:.*w8a8"):
        parse_spec("w8a4")


@pytest.mark.parametrize("text, act", [("w8a8-had", "dynamic"), ("w8a8-dynamic-had", "dynamic"),
                                       ("W8A8-static-had", "static")])
def test_had_specs_rotate_the_reduction_axis_of_a_w8a8_spec(text, act):
    spec = parse_spec(text)
    assert (spec.bits, spec.granularity, spec.act, spec.rotate) == (8, "channel", act, True)
    assert parse_spec(str(spec)) == spec and str(spec) == ("w8a8-had" if act == "dynamic" else "w8a8-static-had")
    assert spec != parse_spec("w8a8-static" if act == "static" else "w8a8")


def test_the_rotation_goes_with_w8a8_only():
    with pytest.raises(ValueError, match="goes with int8 activations"):
        IntSpec(bits=8, rotate=True)
    for text in ("int8-had", "w8a8-had-static", "w8a8-had-had"):
        with pytest.raises(ValueError, match="allowed:.*w8a8-had"):
            parse_spec(text)


@pytest.mark.parametrize("text, v1, v2", [
    ("int3-g32", "int3-g32-narrow", "int3-g32-full"), ("int4", "int4-narrow", "int4-full"),
    ("int2-g16-mse", "int2-g16-narrow-mse", "int2-g16-full-mse"), ("int3-g32-full", "int3-g32-full", "int3-g32-full"),
    ("int4-sym", "int4-narrow", "int4-narrow"), ("int8", "int8", "int8"), ("int8-full", "int8-full", "int8-full"),
    ("int4-g32-asym", "int4-g32-asym", "int4-g32-asym"), ("w8a8", "w8a8", "w8a8"), ("bf16", "bf16", "bf16")])
def test_grammar_version_1_reads_old_text_with_its_old_meaning(text, v1, v2):
    """Text saved before version 2 (a symmetric spec without a grid token was narrow at every
    width) parses with version=1 to what it meant then; ``explicit`` writes a text that means the
    same under both versions."""
    old, new = parse_spec(text, version=1), parse_spec(text)
    assert (old.explicit, new.explicit) == (v1, v2)
    for spec in (old, new):
        assert parse_spec(spec.explicit, version=1) == parse_spec(spec.explicit) == spec
    with pytest.raises(ValueError, match="grammar version"):
        parse_spec(text, version=3)


@pytest.mark.parametrize("text, weight", [("int4-g32-a8", "int4-g32"), ("int4-g32-asym-a8", "int4-g32-asym"),
                                          ("int8-a8", "int8"), ("int8-g32-a8", "int8-g32"), ("int4-a8", "int4"),
                                          ("int4-g64-narrow-mse-a8", "int4-g64-narrow-mse")])
def test_a8_specs_are_the_weight_spec_with_int8_activations(text, weight):
    s = parse_spec(text)
    assert s.a8 and s.act is None and str(s) == text
    assert dataclasses.replace(s, a8=False) == parse_spec(weight)  # the same weight format and grid
    assert parse_spec(s.explicit) == s and s.explicit.endswith("-a8")
    assert parse_spec(text.upper()) == s


@pytest.mark.parametrize("bad, match", [("int3-g32-a8", "int8 and int4"), ("int2-a8", "int8 and int4"),
                                        ("int4-a8-g32", "last token"), ("w8a8-a8", "unknown"),
                                        ("int4-g32-a8-a8", "last token")])
def test_a8_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(bad)
