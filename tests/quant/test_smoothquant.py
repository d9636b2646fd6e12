"""SmoothQuant's core: the scale formula on hand-computed cases, and the folds of a whole block
leaving the float model's logits unchanged."""

import numpy as np
import pytest

from cascade import quant
from cascade.quant.smoothquant import (ALPHA_GRID, max_to_kv, search_alphas, smooth_block, smoothing_scales,
                                       w8a8_error)
from tests.quant.test_awq import CFG, _logits, _random_params


def test_the_scales_follow_the_papers_formula():
    act = np.array([4.0, 1.0, 0.0, 9.0])
    w1 = np.array([[1.0, -0.5], [0.1, 4.0], [2.0, 0.0], [0.0, 0.0]])
    w2 = np.array([[0.2], [-3.0], [0.5], [1.0]])  # a second weight reading the same input: row maxima combine
    # rows' max|W|: [1, 4, 2, 1]; s = act^0.5 / w^0.5, a dead channel (act 0) keeps 1
    np.testing.assert_allclose(smoothing_scales(act, [w1, w2], 0.5), [2.0, 0.5, 1.0, 3.0])
    np.testing.assert_allclose(smoothing_scales(act, [w1, w2], 1.0), [4.0, 1.0, 1.0, 9.0])
    np.testing.assert_allclose(smoothing_scales(act, [w1, w2], 0.0), [1.0, 0.25, 1.0, 1.0])
    with pytest.raises(ValueError, match="alpha must be in"):
        smoothing_scales(act, [w1], 1.5)
    with pytest.raises(ValueError, match="does not read 4 input channels"):
        smoothing_scales(act, [w1[:3]], 0.5)
    with pytest.raises(ValueError, match="finite non-negative"):
        smoothing_scales(np.array([1.0, np.nan, 0.0, 1.0]), [w1], 0.5)


def test_o_statistics_are_reduced_by_max_over_the_query_heads_of_a_kv_head():
    stat = np.arange(4 * 2, dtype=np.float64)  # 4 query heads of head_dim 2, 2 kv heads
    np.testing.assert_array_equal(max_to_kv(stat, 4, 2, 2), [2, 3, 6, 7])


def test_smoothing_a_block_leaves_the_float_model_unchanged():
    params = _random_params()
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    rng = np.random.default_rng(5)
    act_max = {"attn": rng.uniform(0.1, 30, CFG.dim), "mlp": rng.uniform(0.1, 30, CFG.dim),
               "o": rng.uniform(0.1, 30, CFG.n_heads * CFG.head_dim), "down": rng.uniform(0.1, 30, CFG.hidden_dim)}
    block, scales = smooth_block(params["layers_0"], act_max, n_heads=CFG.n_heads, n_kv_heads=CFG.n_kv_heads,
                                 head_dim=CFG.head_dim, alpha=0.6)
    assert set(scales) == {"attn", "o", "mlp", "down"}
    assert all(np.ptp(s) > 0.5 for s in scales.values())  # the scales really move the weights
    smoothed = {**params, "layers_0": block}
    np.testing.assert_allclose(_logits(smoothed, tokens), _logits(params, tokens), rtol=2e-5, atol=2e-5)
    # the input to q/k/v is divided by s: attn_norm's scale is
    np.testing.assert_allclose(np.asarray(block["attn_norm"]["scale"]) * scales["attn"],
                               np.asarray(params["layers_0"]["attn_norm"]["scale"]), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown block input 'x'"):
        smooth_block(params["layers_0"], act_max, n_heads=4, n_kv_heads=2, head_dim=16, inputs=("x",))


def _w8a8_reference(x, w, static: bool, r=None) -> float:
    """Simulated W8A8 in float64 numpy: int8 per-output-channel weights (max|w| / 127), int8
    activations per row or with one scale for the whole tensor; the squared error to ``x @ w``.
    ``r``: both operands rotated first (``x r``, ``rᵀ w``; a ``-had`` spec)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    if r is not None:
        return _w8a8_reference(x @ r, r.T @ w, static)
    sw = np.abs(w).max(0) / 127
    wq = np.clip(np.round(w / sw), -127, 127) * sw
    sx = np.abs(x).max() / 127 if static else np.abs(x).max(1, keepdims=True) / 127
    xq = np.clip(np.round(x / sx), -127, 127) * sx
    return float(np.sum((xq @ wq - x @ w) ** 2))


@pytest.mark.parametrize("name, static", [("w8a8", False), ("w8a8-static", True)])
def test_the_w8a8_error_is_the_simulated_int8_matmuls(name, static):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 32)) * np.where(np.arange(32) == 3, 30.0, 1.0)  # one outlier channel
    ws = [rng.normal(size=(32, 16)), rng.normal(size=(32, 8))]
    spec = quant.parse_spec(name)
    got = w8a8_error(x, ws, [spec, spec], scale_dtype="float32")
    want = sum(_w8a8_reference(x, w, static) for w in ws)
    np.testing.assert_allclose(got, want, rtol=1e-3)
    with pytest.raises(ValueError, match="measures a W8A8 spec"):
        w8a8_error(x, ws[:1], [quant.parse_spec("int8")])


@pytest.mark.parametrize("name, static", [("w8a8-had", False), ("w8a8-static-had", True)])
def test_the_w8a8_error_of_a_rotated_spec_quantizes_the_rotated_operands(name, static):
    from tests.quant.test_hadamard import _matrix

    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 32)) * np.where(np.arange(32) == 3, 30.0, 1.0)
    ws = [rng.normal(size=(32, 16)), rng.normal(size=(32, 8))]
    spec = quant.parse_spec(name)
    got = w8a8_error(x, ws, [spec, spec], scale_dtype="float32")
    want = sum(_w8a8_reference(x, w, static, _matrix(32)) for w in ws)
    np.testing.assert_allclose(got, want, rtol=1e-3)
    plain = quant.parse_spec(name.removesuffix("-had"))
    assert got < 0.5 * w8a8_error(x, ws, [plain, plain], scale_dtype="float32")  # the outlier is spread


def test_the_alpha_search_takes_the_grids_argmin_of_the_smoothed_error():
    """Each input's error at each alpha is the error of the linears reading it after smoothing
    with the paper's scales at that alpha (recomputed here for q/k/v and gate/up from the
    formula); the chosen alpha is the smallest error, and outliers make the grid matter."""
    params = _random_params()
    block = params["layers_0"]
    rng = np.random.default_rng(3)
    boost = {"attn": np.where(np.arange(CFG.dim) % 17 == 0, 40.0, 1.0), "mlp": np.where(np.arange(CFG.dim) == 2, 60.0, 1.0),
             "o": np.ones(CFG.n_heads * CFG.head_dim), "down": np.ones(CFG.hidden_dim)}
    samples = {k: rng.normal(size=(64, b.size)) * b for k, b in boost.items()}
    act_max = {k: np.abs(v).max(0) for k, v in samples.items()}
    w8a8 = quant.parse_spec("w8a8")
    specs = {layer: w8a8 for layer in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
                                       "mlp/gate_proj", "mlp/up_proj")}  # down_proj: not W8A8 here
    heads = dict(n_heads=CFG.n_heads, n_kv_heads=CFG.n_kv_heads, head_dim=CFG.head_dim)
    best, errors = search_alphas(block, act_max, samples, specs, **heads, scale_dtype="float32")
    assert set(best) == {"attn", "o", "mlp"} and all(set(e) == set(ALPHA_GRID) for e in errors.values())
    for name, layers in (("attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
        module = name
        ws = [np.asarray(block[module][layer]["kernel"], np.float64) for layer in layers]
        for a in (ALPHA_GRID[0], 0.5, ALPHA_GRID[-1]):
            s = act_max[name] ** a / np.abs(np.concatenate(ws, 1)).max(1) ** (1 - a)
            want = sum(_w8a8_reference(samples[name] / s, w * s[:, None], False) for w in ws)
            np.testing.assert_allclose(errors[name][a], want, rtol=1e-2)
        assert best[name] == min(errors[name], key=errors[name].get)
        assert max(errors[name].values()) > 1.5 * min(errors[name].values())  # the grid matters with outliers
    smoothed, _ = smooth_block(block, act_max, **heads, alpha={**best, "down": 0.5})
    assert not np.allclose(np.asarray(smoothed["attn_norm"]["scale"]), np.asarray(block["attn_norm"]["scale"]))
    with pytest.raises(ValueError, match="alpha grid must be"):
        search_alphas(block, act_max, samples, specs, **heads, grid=(0.5, 1.5))
