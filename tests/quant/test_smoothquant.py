"""SmoothQuant's core: the scale formula on hand-computed cases, and the folds of a whole block
leaving the float model's logits unchanged."""

import numpy as np
import pytest

from cascade.quant.smoothquant import max_to_kv, smooth_block, smoothing_scales
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
