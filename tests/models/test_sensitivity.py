"""Layer sensitivity against a direct float64 computation, the proxy against its definition, and
the automatic rules under a budget."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from cascade import quant
from cascade.memory import planned_weight_bytes
from cascade.models.config import ModelConfig
from cascade.models.decoder import logits_of
from cascade.models.llama import init_params
from cascade.models.model import Model
from cascade.models.quantize import quantize_model
from cascade.models.sensitivity import (
    auto_rules, budget_from_avg_bits, layer_sensitivity, measured_kl, spearman, units_of,
)
from cascade.quant.allocate import InfeasibleBudget

CFG = ModelConfig(vocab_size=64, dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  max_seq_len=64, tie_embeddings=True)
CANDIDATES = ("int8", "int4-g16", "int2-g16-asym")


@pytest.fixture(scope="module")
def tiny():
    params = init_params(CFG, jax.random.key(0))
    # a little structure so that precision matters unevenly: scale one block's MLP up
    params["layers_1"]["mlp"]["down_proj"]["kernel"] = params["layers_1"]["mlp"]["down_proj"]["kernel"] * 8.0
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (6, 16), 0, 64), np.int32)
    report = layer_sensitivity(params, CFG, tokens, CANDIDATES, progress=False)
    return params, tokens, report


def _kl64(params, ref_params, tokens):
    def logp(p):
        z = np.asarray(logits_of(p, CFG, tokens), np.float64)[:, :-1]
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    q, r = logp(params), logp(ref_params)
    return float((np.exp(r) * (r - q)).sum(-1).mean())


def test_units_are_every_matrix_or_every_block(tiny):
    params, _, _ = tiny
    layers = units_of(params, "layer")
    assert set(layers) == {"embed/embedding"} | {f"layers_{i}/{m}/kernel" for i in range(2) for m in
                                                 ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
                                                  "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
    blocks = units_of(params, "block")
    assert set(blocks) == {"embed/embedding", "layers_0", "layers_1"} and len(blocks["layers_0"]) == 7
    with pytest.raises(ValueError, match="granularity"):
        units_of(params, "row")


def test_each_row_is_the_kl_of_the_model_with_that_unit_alone_quantized(tiny):
    params, tokens, report = tiny
    assert len(report.rows) == len(units_of(params)) * len(CANDIDATES)
    for r in report.rows:
        if r.unit not in ("layers_1/mlp/down_proj/kernel", "embed/embedding", "layers_0/attn/k_proj/kernel"):
            continue
        flat = traverse_util.flatten_dict(params, sep="/")
        axis = 1 if r.unit.startswith("embed/") else 0
        flat[r.unit] = quant.dequantize(quant.quantize(flat[r.unit], r.spec, axis=axis), "float32")
        want = _kl64(traverse_util.unflatten_dict(flat, sep="/"), params, tokens)
        assert r.kl == pytest.approx(want, rel=2e-3, abs=1e-7), r
        assert r.nbytes == quant.quantize(params_at(params, r.unit), r.spec, axis=axis).nbytes


def params_at(params, path):
    return traverse_util.flatten_dict(params, sep="/")[path]


def test_the_proxy_is_the_hessian_weighted_error_of_the_layer_input(tiny):
    """Block 0's q_proj reads RMSNorm(embedding rows): mean over tokens of ||x dW||^2, in float64."""
    params, tokens, report = tiny
    emb = np.asarray(params["embed"]["embedding"], np.float64)[tokens].reshape(-1, CFG.dim)
    x = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + CFG.norm_eps)
    x = x * np.asarray(params["layers_0"]["attn_norm"]["scale"], np.float64)
    w = np.asarray(params["layers_0"]["attn"]["q_proj"]["kernel"], np.float64)
    for r in report.rows:
        if r.unit == "layers_0/attn/q_proj/kernel":
            dw = np.asarray(quant.dequantize(quant.quantize(w.astype(np.float32), r.spec), "float32"), np.float64) - w
            assert r.proxy == pytest.approx(((x @ dw) ** 2).sum(-1).mean(), rel=1e-4)
    assert all((r.proxy is None) == (r.unit == "embed/embedding") for r in report.rows)


def test_fewer_bits_move_the_model_more(tiny):
    _, _, report = tiny
    by_spec = {s: sum(r.kl for r in report.rows if r.spec == s) for s in CANDIDATES}
    assert by_spec["int8"] < by_spec["int4-g16"] < by_spec["int2-g16-asym"]
    rows = [r for r in report.rows if r.proxy is not None]
    assert report.rank_correlation == spearman([r.proxy for r in rows], [r.kl for r in rows])


def test_block_granularity_quantizes_the_whole_block(tiny):
    params, tokens, _ = tiny
    report = layer_sensitivity(params, CFG, tokens, ["int4-g16"], granularity="block", proxy=False, progress=False)
    row = next(r for r in report.rows if r.unit == "layers_1")
    model = Model(params=params, config=CFG, tokenizer=None)
    q, _ = quantize_model(model, "layers_1=int4-g16,embed=bf16,*=bf16", progress=False)
    # the other parameters in bf16 move the model a little: the block's KL dominates
    assert row.kl == pytest.approx(measured_kl(q.params, CFG, params, tokens), rel=0.05)


def test_auto_rules_spend_the_budget_where_the_kl_is(tiny):
    params, tokens, report = tiny
    budget = budget_from_avg_bits(report, 4.5)
    rules, summary = auto_rules(report, budget)
    assert summary["bytes"] <= budget and summary["avg_bits"] <= 4.5
    model = Model(params=params, config=CFG, tokenizer=None)
    q, _ = quantize_model(model, rules, progress=False)
    flat = traverse_util.flatten_dict(q.params, sep="/", is_leaf=lambda k, v: isinstance(v, quant.QuantizedTensor))
    for unit, pick in summary["units"].items():
        got = flat[unit]
        assert isinstance(got, quant.QuantizedTensor) and str(got.spec) == str(quant.parse_spec(pick["spec"]))
    norms = planned_weight_bytes(CFG, rules) - summary["bytes"]
    assert norms == sum(a.size * 2 for p, a in traverse_util.flatten_dict(params, sep="/").items() if a.ndim == 1)
    # the sensitive, scaled-up down_proj is kept at more bits than the average
    assert summary["units"]["layers_1/mlp/down_proj/kernel"]["spec"] != "int2-g16-asym"
    low = min(r.nbytes for r in report.rows if r.unit == "layers_0/mlp/up_proj/kernel")
    with pytest.raises(InfeasibleBudget, match="at least"):
        auto_rules(report, low)
    # and the allocation is no worse than the uniform spec of about the same size, as predicted
    uniform = sum(r.kl for r in report.rows if r.spec == "int4-g16")
    uniform_bytes = sum(r.nbytes for r in report.rows if r.spec == "int4-g16")
    _, same_bytes = auto_rules(report, uniform_bytes)
    assert same_bytes["predicted_kl"] <= uniform + 1e-12


def test_spearman_on_hand_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr
    with pytest.raises(ValueError):
        spearman([1], [1])


def test_a_quantized_model_is_refused():
    params = init_params(CFG, jax.random.key(0))
    params["layers_0"]["attn"]["q_proj"]["kernel"] = quant.quantize(params["layers_0"]["attn"]["q_proj"]["kernel"], "int8")
    with pytest.raises(ValueError, match="float model"):
        layer_sensitivity(params, CFG, np.zeros((2, 8), np.int32), ["int4"], progress=False)
