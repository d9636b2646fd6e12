"""The automatic mixed-precision workflow against an independent computation: the bytes of the
chosen model from the documented storage formula, the plan against a brute-force search over every
assignment, the measured KL against a float64 forward pass; and quantize-with-method's dispatch."""

import itertools

import jax
import numpy as np
import pytest
from flax import traverse_util

from cascade import quant
from cascade.models.config import ModelConfig
from cascade.models.decoder import logits_of
from cascade.models.llama import init_params
from cascade.models.model import Model
from cascade.models.quantize import quantize_with_method, weight_bytes
from cascade.models.sensitivity import float_params
from cascade.models.workflow import NoCandidate, auto_mixed_precision

CFG = ModelConfig(vocab_size=64, dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  max_seq_len=64, tie_embeddings=True)
HIGH, LOW = "int8", "int4-g16"


@pytest.fixture(scope="module")
def tiny():
    params = init_params(CFG, jax.random.key(0))
    params["layers_1"]["mlp"]["down_proj"]["kernel"] = params["layers_1"]["mlp"]["down_proj"]["kernel"] * 8.0
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (6, 16), 0, 64), np.int32)
    return Model(params=params, config=CFG, tokenizer=None, source="tiny"), tokens


def _hand_bytes(shape, spec, path) -> int:
    """The documented storage formula (:func:`cascade.quant.storage_nbytes`), not the traced one."""
    return quant.storage_nbytes(shape, spec, axis=1 if path.startswith("embed/") else 0)


def _kl64(params, ref_params, tokens) -> float:
    def logp(p):
        z = np.asarray(logits_of(p, CFG, tokens), np.float64)[:, :-1]
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    q, r = logp(params), logp(ref_params)
    return float((np.exp(r) * (r - q)).sum(-1).mean())


def test_the_plan_is_the_best_assignment_that_fits_the_budget(tiny):
    model, tokens = tiny
    flat = traverse_util.flatten_dict(model.params, sep="/")
    matrices = {p: a.shape for p, a in flat.items() if a.ndim == 2}
    norms = sum(2 * a.size for a in flat.values() if a.ndim == 1)  # kept in bf16
    all_high = norms + sum(_hand_bytes(s, HIGH, p) for p, s in matrices.items())
    all_low = norms + sum(_hand_bytes(s, LOW, p) for p, s in matrices.items())
    budget = (all_high + all_low) // 2

    got = auto_mixed_precision(model, None, budget=budget, candidates=(HIGH, LOW), tokens=tokens)
    picks = {u: pick["spec"] for u, pick in got.summary["units"].items()}
    assert set(picks) == set(matrices)
    hand = norms + sum(_hand_bytes(matrices[p], spec, p) for p, spec in picks.items())
    assert weight_bytes(got.model.params) == got.summary["model_bytes"] == hand <= budget
    assert {HIGH, LOW} == set(picks.values())  # the budget forces a real mix
    qflat = traverse_util.flatten_dict(got.model.params, sep="/", is_leaf=lambda k, v: isinstance(v, quant.QuantizedTensor))
    for p, spec in picks.items():
        assert str(qflat[p].spec) == str(quant.parse_spec(spec))
    assert got.summary["rules"] == got.rules.to_json()

    # brute force over all 2^15 assignments: the plan reaches the lowest summed KL that fits
    kl = {(r.unit, r.spec): r.kl for r in got.sensitivity.rows}
    cost = {(u, s): _hand_bytes(matrices[u], s, u) for u in matrices for s in (HIGH, LOW)}
    units = sorted(matrices)
    combos = np.array(list(itertools.product((0, 1), repeat=len(units))))  # 1: LOW
    by_spec = lambda table, s: np.array([table[(u, s)] for u in units], np.float64)  # noqa: E731
    total_bytes = norms + combos @ (by_spec(cost, LOW) - by_spec(cost, HIGH)) + by_spec(cost, HIGH).sum()
    total_kl = combos @ (by_spec(kl, LOW) - by_spec(kl, HIGH)) + by_spec(kl, HIGH).sum()
    best = total_kl[total_bytes <= budget].min()
    assert got.summary["predicted_kl"] == pytest.approx(best, rel=1e-9)
    assert got.summary["predicted_kl"] == pytest.approx(sum(kl[(u, s)] for u, s in picks.items()), rel=1e-12)
    # among matrices of the same cost, the ones kept at more bits are the ones that lose more KL at fewer
    for a, b in itertools.permutations(units, 2):
        if all(cost[(a, s)] == cost[(b, s)] for s in (HIGH, LOW)) and picks[a] == HIGH and picks[b] == LOW:
            assert kl[(a, LOW)] - kl[(a, HIGH)] >= kl[(b, LOW)] - kl[(b, HIGH)] - 1e-12

    # the additivity check is the KL of the quantized model, measured independently in float64
    want = _kl64(float_params(got.model.params), model.params, tokens)
    assert got.summary["measured_kl"] == pytest.approx(want, rel=2e-3, abs=1e-7)


def test_a_reused_report_plans_the_same_and_average_bits_bound_the_matrices(tiny):
    model, tokens = tiny
    first = auto_mixed_precision(model, None, avg_bits=6.0, candidates=(HIGH, LOW), tokens=tokens, measure_kl=False)
    n = sum(first.sensitivity.params.values())
    assert first.summary["bytes"] <= 6.0 * n / 8 and "measured_kl" not in first.summary
    notes = []
    again = auto_mixed_precision(model, None, avg_bits=6.0, sensitivity=first.sensitivity.to_json(),
                                 sensitivity_source="saved.json", note=notes.append)
    # the saved rows come back sorted by KL: the same picks and totals, rules in another order
    assert again.summary["units"] == first.summary["units"]
    assert again.summary["bytes"] == first.summary["bytes"]
    assert again.summary["predicted_kl"] == pytest.approx(first.summary["predicted_kl"], rel=1e-12)
    assert len(notes) == 1 and notes[0].startswith("reusing the sensitivity measured in saved.json (layer granularity, ")
    assert set(notes[0].removesuffix(")").rsplit(" ", 1)[1].split(",")) == {HIGH, LOW}


def test_a_calibrated_method_skips_per_tensor_candidates_before_measuring(tiny):
    model, _ = tiny
    notes = []
    with pytest.raises(NoCandidate, match="no candidate precision that --method gptq supports"):
        auto_mixed_precision(model, None, avg_bits=8, candidates=("int8-tensor",), method="gptq", note=notes.append)
    assert notes == ["skipping candidate int8-tensor: --method gptq does not support per-tensor specs"]


def test_quantize_with_method_hands_each_method_only_what_it_reads(tiny):
    model, _ = tiny
    # quantize_model itself refuses calibration data and autoround/smoothquant settings for rtn
    with pytest.raises(ValueError, match="does not use calibration data"):
        from cascade.models.quantize import quantize_model

        quantize_model(model, "int8", method="rtn", calib=object())
    q, _ = quantize_with_method(model, "int8", method="rtn", calib=object(), iters=5, batch=2, alpha=0.3)
    assert q.ptq["method"] == "rtn" and q.ptq["calibration"] is None and q.ptq["settings"] == {}
    ref, _ = quantize_with_method(model, "int8")
    assert weight_bytes(q.params) == weight_bytes(ref.params)
