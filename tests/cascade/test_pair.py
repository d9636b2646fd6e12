"""The pair API on the embedded defaults: load, quantize, run in each mode."""

import os

import pytest

from cascade.pair import check_same_tokenizer, load_pair, run
from cascade.models import SamplingConfig, load_model
from tests.shared_data import DATA


@pytest.fixture
def pair(default_pair):
    return default_pair


def test_speculative_greedy_equals_the_quantized_large_model_alone(pair):
    spec = run(pair, "Once upon a time, there was a", mode="speculative", max_new_tokens=48, draft_len=4)
    large = run(pair, "Once upon a time, there was a", mode="large", max_new_tokens=48)
    assert spec.token_ids == large.token_ids and spec.text == large.text and spec.text.strip()
    st = spec.stats
    assert st.rounds > 0 and 0 < st.acceptance_rate <= 1  # a trained draft agrees with its verifier sometimes
    assert large.stats is None
    auto = run(pair, "Once upon a time, there was a", mode="speculative", max_new_tokens=48, draft_len="auto")
    assert auto.token_ids == large.token_ids  # adaptive drafting keeps the output exact
    table = spec.table().splitlines()  # the one result type, for people: a row per field, its values in it
    assert table[0].split() == ["mode", "speculative"] and f"{st.acceptance_rate:.1%}" in spec.table()
    assert any(r.split()[:2] == ["tokens", str(len(spec.token_ids))] for r in table)
    assert "answered by  large" in large.table() and "acceptance" not in large.table()


def test_sampling_is_deterministic_for_a_seed(pair):
    s = SamplingConfig(temperature=0.8, top_k=40, seed=7)
    a = run(pair, "The little bird", max_new_tokens=32, sampling=s)
    b = run(pair, "The little bird", max_new_tokens=32, sampling=s)
    assert a.token_ids == b.token_ids and a.text.strip()


def test_pairs_must_share_a_tokenizer(pair):
    other = load_model(os.path.join(DATA, "stories260K", "stories260K.bin"))
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        check_same_tokenizer(other, pair.large)


def test_the_quant_specs_are_applied(pair):
    d = pair.describe()
    assert d["small"]["quant"] == "int4-full" and d["large"]["quant"] == "int8"
    n_linear = 7 * pair.large.config.n_layers  # q, k, v, o, gate, up, down per layer; embedding and head stay bf16
    assert d["large"]["matmul_backends"] == {"cpu": n_linear}  # the native kernel serves every one on CPU
    assert d["small"]["attention_backend"] == d["large"]["attention_backend"] == "cpu"
    assert pair.small.params["layers_0"]["mlp"]["up_proj"]["kernel"].spec.bits == 4
    with pytest.raises(ValueError, match="unknown mode"):
        run(pair, "x", mode="medium")


def test_a_one_model_pair_runs_its_mode_only():
    solo = load_pair(None, "default-small", large_quant="none")
    assert solo.small is None and solo.describe()["small"] is None
    assert solo.describe()["large"]["matmul_backends"] == {}  # unquantized: no dequant-matmul
    assert run(solo, "Once", mode="large", max_new_tokens=4).token_ids
    with pytest.raises(ValueError, match="needs the small model"):
        run(solo, "Once", mode="speculative", max_new_tokens=4)
    with pytest.raises(ValueError, match="at least one model"):
        load_pair(None, None)
