"""The W8A8 matmul against a numpy reference written from the formula (float64 scales, int64 dot)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade import quant
from cascade.quant.activations import int8_dot, w8a8_matmul
from cascade.quant.qtensor import with_act_scale


def _reference(x, qt, act_scale=None):
    """x (m, k) @ W (k, n) for the stored int8 weight ``qt`` (its codes and per-output-channel scales,
    whose quantization :mod:`tests.quant.test_qtensor` checks) with x int8 per row (or at
    ``act_scale``), in numpy: the quotients in float32 as the spec says, the codes multiplied in int64."""
    x = np.asarray(x, np.float32)
    transposed = qt.axis == 1
    wq = np.asarray(quant.codes(qt), np.int64)
    sw = np.asarray(qt.scale, np.float32).reshape(-1)
    if transposed:
        wq = wq.T
    if act_scale is None:
        sx = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
        sx = np.where(sx > 0, sx, np.float32(1.0))
    else:
        sx = np.float32(act_scale)
    xq = np.clip(np.round(x / sx), -127, 127).astype(np.int64)
    return (xq @ wq) * np.float64(1) * sx * sw


def _operands(seed=0, m=5, k=96, n=40):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, 3] *= 40.0  # an outlier channel, as real activations have
    x[2] = 0.0  # a row of zeros gets scale 1 and zero codes
    return x, rng.standard_normal((k, n)).astype(np.float32)


def test_w8a8_matmul_per_token_equals_the_numpy_reference():
    x, w = _operands()
    qt = quant.quantize(w, "w8a8")
    got = np.asarray(quant.matmul(jnp.asarray(x), qt))
    np.testing.assert_allclose(got, _reference(x, qt), rtol=2e-6, atol=1e-5)
    assert not np.allclose(got, x @ w, rtol=1e-3)  # activations really are quantized
    assert np.all(got[2] == 0)


def test_w8a8_static_uses_the_stored_scale_and_clips_beyond_it():
    x, w = _operands(1)
    qt = with_act_scale(quant.quantize(w, "w8a8-static"), 0.05)  # 0.05 * 127 = 6.35 < the outlier: it clips
    got = np.asarray(quant.matmul(jnp.asarray(x), qt))
    np.testing.assert_allclose(got, _reference(x, qt, 0.05), rtol=2e-6, atol=1e-5)
    assert qt.nbytes == quant.storage_nbytes(w.shape, "w8a8-static")


def test_a_tied_head_runs_w8a8_through_matmul_t():
    x, w = _operands(2, k=64, n=48)
    table = quant.quantize(w.T.copy(), "w8a8", axis=1)  # (vocab, dim) quantized along the model dim
    got = np.asarray(quant.matmul_t(jnp.asarray(x), table))
    np.testing.assert_allclose(got, _reference(x, table), rtol=2e-6, atol=1e-5)


def test_int8_dot_is_the_exact_integer_product():
    rng = np.random.default_rng(3)
    a = rng.integers(-127, 128, (3, 4096)).astype(np.int8)
    b = rng.integers(-127, 128, (4096, 7)).astype(np.int8)
    a[0], b[:, 0] = 127, 127  # 4096 * 127^2 = 66M: past float32's exact integers
    got = np.asarray(int8_dot(jnp.asarray(a), jnp.asarray(b)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


def test_a_row_does_not_depend_on_the_rows_batched_with_it():
    x, w = _operands(4)
    qt = quant.quantize(w, "w8a8")
    together = np.asarray(jax.jit(quant.matmul)(jnp.asarray(x), qt))
    alone = np.asarray(jax.jit(quant.matmul)(jnp.asarray(x[1:2]), qt))
    np.testing.assert_array_equal(together[1:2], alone)


def test_a_static_weight_without_its_scale_is_a_clear_error():
    qt = quant.quantize(np.ones((8, 4), np.float32), "w8a8-static")
    with pytest.raises(ValueError, match="no activation scale: quantize the model with calibration data"):
        quant.matmul(jnp.ones((2, 8)), qt)
    with pytest.raises(ValueError, match="finite positive scalar"):
        with_act_scale(qt, 0.0)
    with pytest.raises(ValueError, match="belongs to a w8a8-static"):
        with_act_scale(quant.quantize(np.ones((8, 4), np.float32), "w8a8"), 0.1)
    with pytest.raises(ValueError, match="w8a8_matmul takes a w8a8 weight"):
        w8a8_matmul(jnp.ones((2, 8)), quant.quantize(np.ones((8, 4), np.float32), "int8"))


# -- -had specs: the reduction axis rotated (cascade.quant.hadamard) --------------------------------

def _rotated_reference(x, qt, act_scale=None):
    """The W8A8 product of a ``-had`` weight: ``x`` rotated by the dense numpy ``R`` (float64), then
    the reference above on the stored codes, which must be those of ``Rᵀ W``."""
    from tests.quant.test_hadamard import _matrix

    x_rot = np.asarray(x, np.float64) @ _matrix(qt.shape[qt.axis])  # the reduction axis's length
    return _reference(x_rot.astype(np.float32), qt, act_scale)


@pytest.mark.parametrize("spec", ["w8a8-had", "w8a8-static-had"])
def test_a_had_weight_stores_the_rotated_codes_and_rotates_its_input(spec):
    from tests.quant.test_hadamard import _matrix

    x, w = _operands(5)
    qt = quant.quantize(w, spec)
    if spec.startswith("w8a8-static"):
        qt = with_act_scale(qt, float(np.abs(x @ _matrix(96)).max() / 127))
    # the codes are int8 per-channel codes of R^T W
    w_rot = _matrix(96).T @ w.astype(np.float64)
    sw = np.asarray(qt.scale, np.float32).reshape(-1)
    np.testing.assert_array_equal(np.asarray(quant.codes(qt)), np.clip(np.round(w_rot / sw), -127, 127))
    got = np.asarray(quant.matmul(jnp.asarray(x), qt))
    np.testing.assert_allclose(got, _rotated_reference(x, qt, None if qt.act_scale is None else float(qt.act_scale)),
                               rtol=1e-4, atol=1e-3)
    # dequantize gives back the weight it stands for, and the same bytes as w8a8
    np.testing.assert_allclose(np.asarray(quant.dequantize(qt)), w, atol=float(sw.max()))
    assert qt.nbytes == quant.storage_nbytes(w.shape, spec.replace("-had", ""))
    # the outlier channel (40x) is spread: the error is several times smaller than plain W8A8's
    plain = quant.quantize(w, spec.replace("-had", ""))
    if plain.spec.act == "static":
        plain = with_act_scale(plain, float(np.abs(x).max() / 127))
    err = lambda y: np.linalg.norm(y - x @ w)  # noqa: E731
    assert err(got) < 0.5 * err(np.asarray(quant.matmul(jnp.asarray(x), plain)))


def test_a_tied_had_head_rotates_along_the_model_dim():
    x, w = _operands(6, k=64, n=48)
    table = quant.quantize(w.T.copy(), "w8a8-had", axis=1)
    got = np.asarray(quant.matmul_t(jnp.asarray(x), table))
    np.testing.assert_allclose(got, _rotated_reference(x, table), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(quant.dequantize(table)), w.T, atol=float(np.asarray(table.scale).max()))
