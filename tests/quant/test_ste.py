import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade import quant


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(0).standard_t(2, size=(96, 6)).astype(np.float32))


def test_forward_equals_quantize_dequantize(x):
    for spec in ["int4-g32-asym", "int8", "int3-g16-mse"]:
        expected = quant.dequantize(quant.quantize(x, spec, scale_dtype="float32"))
        np.testing.assert_allclose(np.asarray(quant.fake_quant(x, spec)), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_ste_gradient_is_identity_inside_clip_range_zero_outside(x):
    """d/dx sum(w * fq(x)) = w where |x| <= clip (99th percentile of |x| per channel), else 0."""
    w = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))
    grad = np.asarray(jax.grad(lambda v: jnp.sum(w * quant.fake_quant(v, "int4-p99")))(x))
    xs = np.asarray(x, np.float64)
    clip = np.percentile(np.abs(xs), 99, axis=0)  # numpy's linear interpolation, per output channel
    inside = np.abs(xs) <= clip
    assert 0 < (~inside).sum() < inside.sum()  # the test exercises both branches
    np.testing.assert_array_equal(grad, np.where(inside, np.asarray(w), 0.0))


def test_ste_gradient_asymmetric_groups_under_jit(x):
    grad = np.asarray(jax.jit(jax.grad(lambda v: jnp.sum(quant.fake_quant(v, "int4-g32-asym-p95"))))(x))
    xs = np.asarray(x, np.float64).reshape(3, 32, 6)
    lo = np.percentile(xs, 5, axis=1, keepdims=True)
    hi = np.percentile(xs, 95, axis=1, keepdims=True)
    # the clipping range is [min(lo, 0), max(hi, 0)]: asymmetric ranges always contain 0
    inside = ((xs >= np.minimum(lo, 0)) & (xs <= np.maximum(hi, 0))).reshape(96, 6)
    assert (~inside).any()
    np.testing.assert_array_equal(grad, inside.astype(np.float32))


def test_minmax_ste_is_identity(x):
    grad = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, "int8") * 3.0))(x)
    np.testing.assert_array_equal(np.asarray(grad), 3.0)


def test_bad_axis():
    with pytest.raises(ValueError, match="axis"):
        quant.fake_quant(jnp.ones((4, 4)), "int8", axis=3)
    with pytest.raises(ValueError, match="float spec"):
        quant.fake_quant(jnp.ones((4, 4)), "fp16")


def test_integer_input_rejected_and_second_order_grad(x):
    with pytest.raises(ValueError, match="floating"):
        quant.fake_quant(jnp.ones((4, 4), jnp.int32), "int8")
    # STE is piecewise identity: the second derivative of sum(fq(x)**2) is 2 inside the range
    hess_diag = jax.grad(lambda v: jnp.sum(jax.grad(lambda u: jnp.sum(quant.fake_quant(u, "int8") ** 2))(v)))(x)
    np.testing.assert_allclose(np.asarray(hess_diag), 2.0)


@pytest.mark.parametrize("bad,match", [(jnp.zeros((4, 0)), "empty"), (jnp.array([[1.0, jnp.inf]]), "NaN/Inf"),
                                       (3.0, "scalar")])
def test_bad_input_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        quant.fake_quant(bad, "int8")


def test_a_had_spec_fake_quantizes_the_rotated_tensor_and_passes_its_gradient_through(x):
    """Forward: the ``w8a8-had`` round trip (rotate, int8, rotate back); backward: min-max keeps
    every value inside its range and the rotation is linear, so the gradient is the identity."""
    expected = quant.dequantize(quant.quantize(x, "w8a8-had", scale_dtype="float32"))
    got = quant.fake_quant(x, "w8a8-had")
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(got), np.asarray(quant.fake_quant(x, "w8a8")))  # not the unrotated grid
    w = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape).astype(np.float32))
    grad = jax.grad(lambda v: jnp.sum(w * quant.fake_quant(v, "w8a8-had")))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(w), rtol=1e-5, atol=1e-5)
