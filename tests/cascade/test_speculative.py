"""Speculative decoding against the target model decoding alone, and the acceptance rule against
the distribution it must reproduce."""

import jax
import numpy as np
import pytest

from cascade.speculative import speculative_generate, token_probs, verify_greedy, verify_sampled
from cascade.models.config import ModelConfig
from cascade.models.generation import SamplingConfig, generate
from cascade.models.llama import init_params

# untied heads: a random tied model mostly repeats its input token, which would make a weak test
_BASE = dict(vocab_size=96, max_seq_len=128, bos_token_id=0, eos_token_ids=(1,), tie_embeddings=False)
DRAFT_CFG = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, **_BASE)
TARGET_CFG = ModelConfig(dim=48, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, **_BASE)


def _peaked(params, scale):
    """Random weights scaled up so the next-token distributions are peaked, not uniform."""
    return jax.tree.map(lambda a: a * scale if a.ndim >= 2 else a, params)


@pytest.fixture(scope="module")
def target():
    return _peaked(init_params(TARGET_CFG, jax.random.key(2)), 3.0)


@pytest.fixture(scope="module", params=["noisy-copy", "smaller"])
def draft(request, target):
    """A draft that agrees with the target often (its weights plus noise) or rarely (another model)."""
    if request.param == "noisy-copy":
        noise = lambda a: a + 0.3 * a.std() * jax.random.normal(jax.random.key(7), a.shape)  # noqa: E731
        return jax.tree.map(noise, target), TARGET_CFG
    return _peaked(init_params(DRAFT_CFG, jax.random.key(1)), 3.0), DRAFT_CFG


PROMPTS = [[0, 5, 17, 33], [0], [0, 3, 9, 27, 81, 50, 11, 42, 7, 2, 64, 70, 12, 13, 14, 15, 16, 18]]


@pytest.mark.parametrize("draft_len", [1, 4])
def test_greedy_output_equals_the_target_alone(draft, target, draft_len):
    draft, draft_cfg = draft
    for prompt in PROMPTS:
        ref = generate(target, TARGET_CFG, [prompt], max_new_tokens=40, eos_ids=()).tokens[0]
        out = speculative_generate(draft, draft_cfg, target, TARGET_CFG, prompt, max_new_tokens=40,
                                   draft_len=draft_len, eos_ids=())
        assert out.tokens == ref
        st = out.stats
        # a round counts min(draft_len, tokens still allowed) proposals: draft_len until the last few rounds
        assert st.offered_at[0] == st.rounds and sum(st.offered_at) == st.draft_tokens <= st.rounds * draft_len
        assert st.draft_tokens >= st.rounds * draft_len - draft_len * (draft_len - 1) // 2
        assert 0 <= st.accepted_tokens <= st.draft_tokens
        # every round emits its accepted proposals plus one target token (the last round may be cut)
        assert st.emitted_tokens == len(out.tokens) <= 1 + st.accepted_tokens + st.rounds
        assert sum(st.accepted_at) == st.accepted_tokens
        assert all(a >= b for a, b in zip(st.accepted_at, st.accepted_at[1:]))  # a prefix is accepted


def test_a_draft_identical_to_the_target_is_always_accepted(target):
    out = speculative_generate(target, TARGET_CFG, target, TARGET_CFG, PROMPTS[0], max_new_tokens=31,
                               draft_len=5, eos_ids=())
    ref = generate(target, TARGET_CFG, [PROMPTS[0]], max_new_tokens=31, eos_ids=()).tokens[0]
    assert out.tokens == ref
    assert out.stats.acceptance_rate == 1.0 and out.stats.rounds == 5  # 1 prefill token + 5 rounds x (5 accepted + 1)


def test_stops_at_eos_like_the_target(draft, target):
    draft, draft_cfg = draft
    ref = generate(target, TARGET_CFG, [PROMPTS[2]], max_new_tokens=60, eos_ids=()).tokens[0]
    eos = ref[7]  # a token the target emits: declare it EOS and both must stop at its first occurrence
    want = generate(target, TARGET_CFG, [PROMPTS[2]], max_new_tokens=60, eos_ids=(eos,))
    out = speculative_generate(draft, draft_cfg, target, TARGET_CFG, PROMPTS[2], max_new_tokens=60, draft_len=4,
                               eos_ids=(eos,))
    assert out.tokens == want.tokens[0] and out.tokens[-1] == eos
    assert out.stop_reason == "eos" == want.stop_reasons[0]


def test_sampled_speculative_decoding_is_seeded(target):
    draft = _peaked(init_params(DRAFT_CFG, jax.random.key(1)), 3.0)
    s = SamplingConfig(temperature=1.0, top_k=20, seed=3)
    a = speculative_generate(draft, DRAFT_CFG, target, TARGET_CFG, PROMPTS[0], max_new_tokens=30, sampling=s, eos_ids=())
    b = speculative_generate(draft, DRAFT_CFG, target, TARGET_CFG, PROMPTS[0], max_new_tokens=30, sampling=s, eos_ids=())
    assert a.tokens == b.tokens and len(a.tokens) == 30
    c = speculative_generate(draft, DRAFT_CFG, target, TARGET_CFG, PROMPTS[0], max_new_tokens=30, eos_ids=(),
                             sampling=SamplingConfig(temperature=1.0, top_k=20, seed=4))
    assert c.tokens != a.tokens


def test_verify_sampled_reproduces_the_target_distribution():
    """The first emitted token of a round is distributed as p, whatever the draft's q
    (Leviathan et al. 2023, Theorem 1): the draft proposes d ~ q, the rule accepts or resamples."""
    p = np.array([0.5, 0.25, 0.15, 0.1, 0.0])
    q = np.array([0.1, 0.1, 0.2, 0.3, 0.3])
    rng = np.random.default_rng(0)
    n = 40_000
    counts = np.zeros(5)
    for _ in range(n):
        d = int(rng.choice(5, p=q))
        n_acc, nxt = verify_sampled([d], q[None], np.stack([p, p]), rng)
        counts[d if n_acc == 1 else nxt] += 1
    freq = counts / n
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(0.25 / n))  # 4 sigma
    assert counts[4] == 0  # a token the target never samples is never emitted


def test_verify_greedy_accepts_the_matching_prefix():
    logits = np.eye(6)[[2, 4, 1, 5]] * 3.0  # target argmax per position: 2, 4, 1, 5
    assert verify_greedy([2, 4, 0], logits) == (2, 1)
    assert verify_greedy([2, 4, 1], logits) == (3, 5)
    assert verify_greedy([3, 4, 1], logits) == (0, 2)


def test_token_probs_temperature_top_k_top_p():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    np.testing.assert_allclose(token_probs(logits, SamplingConfig(temperature=1.0)), [0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(token_probs(logits, SamplingConfig(temperature=1.0, top_k=2)), [4 / 7, 3 / 7, 0, 0])
    # nucleus 0.65: 0.4 then 0.4+0.3 >= 0.65 -> the first two
    np.testing.assert_allclose(token_probs(logits, SamplingConfig(temperature=1.0, top_p=0.65)), [4 / 7, 3 / 7, 0, 0])
    hot = np.array([0.4, 0.3, 0.2, 0.1]) ** 2
    np.testing.assert_allclose(token_probs(logits, SamplingConfig(temperature=0.5)), hot / hot.sum())


def test_bad_requests_are_clear_errors(target):
    draft = init_params(DRAFT_CFG, jax.random.key(1))
    with pytest.raises(ValueError, match="exceeds the context"):
        speculative_generate(draft, DRAFT_CFG, target, TARGET_CFG, [0] * 100, max_new_tokens=40)
    with pytest.raises(ValueError, match="draft_len"):
        speculative_generate(draft, DRAFT_CFG, target, TARGET_CFG, [0], max_new_tokens=4, draft_len=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        speculative_generate(draft, DRAFT_CFG, target, TARGET_CFG, [0, 500], max_new_tokens=4)
    big = ModelConfig(**{**DRAFT_CFG.to_dict(), "vocab_size": 200})
    with pytest.raises(ValueError, match="share a tokenizer"):
        speculative_generate(init_params(big, jax.random.key(0)), big, target, TARGET_CFG, [0], max_new_tokens=4)


@pytest.mark.parametrize("kv", ["int8", "int4-kg8-s2"])
def test_greedy_output_with_quantized_caches_equals_the_target_alone_with_its_cache(draft, target, kv):
    """Rejected proposals move the cache lengths back across key groups; the output is still the
    target's own greedy output with the same KV precision."""
    draft, draft_cfg = draft
    prompt = PROMPTS[2]
    ref = generate(target, TARGET_CFG, [prompt], max_new_tokens=48, eos_ids=(), kv=kv).tokens[0]
    out = speculative_generate(draft, draft_cfg, target, TARGET_CFG, prompt, max_new_tokens=48, draft_len=4,
                               eos_ids=(), draft_kv="int4", target_kv=kv)
    assert out.tokens == ref
    assert out.stats.accepted_tokens < out.stats.draft_tokens  # some rounds were rewound
