"""AutoRound on one matrix (quant/autoround.py): the learned-rounding quantizer against a float64
numpy transcription of its formula, its straight-through gradient against the hand-derived one,
zero steps against RTN code for code, and training against RTN's output error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade.quant import autoround, dequantize, parse_spec, quantize
from cascade.quant.qtensor import codes

SPECS = ["int4-g32", "int3-g32", "int3-g32-full", "int2-g16-asym", "int4", "int4-g32-mse", "int3-g64-asym"]


def _correlated(k=80, n=24, t=1024, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, 8)) @ rng.standard_normal((8, k)) + 0.3 * rng.standard_normal((t, k)))
    x[:, :3] *= 6.0  # a few salient input channels, as in LLM activations
    w = rng.standard_t(5, (k, n)) * 0.05
    return x.astype(np.float32), w.astype(np.float32)


@pytest.mark.parametrize("spec", SPECS)
def test_zero_steps_is_rtn_code_for_code(spec):
    _, w = _correlated()  # K = 80: a short last group for g32 and g64
    x, _ = _correlated()
    got, want = autoround.autoround_quantize(w, x, spec, iters=0), quantize(w, spec)
    np.testing.assert_array_equal(np.asarray(got.packed), np.asarray(want.packed))
    np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))
    if want.zero is not None:
        np.testing.assert_array_equal(np.asarray(got.zero), np.asarray(want.zero))


def _reference(w, v, a, b, spec):
    """float64 numpy of the module's formula on a (K, N) kernel with groups of g along K."""
    k, n = w.shape
    g = spec.group_size or k
    out = np.empty_like(w, dtype=np.float64)
    for i in range(0, k, g):
        wg = w[i:i + g].astype(np.float64)
        lo, hi = wg.min(0) * a[i // g], wg.max(0) * b[i // g]
        if spec.symmetric:
            s = np.maximum(-lo, hi) / spec.scale_divisor
            z = 0.0
        else:
            lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
            s = (hi - lo) / (spec.qmax - spec.qmin)
            z = np.clip(np.round(-lo / s), spec.qmin, spec.qmax)
        q = np.clip(np.round(wg / s + v[i:i + g]) + z, spec.qmin, spec.qmax)
        out[i:i + g] = (q - z) * s
    return out


@pytest.mark.parametrize("spec", ["int4-g32", "int3-g16-full", "int2-g16-asym", "int4-channel"])
def test_the_quantizer_equals_a_float64_transcription(spec):
    spec = parse_spec(spec)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 12)).astype(np.float32)
    consts, params = autoround.init(w, spec)
    v = rng.uniform(-0.45, 0.45, params["v"].shape).astype(np.float32)
    a = rng.uniform(0.6, 1.0, params["a"].shape).astype(np.float32)
    b = rng.uniform(0.6, 1.0, params["b"].shape).astype(np.float32)
    p = {"v": jnp.asarray(v), "a": jnp.asarray(a), "b": jnp.asarray(b)}
    got = np.asarray(autoround.kernel(consts, p, spec, w.shape))
    r = v.shape[2]
    want = _reference(w, v.reshape(-1, r)[:64], a, b, spec)
    close = np.isclose(got, want, rtol=1e-5, atol=1e-6)
    assert close.mean() > 0.995, close.mean()  # the rest: float32 vs float64 on a rounding tie
    # the stored tensor decodes to the same values (float32 scales: nothing else rounds)
    stored = dequantize(autoround.finalize(consts, p, spec, w.shape, scale_dtype="float32"), "float32")
    assert np.isclose(np.asarray(stored), got, rtol=1e-6, atol=1e-7).mean() > 0.995


@pytest.mark.parametrize("text", ["int4-g16", "int4-g16-narrow"])
def test_the_rounding_offset_gets_the_straight_through_gradient(text):
    """d W_hat / d v = s wherever the code is not clipped: round() passes the gradient through."""
    spec = parse_spec(text)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 4)).astype(np.float32)
    consts, params = autoround.init(w, spec)
    grad = jax.grad(lambda p: autoround.kernel(consts, p, spec, w.shape).sum())(params)
    # RTN's symmetric scale per group: absmax / qmax (narrow), absmax / (qmax + 1/2) (full)
    s = np.abs(w.reshape(2, 16, 4)).max(1) / (spec.qmax + 0.5 if spec.full_range else spec.qmax)
    q = np.round(w.reshape(2, 16, 4) / s[:, None, :])
    inside = (q > spec.qmin) & (q < spec.qmax)
    np.testing.assert_allclose(np.asarray(grad["v"])[inside], np.broadcast_to(s[:, None, :], q.shape)[inside], rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad["a"]))) and np.any(np.asarray(grad["b"]) != 0)


@pytest.mark.parametrize("spec", ["int4-g32", "int3-g32", "int2-g16-asym"])
def test_training_lowers_the_output_error_below_rtn(spec):
    x, w = _correlated(k=128, n=32, t=2048)
    y = x @ w
    err = lambda qt: float(np.mean((x @ np.asarray(dequantize(qt, "float32")) - y) ** 2))  # noqa: E731
    rtn, trained = err(quantize(w, spec)), err(autoround.autoround_quantize(w, x, spec, iters=100, batch_rows=512))
    assert trained < 0.8 * rtn, (trained, rtn)


def test_the_steps_move_each_parameter_at_most_half_and_stay_in_bounds():
    iters = 50
    assert sum(autoround.learning_rate(i, iters) for i in range(iters)) == pytest.approx((iters + 1) / (2 * iters))
    x, w = _correlated(k=64, n=8, t=256)
    consts, params = autoround.init(w, parse_spec("int3-g32"))
    wj, xj = jnp.asarray(w), jnp.asarray(x)
    for i in range(iters):
        _, params = autoround._matrix_step(params, consts, wj, xj, np.float32(autoround.learning_rate(i, iters)),
                                           parse_spec("int3-g32"), w.shape, 0)
    v, a, b = (np.asarray(params[k]) for k in ("v", "a", "b"))
    assert np.abs(v).max() <= 0.5 + 1e-6 and np.abs(v).max() > 0.1
    assert a.min() >= 0.5 - 1e-6 and a.max() <= 1.0 and b.min() >= 0.5 - 1e-6 and b.max() <= 1.0


def test_minimize_keeps_the_parameters_with_the_lowest_loss():
    losses = [3.0, 1.0, 2.0, 4.0]
    step = lambda p, batch, lr: (losses[p], p + 1)  # noqa: E731
    best, seen = autoround.minimize(step, 0, lambda i: None, iters=4)
    assert best == 1 and seen == losses


def test_every_learned_code_stays_within_one_step_of_its_weight():
    """|V| <= 1/2: a code may round the other way, never further (on the trained grid, after clipping)."""
    x, w = _correlated(k=64, n=16, t=512)
    spec = parse_spec("int4-g32")
    trained = autoround.autoround_quantize(w, x, spec, iters=60)
    assert not np.array_equal(np.asarray(codes(trained)), np.asarray(codes(quantize(w, spec))))
    deq = np.asarray(dequantize(trained, "float32"))
    s = np.repeat(np.asarray(trained.scale, np.float32), 32, axis=0)
    clipped = np.clip(w, spec.qmin * s, spec.qmax * s)
    assert np.all(np.abs(deq - clipped) <= s * (1.0 + 1e-3))


@pytest.mark.parametrize("bad, match", [
    (dict(w=np.ones((4, 4, 4), np.float32)), "2-D kernel"),
    (dict(x=np.ones((8, 5), np.float32)), r"inputs must be \(T, 16\)"),
    (dict(iters=-1), "iters must be a non-negative int"),
    (dict(w=np.full((16, 4), np.nan, np.float32)), "NaN/Inf"),
])
def test_bad_input_is_a_clear_error(bad, match):
    kw = dict(w=np.ones((16, 4), np.float32), x=np.ones((8, 16), np.float32), iters=2)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        autoround.autoround_quantize(kw.pop("w"), kw.pop("x"), "int4", **kw)
