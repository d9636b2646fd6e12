"""The Pallas dequant-matmul kernel against the float64 product of the documented dequantization.

On a machine without an accelerator the kernel runs in Pallas interpret mode (forced with
CASCADE_MATMUL_BACKEND=pallas): the same kernel body, the same blocks and loop, evaluated by XLA
on the CPU.  `bench/gpu.sh` runs this file on a GPU with CASCADE_PALLAS_INTERPRET unset, where
the kernel compiles through Triton.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade import quant
from cascade.quant import dequant_matmul
from cascade.quant.kernels import pallas
from tests.quant.test_kernels_cpu import _f64, _raw, _term_scale


@pytest.fixture(autouse=True)
def forced(monkeypatch):
    monkeypatch.setenv("CASCADE_MATMUL_BACKEND", "pallas")


def _check(x, w, rtol=2e-5):
    assert pallas.supports(x, w), (w, x.dtype, x.shape)
    assert dequant_matmul.select_backend(x, w).name == "pallas"
    got = np.asarray(pallas.matmul(x, w), np.float64)
    exact = _f64(x, w)
    scale = _term_scale(x, w) + 1e-30
    assert got.shape == exact.shape
    assert np.abs(got - exact).max() / scale < rtol, np.abs(got - exact).max() / scale


@pytest.mark.parametrize("spec", ["int8", "int8-g64", "int8-tensor", "int8-asym", "int4", "int4-g32", "int4-g32-asym",
                                  "int4-g64", "int4-g128-asym"])
def test_every_spec_against_the_reference(spec):
    rng = np.random.default_rng(0)
    w = quant.quantize(rng.standard_normal((256, 48)).astype(np.float32), spec)  # 48 columns: blocks of 16
    _check(jnp.asarray(rng.standard_normal((3, 256)), jnp.float32), w)


@pytest.mark.parametrize("rows", [1, 17, 64])
def test_batches_are_padded_to_blocks(rows):
    rng = np.random.default_rng(rows)
    w = quant.quantize(rng.standard_normal((128, 256)).astype(np.float32), "int4-g32-asym")  # two 128-column blocks
    _check(jnp.asarray(rng.standard_normal((rows, 128)), jnp.float32), w)


def test_leading_dims():
    rng = np.random.default_rng(3)
    w = quant.quantize(rng.standard_normal((64, 32)).astype(np.float32), "int8-g32")
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    got = pallas.matmul(x, w)
    assert got.shape == (2, 3, 32)
    np.testing.assert_allclose(np.asarray(got).reshape(6, 32), _f64(x.reshape(6, 64), w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_at_the_extremes_and_negative_scales(bits):
    k, n, g = 64, 32, 32
    top = (1 << bits) - 1
    codes = np.where(np.arange(k)[:, None] % 2 == 0, 0, top) * np.ones((1, n), int)
    scale = np.where(np.arange(n) % 3 == 0, -0.5, 0.25).astype(np.float16) * np.ones((k // g, 1), np.float16)
    for zero in (None, np.full((k // g, n), 3.25, np.float32)):
        w = _raw(codes, scale, zero, bits, g, k)
        _check(jnp.asarray(np.random.default_rng(1).standard_normal((2, k)), jnp.float32), w)


def test_bfloat16_activations():
    rng = np.random.default_rng(5)
    w = quant.quantize(rng.standard_normal((64, 16)).astype(np.float32), "int4-g32")
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    got = pallas.matmul(x, w)
    assert got.dtype == jnp.bfloat16
    exact = _f64(np.asarray(x, np.float32), w)
    assert np.abs(np.asarray(got, np.float64) - exact).max() <= 2**-7 * np.abs(exact).max() + 1e-3


def test_what_it_does_not_run_goes_elsewhere(monkeypatch):
    x = jnp.ones((1, 172), jnp.float32)
    short_last_group = quant.quantize(np.ones((172, 32), np.float32), "int4-g32")
    assert not pallas.supports(x, short_last_group)
    assert not pallas.supports(jnp.ones((1, 64)), quant.quantize(np.ones((64, 20), np.float32), "int8"))  # n % 16
    assert not pallas.supports(jnp.ones((1, 64)), quant.quantize(np.ones((64, 32), np.float32), "int3-g32"))
    assert not pallas.supports(jnp.ones((pallas.MAX_ROWS + 1, 64)), quant.quantize(np.ones((64, 32), np.float32), "int8"))
    monkeypatch.delenv("CASCADE_MATMUL_BACKEND")
    w = quant.quantize(np.ones((64, 32), np.float32), "int8")
    if jax.default_backend() == "cpu":  # auto-selection never picks interpret mode on a CPU
        assert not pallas.supports(jnp.ones((1, 64)), w)
        assert dequant_matmul.select_backend(jnp.ones((1, 64)), w).name != "pallas"
    else:  # on an accelerator it is the default for what it supports
        assert dequant_matmul.select_backend(jnp.ones((1, 64)), w).name == "pallas"
