"""The randomized Hadamard rotation against a dense float64 matrix built in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade.quant import hadamard


def _sylvester(b: int) -> np.ndarray:
    """``H_b / sqrt(b)`` by Sylvester's recursion ``H_2n = [[H, H], [H, -H]]``."""
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(b)


def _matrix(k: int) -> np.ndarray:
    """``R = D H`` (k, k): the documented signs, then block-diagonal Sylvester blocks of the largest
    power of two dividing ``k``."""
    b = next(2**e for e in range(k.bit_length(), -1, -1) if k % 2**e == 0)
    return np.diag(hadamard.signs(k).astype(np.float64)) @ np.kron(np.eye(k // b), _sylvester(b))


@pytest.mark.parametrize("k", [1, 6, 8, 12, 96, 172, 1536])
def test_rotate_is_x_times_the_dense_matrix_and_unrotate_its_inverse(k):
    x = np.random.default_rng(k).standard_normal((3, 5, k))
    r = _matrix(k)
    np.testing.assert_allclose(r @ r.T, np.eye(k), atol=1e-12)  # orthogonal
    got = np.asarray(hadamard.rotate(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, x @ r, rtol=1e-5, atol=1e-5)
    back = np.asarray(hadamard.unrotate(jnp.asarray(x @ r, jnp.float32)), np.float64)
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


def test_a_weight_rotated_along_its_reduction_axis_keeps_the_product():
    """``(x R)(Rᵀ W) = x W``: rotating W along axis 0 is ``Rᵀ W`` (the same function, since H is symmetric)."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 48)), rng.standard_normal((48, 10))
    r = _matrix(48)
    w_rot = np.asarray(hadamard.rotate(jnp.asarray(w, jnp.float32), axis=0), np.float64)
    np.testing.assert_allclose(w_rot, r.T @ w, rtol=1e-5, atol=1e-5)
    x_rot = np.asarray(hadamard.rotate(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(x_rot @ w_rot, x @ w, rtol=1e-4, atol=1e-4)


def test_an_outlier_channel_is_spread_over_its_block():
    x = np.zeros((1, 1536), np.float32)
    x[0, 700] = 100.0
    y = np.asarray(hadamard.rotate(x))
    block = slice(512, 1024)  # channel 700 lies in the second block of 512
    np.testing.assert_allclose(np.abs(y[0, block]), 100.0 / np.sqrt(512), rtol=1e-6)
    assert np.all(y[0, :512] == 0) and np.all(y[0, 1024:] == 0)


def test_the_signs_are_the_documented_generator_and_fixed_per_length():
    """A saved ``-had`` checkpoint means the same thing in any release: the signs are the C
    standard's example ``rand()`` LCG from seed 0x5EED, bit 16 of each state."""
    state, want = 0x5EED, []
    for _ in range(64):
        state = (1103515245 * state + 12345) % 2**31
        want.append(1.0 if state >> 16 & 1 else -1.0)
    np.testing.assert_array_equal(hadamard.signs(64), want)
    np.testing.assert_array_equal(hadamard.signs(100)[:64], want)  # a prefix of the same stream
    assert 20 < (hadamard.signs(64) > 0).sum() < 44


def test_rotate_runs_under_jit_and_along_any_axis():
    x = np.random.default_rng(1).standard_normal((24, 3)).astype(np.float32)
    got = np.asarray(jax.jit(lambda v: hadamard.rotate(v, axis=0))(x))
    np.testing.assert_allclose(got, (x.T @ _matrix(24)).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [0, -4])
def test_a_non_positive_length_is_an_error(k):
    with pytest.raises(ValueError, match="positive length"):
        hadamard.block_size(k)
