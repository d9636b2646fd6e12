"""The Flax decoder against Hugging Face ``transformers`` (CPU torch, float32) as the reference."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cascade.models.config import ModelConfig, UnsupportedModelError, config_from_hf
from cascade.models.generation import SamplingConfig, generate
from cascade.models.decoder import forward, logits_of, prefill
from cascade.models.kv_cache import KVCache
from cascade.models.loaders.hf import load_hf
from tests.models.hf_fixtures import VARIANTS, make_hf_model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, directory)
    return request.param, hf, load_hf(directory)


TOKENS = np.random.RandomState(0).randint(0, 128, (2, 20))


def _hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.numpy()


def test_logits_match_transformers(pair):
    kind, hf, model = pair
    ref = _hf_logits(hf, TOKENS)
    ours = np.asarray(logits_of(model.params, model.config, TOKENS))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_cached_decode_matches_full_forward(pair):
    """Prefill 12 tokens, then decode one at a time through the static cache: same logits."""
    _, hf, model = pair
    ref = _hf_logits(hf, TOKENS)
    cache = KVCache.create(model.config, 2, 64)
    logits, cache = prefill(model.params, model.config, TOKENS[:, :12], np.array([12, 12]), cache)
    np.testing.assert_allclose(np.asarray(logits), ref[:, 11], atol=1e-4 * np.abs(ref).max())
    for t in range(12, 20):
        logits, cache = forward(model.params, model.config, jnp.asarray(TOKENS[:, t:t + 1]), cache.lengths[:, None],
                                cache, None, True)
        np.testing.assert_allclose(np.asarray(logits), ref[:, t], atol=1e-4 * np.abs(ref).max())
    assert np.asarray(cache.lengths).tolist() == [20, 20]


def test_greedy_generation_matches_transformers(pair):
    kind, hf, model = pair
    prompt = [1, 17, 42, 99, 5]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    ours = generate(model.params, model.config, [prompt], max_new_tokens=12, eos_ids=())
    assert ours.tokens[0] == ref
    assert ours.stop_reasons == ["max_tokens"]


def test_batch_rows_of_different_lengths_equal_single_rows(pair):
    """Per-row lengths (no left padding): each row of a batch generates what it would alone."""
    _, _, model = pair
    prompts = [[1, 5, 9], [1, 7, 3, 8, 2, 11, 4]]
    batch = generate(model.params, model.config, prompts, max_new_tokens=6, eos_ids=())
    for i, p in enumerate(prompts):
        assert generate(model.params, model.config, [p], max_new_tokens=6, eos_ids=()).tokens[0] == batch.tokens[i]


def test_generation_stops_at_eos(pair):
    _, _, model = pair
    first = generate(model.params, model.config, [[1, 2, 3]], max_new_tokens=8, eos_ids=()).tokens[0]
    stop = first[2]
    out = generate(model.params, model.config, [[1, 2, 3]], max_new_tokens=8, eos_ids=(stop,))
    assert out.tokens[0] == first[: first.index(stop) + 1]
    assert out.stop_reasons == ["eos"]


def test_decoding_compiles_once_per_bucket(pair):
    """More tokens, other prompts of the same bucket, other sampling settings: no new compilation."""
    import jax

    from cascade.models import decoder, generation

    _, _, model = pair
    generate(model.params, model.config, [[1, 2, 3]], max_new_tokens=3, eos_ids=())
    before = (generation._decode_and_sample._cache_size(), decoder.forward._cache_size())
    generate(model.params, model.config, [[4, 5, 6, 7]], max_new_tokens=20, eos_ids=(),
             sampling=SamplingConfig(temperature=0.7, top_k=5, top_p=0.9), key=jax.random.key(7))
    assert (generation._decode_and_sample._cache_size(), decoder.forward._cache_size()) == before


def test_explicit_key_overrides_the_seed(pair):
    import jax

    _, _, model = pair
    s = SamplingConfig(temperature=1.0, seed=0)
    a = generate(model.params, model.config, [[1, 2]], max_new_tokens=12, sampling=s, key=jax.random.key(5), eos_ids=())
    b = generate(model.params, model.config, [[1, 2]], max_new_tokens=12, sampling=SamplingConfig(temperature=1.0, seed=5),
                 eos_ids=())
    c = generate(model.params, model.config, [[1, 2]], max_new_tokens=12, sampling=s, eos_ids=())
    assert a.tokens == b.tokens != c.tokens


def test_sampling_is_reproducible_and_respects_top_k():
    from cascade.models.sampling import sample_logits
    import jax

    logits = jnp.asarray(np.random.RandomState(1).randn(4, 50).astype(np.float32))
    key = jax.random.key(3)
    a = sample_logits(logits, key, jnp.float32(1.0), jnp.int32(3), jnp.float32(1.0))
    b = sample_logits(logits, key, jnp.float32(1.0), jnp.int32(3), jnp.float32(1.0))
    assert np.array_equal(a, b)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    for seed in range(20):
        s = np.asarray(sample_logits(logits, jax.random.key(seed), jnp.float32(1.0), jnp.int32(3), jnp.float32(1.0)))
        assert all(s[i] in top3[i] for i in range(4))
    greedy = sample_logits(logits, key, jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    assert np.array_equal(greedy, np.argmax(np.asarray(logits), -1))
    # top_p tiny: only the argmax survives
    s = sample_logits(logits, key, jnp.float32(1.0), jnp.int32(0), jnp.float32(1e-6))
    assert np.array_equal(s, np.argmax(np.asarray(logits), -1))


def test_top_p_applies_to_the_renormalised_top_k():
    """probs (.5, .3, .2), top_k=2 -> (.625, .375); top_p=0.6 is reached by the first token alone."""
    from cascade.models.sampling import sample_logits
    import jax

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2]], jnp.float32))
    seen = {int(sample_logits(logits, jax.random.key(s), jnp.float32(1.0), jnp.int32(2), jnp.float32(0.6))[0])
            for s in range(100)}
    assert seen == {0}
    seen = {int(sample_logits(logits, jax.random.key(s), jnp.float32(1.0), jnp.int32(2), jnp.float32(0.7))[0])
            for s in range(200)}
    assert seen == {0, 1}


def test_top_p_matches_numpy_nucleus():
    """Empirical sampling frequencies lie inside the numpy-computed nucleus."""
    from cascade.models.sampling import sample_logits
    import jax

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    seen = set()
    for seed in range(200):
        seen.add(int(sample_logits(jnp.asarray(logits), jax.random.key(seed), jnp.float32(1.0), jnp.int32(0),
                                   jnp.float32(0.7))[0]))
    assert seen == {0, 1}  # 0.5 < 0.7 needs token 1 too; 0.8 >= 0.7 stops there


def test_writing_past_the_cache_is_an_error(pair):
    _, _, model = pair
    cache = KVCache.create(model.config, 1, 8)
    _, cache = prefill(model.params, model.config, TOKENS[:1, :6], np.array([6]), cache)
    with pytest.raises(ValueError, match="KV cache overflow: a row holds 6 positions and 4 more do not fit in a cache of 8"):
        prefill(model.params, model.config, TOKENS[:1, 6:10], np.array([4]), cache)


def test_one_row_stops_at_eos_while_the_other_continues(pair):
    _, _, model = pair
    for prompts in ([[1, 5, 9], [1, 70, 33, 80, 120, 64]], [[3], [100, 2, 50]], [[77, 12], [9, 9, 9, 9, 40]]):
        free = generate(model.params, model.config, prompts, max_new_tokens=8, eos_ids=())
        only_first = [t for t in free.tokens[0] if t not in free.tokens[1]]  # a stop token only row 0 produces
        if only_first:
            stop = only_first[0]
            break
    else:
        raise AssertionError("no prompt pair gives rows with distinct tokens")
    out = generate(model.params, model.config, prompts, max_new_tokens=8, eos_ids=(stop,))
    assert out.tokens[0] == free.tokens[0][:free.tokens[0].index(stop) + 1] and out.stop_reasons[0] == "eos"
    assert out.tokens[1] == free.tokens[1] and out.stop_reasons[1] == "max_tokens"


def test_tokens_per_s_for_short_generations(pair):
    """Decode steps that compile are left out of tokens/s: after a warm-up, one decode step counts."""
    _, _, model = pair
    assert generate(model.params, model.config, [[1, 2]], max_new_tokens=1, eos_ids=()).tokens_per_s is None
    assert generate(model.params, model.config, [[1, 2]], max_new_tokens=4, eos_ids=()).tokens_per_s > 0
    assert generate(model.params, model.config, [[1, 2]], max_new_tokens=2, eos_ids=()).tokens_per_s > 0


def test_out_of_vocabulary_prompt_ids(pair):
    _, _, model = pair
    with pytest.raises(ValueError, match="prompt token id 128 is outside the vocabulary"):
        generate(model.params, model.config, [[1, 128]], max_new_tokens=2)


def test_context_overflow_is_a_clear_error(pair):
    _, _, model = pair
    with pytest.raises(ValueError, match="exceeds the model context"):
        generate(model.params, model.config, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ValueError, match="context"):
        generate(model.params, model.config, [[1] * 300], max_new_tokens=1)


def test_bad_sampling_settings():
    for kw in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**kw)


@pytest.mark.parametrize("hf, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
    ({"architectures": ["LlamaForCausalLM"], "hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rope_scaling": {"rope_type": "yarn", "factor": 2}},
     "unsupported rope_scaling type 'yarn'"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "use_sliding_window"),
])
def test_unsupported_configs_name_the_option(hf, message):
    base = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=10)
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf({**base, **hf})


def test_config_round_trips_through_dict_and_hf_config(pair):
    _, _, model = pair
    cfg = model.config
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert config_from_hf(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("edit, message", [({"hidden_size": None}, "bad value in config"),
                                           ({"num_attention_heads": "four"}, "bad value in config"),
                                           ({"num_hidden_layers": 0}, "n_layers must be a positive integer")])
def test_bad_config_values_name_the_file(tmp_path, edit, message):
    import json

    from cascade.models.config import load_hf_config

    base = dict(architectures=["LlamaForCausalLM"], hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=10)
    (tmp_path / "config.json").write_text(json.dumps({**base, **edit}))
    with pytest.raises(ValueError, match=message) as e:
        load_hf_config(tmp_path / "config.json")
    assert "config.json" in str(e.value)
