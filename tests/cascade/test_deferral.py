"""Sequence-level deferral: the confidence scores against a float64 reference computed step by step
through the KV-cached decoder, and the verdict's two ends through the pair."""

import math

import jax
import numpy as np
import pytest

from cascade.deferral import SCORES, answer_scores, check, decide
from cascade.models.config import ModelConfig
from cascade.models.decoder import prefill, step
from cascade.models.generation import generate
from cascade.models.kv_cache import KVCache
from cascade.models.llama import init_params

CFG = ModelConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                  max_seq_len=64, tie_embeddings=False)


def _reference_scores(params, prompt, answer):
    """The same scores from the cached decoder (prefill, then one step per answer token), in float64."""
    cache = KVCache.create(CFG, 1, 64)
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, : len(prompt)] = prompt
    logits, cache = prefill(params, CFG, tokens, np.array([len(prompt)], np.int32), cache)
    rows = [np.asarray(logits[0], np.float64)]
    for t in answer[:-1]:
        logits, cache = step(params, CFG, np.array([t], np.int32), cache)
        rows.append(np.asarray(logits[0], np.float64))
    lps, ents = [], []
    for row, t in zip(rows, answer):
        z = row - row.max()
        logp = z - math.log(np.exp(z).sum())
        lps.append(logp[t])
        ents.append(-(np.exp(logp) * logp).sum())
    probs = sorted(math.exp(v) for v in lps)
    # numpy's default (linear) quantile, written out
    pos = 0.1 * (len(probs) - 1)
    lo = int(math.floor(pos))
    q = probs[lo] + (probs[min(lo + 1, len(probs) - 1)] - probs[lo]) * (pos - lo)
    return {"mean-logprob": sum(lps) / len(lps), "min-logprob": min(lps), "quantile": q, "entropy": -sum(ents) / len(ents)}


def test_scores_match_a_step_by_step_reference():
    params = jax.tree.map(lambda a: a * 3 if a.ndim >= 2 else a, init_params(CFG, jax.random.key(3)))
    prompt = [1, 7, 9, 30]
    answer = generate(params, CFG, [prompt], max_new_tokens=12, eos_ids=()).tokens[0]
    got, want = answer_scores(params, CFG, prompt, answer), _reference_scores(params, prompt, answer)
    assert set(got) == set(SCORES)
    for name in SCORES:
        assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-5), name
    assert got["min-logprob"] <= got["mean-logprob"] <= 0 and 0 < got["quantile"] <= 1


def test_verdict_and_bad_settings():
    scores = {"mean-logprob": -1.2, "min-logprob": -4.0, "quantile": 0.05, "entropy": -2.0}
    d = decide(scores, "mean-logprob", -1.0)
    assert d.deferred and "-1.2000 < threshold -1" in d.reason and "large model answered" in d.reason
    assert not decide(scores, "quantile", 0.01).deferred
    with pytest.raises(ValueError, match="unknown deferral score"):
        check("perplexity", -1.0)
    with pytest.raises(ValueError, match="finite"):
        check("entropy", float("nan"))
    with pytest.raises(ValueError, match="empty answer"):
        answer_scores(init_params(CFG, jax.random.key(0)), CFG, [1, 2], [])


def test_defer_mode_answers_with_one_model_or_the_other():
    """A threshold below any score keeps the small model's answer; one above every log-probability
    (they are <= 0) hands every prompt to the large model: each output is that model's alone."""
    from cascade.pair import load_pair, run

    pair = load_pair()
    small = run(pair, "The dog", mode="small", max_new_tokens=16)
    large = run(pair, "The dog", mode="large", max_new_tokens=16)
    kept = run(pair, "The dog", mode="defer", max_new_tokens=16, threshold=-1e9)
    assert kept.answered_by == "small" and kept.token_ids == small.token_ids and not kept.deferral.deferred
    assert kept.seconds["large"] == 0.0
    handed = run(pair, "The dog", mode="defer", max_new_tokens=16, threshold=0.5, defer_score="min-logprob")
    assert handed.answered_by == "large" and handed.token_ids == large.token_ids and handed.deferral.deferred
    assert handed.deferral.value == pytest.approx(
        answer_scores(pair.small.params, pair.small.config, small.prompt_token_ids, small.token_ids)["min-logprob"])
    j = handed.to_json()
    assert j["answered_by"] == "large" and j["deferral"]["deferred"] is True and j["deferral"]["seconds"]["large"] > 0
