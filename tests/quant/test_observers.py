import jax.numpy as jnp
import numpy as np
import pytest

from cascade import quant
from cascade.quant import HistogramObserver, MinMaxObserver


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    # activations with a growing range across calibration batches (forces re-binning)
    return [(rng.standard_t(3, size=(64, 8)) * (1 + i) + 0.5).astype(np.float32) for i in range(6)]


def test_minmax_running_per_tensor_and_per_channel(batches):
    for axis in (None, -1):
        obs, state = MinMaxObserver(channel_axis=axis), None
        for b in batches:
            state = obs.update(state, jnp.asarray(b))
        allx = np.concatenate(batches)
        reduce_axes = None if axis is None else 0
        np.testing.assert_array_equal(np.asarray(state["min"]).ravel(), np.ravel(allx.min(axis=reduce_axes)))
        np.testing.assert_array_equal(np.asarray(state["max"]).ravel(), np.ravel(allx.max(axis=reduce_axes)))
        np.testing.assert_array_equal(np.asarray(obs.absmax(state)).ravel(), np.ravel(np.abs(allx).max(axis=reduce_axes)))
        lo, hi = obs.range(state, "int8")
        np.testing.assert_array_equal(np.asarray(-lo), np.asarray(hi))


@pytest.mark.parametrize("symmetric", [True, False])
def test_histogram_percentile_close_to_numpy(batches, symmetric):
    obs, state = HistogramObserver(channel_axis=-1, symmetric=symmetric, bins=2048), None
    for b in batches:
        state = obs.update(state, jnp.asarray(b))
    allx = np.concatenate(batches)
    data = np.abs(allx) if symmetric else allx
    width = (np.asarray(state["hi"]) - np.asarray(state["lo"])) / 2048
    # the histogram's extremes are exact; percentiles within a few bins (re-binning blurs by <= 1 bin each time)
    np.testing.assert_allclose(np.asarray(state["hi"]), data.max(axis=0), rtol=1e-6)
    estimate = np.asarray(obs.percentile(state, 99.0))
    # between the order statistics around rank 0.99 N, up to a few bins of re-binning blur
    ordered = np.sort(data, axis=0)
    rank = 0.99 * len(data)
    below, above = ordered[int(np.floor(rank)) - 1], ordered[int(np.ceil(rank))]
    assert np.all(estimate >= below - 4 * width) and np.all(estimate <= above + 4 * width)


@pytest.mark.parametrize("spec", ["int4-tensor-p99.9", "int8-tensor-mse", "int4-tensor-mse", "int4-tensor-asym-p99.9", "int3-tensor-asym-mse"])
def test_observer_clipping_beats_minmax_on_heavy_tails(spec):
    rng = np.random.default_rng(1)
    calib = [rng.standard_t(2, size=(256, 16)).astype(np.float32) for _ in range(4)]
    held_out = rng.standard_t(2, size=(1024, 16)).astype(np.float32)
    symmetric = "asym" not in spec
    hist, mm = HistogramObserver(symmetric=symmetric), MinMaxObserver()
    hs = ms = None
    for b in calib:
        hs, ms = hist.update(hs, jnp.asarray(b)), mm.update(ms, jnp.asarray(b))

    def mse(lo, hi):
        qt = quant.quantize_with_range(held_out, spec, float(lo[0]), float(hi[0]), scale_dtype="float32")
        return float(np.mean((np.asarray(quant.dequantize(qt), np.float64) - held_out) ** 2))

    minmax_spec = spec.rsplit("-", 1)[0]
    assert mse(*hist.range(hs, spec)) < mse(*mm.range(ms, minmax_spec))


def test_observer_bad_input():
    obs = MinMaxObserver(channel_axis=-1)
    with pytest.raises(ValueError, match="NaN"):
        obs.update(None, jnp.array([[1.0, jnp.nan]]))
    with pytest.raises(ValueError, match="empty"):
        obs.update(None, jnp.zeros((0, 3)))
    state = obs.update(None, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="channels"):
        obs.update(state, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="HistogramObserver"):
        obs.range(state, "int8-p99")
    with pytest.raises(ValueError, match="symmetric"):
        HistogramObserver().range(HistogramObserver().update(None, jnp.ones((4, 1))), "int8-asym")


def test_histogram_counts_past_float32_precision():
    obs, state = HistogramObserver(bins=16), None
    batch = jnp.ones(1 << 22, jnp.float32)
    for _ in range(5):  # 20,971,520 values in one bin: float32 counts would stall at 2**24
        state = obs.update(state, batch)
    assert int(state["counts"].sum()) == 5 << 22


def test_histogram_of_a_constant_channel():
    obs = HistogramObserver(symmetric=False)
    state = obs.update(None, jnp.full((100, 1), 1000.0))
    lo, hi = obs.range(state, "int8-asym-p99")
    assert float(lo[0]) == pytest.approx(1000.0, rel=1e-4) and float(hi[0]) == pytest.approx(1000.0, rel=1e-4)


def test_float_spec_range_is_a_value_error():
    obs = MinMaxObserver()
    with pytest.raises(ValueError, match="float spec"):
        obs.range(obs.update(None, jnp.ones(3)), "bf16")


@pytest.mark.parametrize("bins", [0, 1, -1, 2.5, True])
def test_histogram_bins_validated(bins):
    with pytest.raises(ValueError, match="bins"):
        HistogramObserver(bins=bins)
