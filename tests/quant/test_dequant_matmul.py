import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade import quant
from cascade.quant import dequant_matmul as mm
from tests.quant import reference

SPECS = ["int8", "int4-g128", "int4-g64-asym", "int4-g32", "int8-tensor", "int3-g32", "int2-g16-asym", "int8-asym"]


def _reference_matmul(x: np.ndarray, w: quant.QuantizedTensor) -> np.ndarray:
    """float64: x @ W_hat with W_hat read from the packed bytes by the reference dequantizer."""
    s = w.spec
    u = reference.unpack(np.asarray(w.packed), s.bits, w.shape[0], 0)
    zero = None if w.zero is None else np.asarray(w.zero, np.float64)
    w_hat = reference.dequantize(u, np.asarray(w.scale, np.float64), zero, s.bits, s.symmetric, s.granularity,
                                 s.group_size, 0)
    return x.astype(np.float64) @ w_hat


@pytest.mark.parametrize("backend", sorted(quant.backends()))
@pytest.mark.parametrize("spec", SPECS)
def test_every_backend_matches_reference_on_odd_shapes(backend, spec):
    rng = np.random.default_rng(0)
    w = quant.quantize(rng.standard_normal((172, 24)).astype(np.float32), spec)  # 172: short last group
    x = rng.standard_normal((3, 172)).astype(np.float32)
    if not quant.backends()[backend].supports(jnp.asarray(x), w):
        # a backend that does not run these operands refuses when forced, and auto-selection passes it over
        with pytest.raises(ValueError, match="does not support"):
            quant.matmul(jnp.asarray(x), w, backend=backend)
        assert mm.select_backend(jnp.asarray(x), w).name != backend
        return
    out = np.asarray(quant.matmul(jnp.asarray(x), w, backend=backend))
    np.testing.assert_allclose(out, _reference_matmul(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec", ["int8", "int4-g128", "int4-g64-asym", "int4-g32", "int8-tensor", "int8-asym"])
def test_the_native_kernel_runs_every_int8_int4_spec_of_this_table(spec):
    """The kernels' own suites (test_kernels_cpu.py, test_kernels_pallas.py) go deeper; here: the
    native CPU backend is one of the backends above for every int8/int4 spec (172: a short last group)."""
    w = quant.quantize(np.ones((172, 24), np.float32), spec)
    assert quant.backends()["cpu"].supports(jnp.ones((3, 172)), w)


@settings(max_examples=15, deadline=None)
@given(spec=st.sampled_from(SPECS), k=st.integers(1, 300), n=st.integers(1, 9), batch=st.sampled_from([(1,), (5,), (2, 3)]),
       seed=st.integers(0, 2**31 - 1))
def test_matmul_random_shapes(spec, k, n, batch, seed):
    rng = np.random.default_rng(seed)
    w = quant.quantize(rng.standard_normal((k, n)).astype(np.float32), spec)
    x = rng.standard_normal(batch + (k,)).astype(np.float32)
    out = np.asarray(jax.jit(quant.matmul)(jnp.asarray(x), w))
    assert out.shape == batch + (n,)
    np.testing.assert_allclose(out, _reference_matmul(x, w), rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_float_weight_passthrough_and_bf16_activations():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(quant.matmul(x, w)), x @ w, rtol=1e-5)
    qw = quant.quantize(w, "int8")
    out = quant.matmul(jnp.asarray(x, jnp.bfloat16), qw)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _reference_matmul(x, qw), rtol=0.05, atol=0.05)


def test_shape_errors():
    w = quant.quantize(np.ones((8, 4), np.float32), "int8")
    with pytest.raises(ValueError, match="8"):
        quant.matmul(jnp.ones((2, 7)), w)
    with pytest.raises(ValueError, match="2-D"):
        quant.matmul(jnp.ones((2, 8)), quant.quantize(np.ones((8, 4, 2), np.float32), "int8"))
    with pytest.raises(ValueError, match="axis 0"):
        quant.matmul(jnp.ones((2, 4)), quant.quantize(np.ones((8, 4), np.float32), "int8", axis=1))
    with pytest.raises(ValueError, match="floating"):
        quant.matmul(jnp.ones((2, 8), jnp.int32), w)


def test_backend_registry_selection(monkeypatch):
    calls = []

    def groupwise(x, w):
        calls.append(w.spec)
        return mm.xla_dequant_matmul(x, w)

    monkeypatch.setattr(mm, "_BACKENDS", dict(mm._BACKENDS))
    quant.register_backend("test-int8-only", groupwise, supports=lambda x, w: w.spec.bits == 8, priority=100)
    w8 = quant.quantize(np.ones((8, 4), np.float32), "int8")
    w4 = quant.quantize(np.ones((8, 4), np.float32), "int4")
    x = jnp.ones((1, 8))
    quant.matmul(x, w8)  # auto: the higher-priority backend that supports int8
    assert len(calls) == 1
    quant.matmul(x, w4)  # auto falls back to xla for int4
    assert len(calls) == 1
    with pytest.raises(ValueError, match="does not support"):
        quant.matmul(x, w4, backend="test-int8-only")
    with pytest.raises(ValueError, match="unknown matmul backend"):
        quant.matmul(x, w8, backend="nope")
    monkeypatch.setenv("CASCADE_MATMUL_BACKEND", "xla")
    quant.matmul(x, w8)
    assert len(calls) == 1
    monkeypatch.delenv("CASCADE_MATMUL_BACKEND")
    monkeypatch.setattr(mm, "_BACKENDS", {})
    with pytest.raises(ValueError, match="no registered matmul backend"):
        quant.matmul(x, w8)


def test_a_large_float_weight_of_another_dtype_is_multiplied_row_by_row(monkeypatch):
    """A bf16 weight under f32 activations: a few rows (a speculative verification) go row by row,
    each exactly as a single-row call computes it, and all within float tolerance of float64."""
    import cascade.quant.dequant_matmul as dm

    monkeypatch.setattr(dm, "ROWWISE_BYTES", 1024)  # a small weight takes the path in this test
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((48, 40)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((2, 3, 48)), jnp.float32)
    ref = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    for got, one in ((dm.matmul(x, w), lambda r: dm.matmul(r, w)), (dm.matmul_t(x, w.T), lambda r: dm.matmul_t(r, w.T))):
        assert got.shape == (2, 3, 40) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-4)
        rows = np.stack([np.asarray(one(x[b, t][None]))[0] for b in range(2) for t in range(3)]).reshape(2, 3, 40)
        np.testing.assert_array_equal(np.asarray(got), rows)
