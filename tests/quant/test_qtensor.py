import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade import quant
from cascade.quant.spec import parse_spec
from tests.quant import reference

INT_SPECS = ["int8", "int4-g128", "int4-g64-asym", "int8-tensor", "int3-g32", "int2-g16", "int4", "int8-asym",
             "int4-g32-asym", "int3-g8-asym", "int2-g16-asym", "int4-tensor-asym", "int3-g32-narrow", "int4-narrow",
             "int8-full", "int2-g16-narrow"]


def _reference_check(x: np.ndarray, qt: quant.QuantizedTensor, axis: int):
    """Error bound, stored-scale rounding and layout, all against the float64 reference."""
    spec = qt.spec
    u = reference.unpack(np.asarray(qt.packed), spec.bits, x.shape[axis], axis)
    zero = None if qt.zero is None else np.asarray(qt.zero, np.float64)
    x_hat_ref = reference.dequantize(u, np.asarray(qt.scale, np.float64), zero, spec.bits, spec.symmetric,
                                     spec.granularity, spec.group_size, axis)
    # our dequantize agrees with the reference dequantizer reading the documented bit layout
    np.testing.assert_allclose(np.asarray(quant.dequantize(qt), np.float64), x_hat_ref, rtol=1e-6, atol=1e-7)
    scale = np.asarray(qt.scale, np.float64)
    for idx in reference.groups(x.shape, spec.granularity, spec.group_size, axis):
        pidx = reference._param_index(idx, spec.granularity, spec.group_size, axis)
        s = scale[pidx]
        exact = reference.minmax_scale(x[idx].astype(np.float64), spec.bits, spec.symmetric, spec.full_range)
        # stored scale = the exact min-max scale rounded *up* by at most one float16 ulp
        assert exact * (1 - 1e-6) <= s <= exact * (1 + 2**-10) + 6e-8
        # min-max range: every value is inside, so the error is at most half a step
        err = np.abs(x[idx].astype(np.float64) - x_hat_ref[idx]).max()
        assert err <= s / 2 * (1 + 1e-5) + 1e-7, (idx, err, s)
        if zero is not None:
            z = zero[pidx]
            assert z == np.round(z) and 0 <= z <= spec.qmax


@pytest.mark.parametrize("spec", INT_SPECS)
def test_round_trip_error_bound_odd_shape(spec):
    # 172 rows: stories260K's MLP width, not divisible by 128, 64, 32 or 16 (short last group)
    x = np.random.default_rng(1).standard_normal((172, 12)).astype(np.float32) * np.linspace(0.01, 3, 12)
    qt = quant.quantize(x, spec)
    _reference_check(x, qt, axis=0)
    assert qt.shape == (172, 12) and qt.dtype == "float32"


@settings(max_examples=20, deadline=None)
@given(spec=st.sampled_from(INT_SPECS), k=st.integers(1, 70), n=st.integers(1, 3), axis=st.sampled_from([0, 1, -1]),
       seed=st.integers(0, 2**31 - 1), offset=st.sampled_from([0.0, 2.0]))
def test_round_trip_error_bound_property(spec, k, n, axis, seed, offset):
    shape = (k, n) if axis == 0 else (n, k)
    x = (np.random.default_rng(seed).standard_normal(shape) + offset).astype(np.float32)
    qt = quant.quantize(x, spec, axis=axis)
    _reference_check(x, qt, axis=axis % 2)


def test_nd_tensor_and_middle_axis():
    x = np.random.default_rng(2).standard_normal((3, 40, 5)).astype(np.float32)
    qt = quant.quantize(x, "int4-g16-asym", axis=1)
    assert qt.scale.shape == (3, 3, 5)
    _reference_check(x, qt, axis=1)


@pytest.mark.parametrize("spec", INT_SPECS + ["int4-g100", "int3-g5"])
@pytest.mark.parametrize("shape,axis", [((172, 12), 0), ((7, 33), 1), ((5,), 0)])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_nbytes_matches_documented_formula(spec, shape, axis, scale_dtype):
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    qt = quant.quantize(x, spec, axis=axis, scale_dtype=scale_dtype)
    s = parse_spec(spec)
    k = shape[axis]
    n_codes, n_bytes = reference.RUNS[s.bits]
    n_params = reference.n_groups(k, s.granularity, s.group_size) * (1 if s.granularity == "tensor" else x.size // k)
    expected = -(-k // n_codes) * n_bytes * (x.size // k) + n_params * np.dtype(scale_dtype).itemsize * (1 if s.symmetric else 2)
    assert qt.nbytes == expected == quant.storage_nbytes(shape, spec, axis, scale_dtype)
    # the arrays really are that big: nothing is stored unpacked
    assert sum(a.nbytes for a in jax.tree.leaves(qt)) == expected


def test_bits_per_value_of_documented_formats():
    x = jnp.ones((4096, 64), jnp.float32)
    assert quant.quantize(x, "int4-g128").bits_per_value == pytest.approx(4 + 16 / 128)
    assert quant.quantize(x, "int4-g64-asym").bits_per_value == pytest.approx(4 + 32 / 64)
    assert quant.quantize(x, "int3-g32").bits_per_value == pytest.approx(3 + 16 / 32)
    assert quant.quantize(x, "int2-g16").bits_per_value == pytest.approx(2 + 16 / 16)
    assert quant.quantize(x, "int8").bits_per_value == pytest.approx(8 + 16 / 4096)


def test_zero_tensor_and_constant_groups():
    x = np.zeros((64, 3), np.float32)
    x[:, 1] = 2.5
    for spec in ["int4-g32", "int4-g32-narrow", "int4-g32-asym", "int8-tensor"]:
        x_hat = np.asarray(quant.dequantize(quant.quantize(x, spec)))
        np.testing.assert_array_equal(x_hat[:, [0, 2]], 0.0)  # all-zero groups are exact
        # a constant group lands on the grid's end (the scale is rounded up by < 1 float16 ulp); on
        # the full grid (s = a / 7.5) the positive end is qmax = 7: half a step below a
        end = 2.5 * 7 / 7.5 if parse_spec(spec).full_range else 2.5
        np.testing.assert_allclose(x_hat[:, 1], end, rtol=2**-10)


def test_bfloat16_input_and_scales():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((64, 8)), jnp.bfloat16)
    qt = quant.quantize(x, "int8", scale_dtype="bfloat16")
    assert quant.dequantize(qt).dtype == jnp.bfloat16 and qt.scale.dtype == jnp.bfloat16
    err = jnp.abs(quant.dequantize(qt, jnp.float32) - x.astype(jnp.float32)).max()
    assert float(err) <= float(qt.scale.astype(jnp.float32).max()) / 2 * 1.01 + 0.02  # + bf16 output rounding


def test_quantize_with_range_clips_outside():
    x = jnp.linspace(-4.0, 4.0, 81)
    qt = quant.quantize_with_range(x, "int8-tensor", -1.0, 1.0)
    x_hat = np.asarray(quant.dequantize(qt))
    # clipped to the range (up to the float16 rounding-up of the scale)
    assert np.abs(x_hat).max() <= 1.0 * (1 + 2**-10)
    np.testing.assert_allclose(x_hat[np.asarray(x) >= 1.0], x_hat.max())
    inside = np.abs(np.asarray(x)) <= 1.0
    assert np.abs(x_hat[inside] - np.asarray(x)[inside]).max() <= float(qt.scale.max()) / 2 + 1e-7


# ---- pytree behaviour ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def qt_pair():
    rng = np.random.default_rng(5)
    a = quant.quantize(rng.standard_normal((40, 6)).astype(np.float32), "int4-g16-asym")
    b = quant.quantize(rng.standard_normal((40, 6)).astype(np.float32), "int4-g16-asym")
    return a, b


def test_jit_and_tree_map(qt_pair):
    a, _ = qt_pair
    np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize)(a)), np.asarray(quant.dequantize(a)))
    doubled = jax.tree.map(lambda l: l if l.dtype == jnp.uint8 else l * 2, a)  # scales and zeros doubled
    assert isinstance(doubled, quant.QuantizedTensor) and doubled.spec == a.spec
    u = np.asarray(quant.codes(a), np.float64)
    expected = (u - np.repeat(np.asarray(a.zero, np.float64) * 2, 16, 0)[:40]) * np.repeat(
        np.asarray(a.scale, np.float64) * 2, 16, 0)[:40]
    np.testing.assert_allclose(np.asarray(quant.dequantize(doubled)), expected, rtol=1e-6)


def test_vmap_over_stacked_tensors(qt_pair):
    a, b = qt_pair
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), a, b)
    out = jax.vmap(quant.dequantize)(stacked)
    np.testing.assert_array_equal(np.asarray(out), np.stack([quant.dequantize(a), quant.dequantize(b)]))


def test_orbax_save_restore(tmp_path, qt_pair):
    import orbax.checkpoint as ocp

    a, _ = qt_pair
    sym = quant.quantize(np.random.default_rng(6).standard_normal((33, 4)).astype(np.float32), "int3-g8")
    tree = {"w_asym": a, "w_sym": sym, "bias": jnp.arange(4.0)}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", tree)
        ckpt.wait_until_finished()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        restored = ckpt.restore(tmp_path / "ckpt", target)
    assert restored["w_sym"].spec == sym.spec and restored["w_sym"].zero is None
    for key in ("w_asym", "w_sym"):
        for leaf_r, leaf in zip(jax.tree.leaves(restored[key]), jax.tree.leaves(tree[key])):
            np.testing.assert_array_equal(np.asarray(leaf_r), np.asarray(leaf))
        np.testing.assert_array_equal(np.asarray(quant.dequantize(restored[key])), np.asarray(quant.dequantize(tree[key])))


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("x,match", [
    (np.array([1.0, np.nan], np.float32), "NaN/Inf"),
    (np.array([[1.0, np.inf]], np.float32), "NaN/Inf"),
    (np.zeros((0, 4), np.float32), "empty"),
    (np.float32(3.0), "scalar"),
    (np.arange(6).reshape(2, 3), "floating"),
])
def test_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        quant.quantize(x, "int8")


def test_bad_axis_spec_and_scale_dtype():
    x = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="axis"):
        quant.quantize(x, "int8", axis=2)
    with pytest.raises(ValueError, match="unknown precision spec"):
        quant.quantize(x, "int5")
    with pytest.raises(ValueError, match="float spec"):
        quant.quantize(x, "bf16")
    with pytest.raises(ValueError, match="scale_dtype"):
        quant.quantize(x, "int8", scale_dtype="int8")
    with pytest.raises(ValueError, match="group_size must be positive"):
        quant.quantize(x, quant.IntSpec(bits=4, granularity="group", group_size=0))


def test_scale_overflow_is_a_clear_error():
    x = np.array([[1e9], [1.0]], np.float32)
    with pytest.raises(ValueError, match="overflow.*float32"):
        quant.quantize(x, "int8")
    assert quant.quantize(x, "int8", scale_dtype="float32").scale.dtype == jnp.float32


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_values_near_float32_max_quantize_or_say_they_are_too_large(scale_dtype):
    """Issue 38: int8-asym on values near +-3e38 with float32 scales said "scales overflow float32 ...
    store scales in float32": the width hi - lo overflowed, not the scale.  Such ranges now quantize
    within half a step; only values whose grid would leave float32 are refused, and the message no
    longer blames (or suggests) the scale dtype."""
    x = np.array([[3e38], [-3e38], [1.0], [2.0]], np.float32)
    qt = quant.quantize(x, "int8-asym", scale_dtype=scale_dtype)
    step = float(np.asarray(qt.scale, np.float64).ravel()[0])
    assert 6e38 / 255 <= step <= 6e38 / 255 * (1 + 2**-7)  # the exact scale, rounded up to the scale dtype
    assert np.abs(np.asarray(quant.dequantize(qt, "float32"), np.float64) - x).max() <= step / 2 * (1 + 1e-6)
    for spec, top in [("int8-asym", [[3.4028235e38], [-3.4028235e38]]), ("int2-g2-asym", [[3e38], [-3e38]])]:
        with pytest.raises(ValueError, match="values too large to quantize") as e:
            quant.quantize(np.array(top, np.float32), spec, scale_dtype=scale_dtype)
        assert "store scales in float32" not in str(e.value)
    with pytest.raises(ValueError, match="scales overflow float16.*store scales in float32"):  # true for float16
        quant.quantize(x, "int8-asym", scale_dtype="float16")


@pytest.mark.parametrize("spec", ["int4-g32-mse", "int8-p99", "int4-asym-p99.9", "int3-g16-asym-mse", "int2-g16-p95"])
def test_clipped_specs_error_bound_inside_range(spec):
    """With clipping, values inside the grid's range [(qmin - z) s, (qmax - z) s] keep |err| <= s/2."""
    x = np.random.default_rng(7).standard_t(3, size=(96, 5)).astype(np.float64)
    qt = quant.quantize(x.astype(np.float32), spec)
    s_spec = qt.spec
    x_hat = np.asarray(quant.dequantize(qt), np.float64)
    scale = np.repeat(np.asarray(qt.scale, np.float64), -(-96 // qt.scale.shape[0]), axis=0)[:96]
    zero = 0.0 if qt.zero is None else np.repeat(np.asarray(qt.zero, np.float64), -(-96 // qt.zero.shape[0]), axis=0)[:96]
    lo, hi = (s_spec.qmin - zero) * scale, (s_spec.qmax - zero) * scale
    inside = (x >= lo) & (x <= hi)
    assert 0 < inside.mean() < 1  # clipping happened, and most values are inside
    assert np.all(np.abs(x - x_hat)[inside] <= scale[inside] / 2 * (1 + 1e-5) + 1e-6)
    # outside the range values saturate at the grid's ends
    np.testing.assert_allclose(x_hat[x > hi], np.broadcast_to(hi, x.shape)[x > hi], rtol=1e-6)


def test_negative_axis_and_oversized_group():
    assert quant.storage_nbytes((7, 33), "int4-g8", axis=-1) == quant.storage_nbytes((7, 33), "int4-g8", axis=1) == 7 * 17 + 7 * 5 * 2
    x = np.random.default_rng(8).standard_normal((4, 4)).astype(np.float32)
    huge, channel = quant.quantize(x, "int4-g1000000000"), quant.quantize(x, "int4")
    np.testing.assert_array_equal(np.asarray(huge.packed), np.asarray(channel.packed))
    np.testing.assert_array_equal(np.asarray(huge.scale), np.asarray(channel.scale))


def test_stacked_tensor_accounting_and_misuse(qt_pair):
    a, b = qt_pair
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), a, b)
    assert stacked.stack_shape == (2,) and stacked.nbytes == a.nbytes + b.nbytes
    assert stacked.bits_per_value == pytest.approx(a.bits_per_value)
    with pytest.raises(ValueError, match="stack"):
        quant.dequantize(stacked)
    with pytest.raises(ValueError, match="stack"):
        quant.matmul(jnp.ones((1, 40)), stacked)


def test_float16_subnormal_scales_warn():
    x = np.random.default_rng(9).standard_normal((64, 4)).astype(np.float32) * 1e-6
    with pytest.warns(UserWarning, match="float32"):
        quant.quantize(x, "int8")
    err16 = np.abs(np.asarray(quant.dequantize(quant.quantize(x, "int8", scale_dtype="float32"))) - x).max()
    assert err16 <= np.abs(x).max() / 127 / 2 * 1.001


@pytest.mark.parametrize("lo,hi,match", [(np.nan, 1.0, "NaN"), (1.0, -1.0, "lo > hi"), (np.zeros(3), 1.0, "broadcast")])
def test_quantize_with_range_rejects_bad_ranges(lo, hi, match):
    with pytest.raises(ValueError, match=match):
        quant.quantize_with_range(np.ones((8, 4), np.float32), "int8-asym", lo, hi)


@pytest.mark.parametrize("kwargs,match", [({"axis": 5}, "axis"), ({"shape": ()}, "shape"), ({"shape": (0, 4)}, "shape"),
                                          ({"scale_dtype": "int64"}, "scale_dtype")])
def test_storage_nbytes_validates(kwargs, match):
    args = {"shape": (4, 4), "spec": "int8", "axis": 0, "scale_dtype": "float16"} | kwargs
    with pytest.raises(ValueError, match=match):
        quant.storage_nbytes(**args)


def test_dtype_arguments_are_value_errors(qt_pair):
    with pytest.raises(ValueError, match="scale_dtype"):
        quant.quantize(np.ones((4, 4), np.float32), "int8", scale_dtype="bogus")
    with pytest.raises(ValueError, match="dtype"):
        quant.dequantize(qt_pair[0], "bogus")
    with pytest.raises(ValueError, match="floating"):
        quant.dequantize(qt_pair[0], "int32")
    with pytest.raises(ValueError, match="QuantizedTensor"):
        quant.codes(np.ones(3))


def test_full_grid_hand_computed_case():
    """int3 (full, the default) on one group [-3.5, -1, 0, 0.4, 3.5]: s = 3.5 / 3.5 = 1, q = clip(round(x), -4, 3)."""
    x = np.array([[-3.5], [-1.0], [0.0], [0.4], [3.5]], np.float32)
    for text in ("int3", "int3-full"):
        q = quant.quantize(x, text, scale_dtype="float32")
        np.testing.assert_array_equal(np.asarray(quant.codes(q))[:, 0], [-4, -1, 0, 0, 3])  # -3.5 rounds to even: -4
        np.testing.assert_array_equal(np.asarray(quant.dequantize(q))[:, 0], [-4.0, -1.0, 0.0, 0.0, 3.0])
    for text in ("int3-narrow", "int3-sym"):  # s = 3.5 / 3
        narrow = quant.quantize(x, text, scale_dtype="float32")
        np.testing.assert_array_equal(np.asarray(quant.codes(narrow))[:, 0], [-3, -1, 0, 0, 3])
    # on Gaussian weights the full grid's finer step wins on average
    w = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    err = {t: float(np.abs(np.asarray(quant.dequantize(quant.quantize(w, t))) - w).mean()) for t in ("int3-g32-narrow", "int3-g32")}
    assert err["int3-g32"] < 0.95 * err["int3-g32-narrow"]  # measured 0.92


def test_methods_that_choose_their_own_codes_refuse_a_rotated_spec():
    """GPTQ, HQQ, AutoRound and AWQ (its clip range) compute codes of the weight as given; a ``-had`` weight stores the
    codes of the rotated weight, so they refuse it by name rather than store wrong codes."""
    from cascade.quant.autoround import autoround_quantize
    from cascade.quant.awq import awq_quantize
    from cascade.quant.hqq import hqq_quantize
    from cascade.quant.qtensor import from_grouped_codes

    w = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    for name, call in (("GPTQ", lambda: quant.gptq_quantize(w, np.eye(32, dtype=np.float32), "w8a8-had")),
                       ("HQQ", lambda: hqq_quantize(w, "w8a8-had")),
                       ("AutoRound", lambda: autoround_quantize(w, w.T.copy(), "w8a8-had", iters=1)),
                       ("AWQ", lambda: awq_quantize(w, "w8a8-had", np.ones(32, np.float32)))):
        with pytest.raises(ValueError, match=f"{name} cannot produce w8a8-had weights"):
            call()
    with pytest.raises(ValueError, match="cannot produce w8a8-static-had weights"):
        from_grouped_codes(np.zeros((1, 32, 8)), np.ones((1, 8)), None, spec=parse_spec("w8a8-static-had"),
                           shape=(32, 8), axis=0)
