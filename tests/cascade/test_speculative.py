"""Speculative decoding against the target model decoding alone, and the acceptance rule against
the distribution it must reproduce."""

import dataclasses

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax.numpy as jnp

from cascade.speculative import speculative_generate, verify_greedy, verify_sampled
from cascade.models.config import ModelConfig
from cascade.models.generation import generate
from cascade.models.sampling import SamplingConfig, token_probs
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


# a reduced-vocabulary draft (FR-Spec): it reads and proposes 40 of the 96 tokens (the rest read
# as its last row and have probability 0); ids 0 and 1 (BOS, EOS) are among them
SUBSET = tuple(sorted({0, 1, *map(int, np.random.default_rng(3).choice(np.arange(2, 96), 38, replace=False))}))
REDUCED_CFG = dataclasses.replace(DRAFT_CFG, vocab_subset=len(SUBSET) + 1)


def _reduced_draft(key=1):
    params = _peaked(init_params(REDUCED_CFG, jax.random.key(key)), 3.0)
    return {**params, "vocab_map": jnp.asarray(SUBSET + (-1,), jnp.int32)}


@pytest.fixture(scope="module", params=["noisy-copy", "smaller", "reduced-vocab"])
def draft(request, target):
    """A draft that agrees with the target often (its weights plus noise) or rarely (another model,
    or one that proposes only from a subset of the vocabulary)."""
    if request.param == "noisy-copy":
        noise = lambda a: a + 0.3 * a.std() * jax.random.normal(jax.random.key(7), a.shape)  # noqa: E731
        return jax.tree.map(noise, target), TARGET_CFG
    if request.param == "reduced-vocab":
        return _reduced_draft(), REDUCED_CFG
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


def test_adaptive_drafting_keeps_the_greedy_output(draft, target):
    """Drafting stopped by the draft's confidence (any threshold) leaves the target's greedy output;
    a higher threshold offers fewer proposals per round.  ``draft_len="auto"`` too."""
    draft, draft_cfg = draft
    prompt = PROMPTS[2]
    ref = generate(target, TARGET_CFG, [prompt], max_new_tokens=40, eos_ids=()).tokens[0]
    offered = []
    for confidence in (0.0, 0.5, 0.8, 1.0):
        out = speculative_generate(draft, draft_cfg, target, TARGET_CFG, prompt, max_new_tokens=40, draft_len=4,
                                   draft_confidence=confidence, eos_ids=())
        assert out.tokens == ref, confidence
        st = out.stats
        assert st.offered_at[0] == st.rounds and all(a >= b for a, b in zip(st.offered_at, st.offered_at[1:]))
        offered.append(st.draft_tokens / st.rounds)
    assert offered[0] > offered[2] and offered[3] == 1.0  # confidence 1: only the first proposal, always offered
    assert all(a >= b for a, b in zip(offered, offered[1:]))
    auto = speculative_generate(draft, draft_cfg, target, TARGET_CFG, prompt, max_new_tokens=40, draft_len="auto",
                                eos_ids=())
    assert auto.tokens == ref


def test_draft_settings():
    from cascade.speculative import AUTO_CONFIDENCE, AUTO_DRAFT_LEN, draft_setting, verify_sizes

    assert verify_sizes(8) == (1, 2, 4, 8) and verify_sizes(6) == (1, 2, 4, 6) and verify_sizes(1) == (1,)

    assert draft_setting(4) == (4, 0.0) and draft_setting("6") == (6, 0.0)
    assert draft_setting("auto") == (AUTO_DRAFT_LEN, AUTO_CONFIDENCE) and draft_setting("auto", 0.2) == (AUTO_DRAFT_LEN, 0.2)
    assert draft_setting(3, 0.7) == (3, 0.7)
    for bad, msg in ((0, "between 1 and 32"), (33, "between 1 and 32"), ("fast", "or 'auto'"), (2.5, "whole number")):
        with pytest.raises(ValueError, match=msg):
            draft_setting(bad)
    with pytest.raises(ValueError, match=r"draft_confidence must be in \[0, 1\]"):
        draft_setting(4, 1.5)


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
    (Leviathan et al. 2023, Theorem 1): the draft proposes d ~ q, the rule accepts or resamples.
    40,000 independent rows in one call."""
    p = np.array([0.5, 0.25, 0.15, 0.1, 0.0], np.float32)
    q = np.array([0.1, 0.1, 0.2, 0.3, 0.3], np.float32)
    n = 40_000
    d = np.random.default_rng(0).choice(5, size=n, p=q).astype(np.int32)
    n_acc, nxt = verify_sampled(jnp.asarray(d)[:, None], jnp.broadcast_to(q, (n, 1, 5)), jnp.broadcast_to(p, (n, 2, 5)),
                                jax.random.key(0))
    emitted = np.where(np.asarray(n_acc) == 1, d, np.asarray(nxt))
    freq = np.bincount(emitted, minlength=5) / n
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(0.25 / n))  # 4 sigma
    assert freq[4] == 0  # a token the target never samples is never emitted


def test_verify_sampled_after_k_acceptances_draws_from_the_last_target_row():
    p = np.zeros((1, 3, 4), np.float32)
    p[0, :2, 2] = 1.0  # both proposals (token 2) certain under the target
    p[0, 2, 3] = 1.0  # the bonus position puts all mass on token 3
    q = np.zeros((1, 2, 4), np.float32)
    q[0, :, 2] = 1.0
    n_acc, nxt = verify_sampled(jnp.asarray([[2, 2]], jnp.int32), jnp.asarray(q), jnp.asarray(p), jax.random.key(1))
    assert int(n_acc[0]) == 2 and int(nxt[0]) == 3


def test_verify_greedy_accepts_the_matching_prefix():
    logits = jnp.asarray(np.eye(6)[[2, 4, 1, 5]] * 3.0)  # target argmax per position: 2, 4, 1, 5
    n, nxt = verify_greedy(jnp.asarray([[2, 4, 0], [2, 4, 1], [3, 4, 1]], jnp.int32), jnp.stack([logits] * 3))
    assert np.asarray(n).tolist() == [2, 3, 0] and np.asarray(nxt).tolist() == [1, 5, 2]


def test_token_probs_temperature_top_k_top_p():
    logits = jnp.log(jnp.asarray([0.4, 0.3, 0.2, 0.1]))

    def probs(temperature=1.0, top_k=0, top_p=1.0):
        return np.asarray(token_probs(logits, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)))

    np.testing.assert_allclose(probs(), [0.4, 0.3, 0.2, 0.1], rtol=1e-6)
    np.testing.assert_allclose(probs(top_k=2), [4 / 7, 3 / 7, 0, 0], rtol=1e-6)
    # nucleus 0.65: 0.4 then 0.4+0.3 >= 0.65 -> the first two
    np.testing.assert_allclose(probs(top_p=0.65), [4 / 7, 3 / 7, 0, 0], rtol=1e-6)
    hot = np.array([0.4, 0.3, 0.2, 0.1]) ** 2
    np.testing.assert_allclose(probs(temperature=0.5), hot / hot.sum(), rtol=1e-6)


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


@pytest.mark.parametrize("kv", [None, "int4-kg8-s2"])
def test_batched_rows_each_equal_the_target_alone(draft, target, kv):
    """Rows of different prompt lengths decode together (each its own lengths, acceptance and
    rewinds, stopping on its own) and each row's greedy output is the target's alone."""
    from cascade.speculative import speculative_generate_batch

    draft, draft_cfg = draft
    ref = generate(target, TARGET_CFG, PROMPTS, max_new_tokens=33, eos_ids=(), kv=kv).tokens
    eos = ref[1][5]  # a token row 1 emits early: that row stops there, the others may run on
    want = generate(target, TARGET_CFG, PROMPTS, max_new_tokens=33, eos_ids=(eos,), kv=kv)
    out = speculative_generate_batch(draft, draft_cfg, target, TARGET_CFG, PROMPTS, max_new_tokens=33, draft_len=3,
                                     eos_ids=(eos,), draft_kv=kv, target_kv=kv)
    assert [r.tokens for r in out] == want.tokens
    assert [r.stop_reason for r in out] == want.stop_reasons and out[1].stop_reason == "eos"
    for r in out:
        assert r.stats.emitted_tokens == len(r.tokens) and r.stats.accepted_tokens <= r.stats.draft_tokens


def test_sampled_speculative_tokens_follow_the_target_distribution(target):
    """The second generated token (the first one a speculative round emits) over 4,000 rows is
    distributed as under the target alone: the exact marginal sum_t p(t) p(. | t) from the target's
    own logits, by a chi-square test (0.1% level), with a draft that disagrees with the target."""
    from cascade.models.decoder import logits_of
    from cascade.speculative import speculative_generate_batch

    draft = _peaked(init_params(DRAFT_CFG, jax.random.key(1)), 3.0)
    prompt = [0, 5, 17, 33]
    s = SamplingConfig(temperature=1.0, top_k=12, seed=11)
    sp = (jnp.float32(1.0), jnp.int32(12), jnp.float32(1.0))
    n = 4000
    out = speculative_generate_batch(draft, DRAFT_CFG, target, TARGET_CFG, [prompt] * n, max_new_tokens=2, draft_len=3,
                                     sampling=s, eos_ids=())
    second = np.array([r.tokens[1] for r in out])
    p0 = np.asarray(token_probs(logits_of(target, TARGET_CFG, [prompt])[0, -1], *sp), np.float64)
    firsts = np.flatnonzero(p0 > 0)
    rows = np.array([prompt + [int(t)] for t in firsts])
    p1 = np.asarray(token_probs(logits_of(target, TARGET_CFG, rows)[:, -1], *sp), np.float64)
    expected = n * (p0[firsts] @ p1)
    counts = np.bincount(second, minlength=TARGET_CFG.vocab_size)
    assert counts[expected == 0].sum() == 0  # never a token the target cannot sample
    cells = expected >= 5
    rest = ~cells & (expected > 0)
    obs, exp = counts[cells], expected[cells]
    if rest.any():  # the rare tokens pooled into one cell
        obs, exp = np.r_[obs, counts[rest].sum()], np.r_[exp, expected[rest].sum()]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * np.sqrt(2 / (9 * df))) ** 3  # chi2 0.999 quantile (Wilson-Hilferty)
    assert stat < critical, (stat, critical)
    accepted = sum(r.stats.accepted_tokens for r in out)
    assert 0 < accepted < n  # the draft is right sometimes, not always: both branches of the rule ran


def test_sampled_adaptive_drafting_follows_the_target_distribution(target):
    """With drafting stopped by the draft's confidence, the third generated token (its proposal is
    offered or not depending on the draft's state) over 4,000 rows is distributed as under the target
    alone: the exact marginal over the target's own two-step paths, by a chi-square test."""
    from cascade.models.decoder import logits_of
    from cascade.speculative import speculative_generate_batch

    noise = lambda a: a + 0.3 * a.std() * jax.random.normal(jax.random.key(7), a.shape)  # noqa: E731
    draft = jax.tree.map(noise, target)
    prompt = [0, 5, 17, 33]
    s = SamplingConfig(temperature=0.4, top_k=8, seed=5)
    sp = (jnp.float32(0.4), jnp.int32(8), jnp.float32(1.0))
    n = 4000
    out = speculative_generate_batch(draft, TARGET_CFG, target, TARGET_CFG, [prompt] * n, max_new_tokens=3, draft_len=3,
                                     draft_confidence=0.3, sampling=s, eos_ids=())
    third = np.array([r.tokens[2] for r in out])
    p0 = np.asarray(token_probs(logits_of(target, TARGET_CFG, [prompt])[0, -1], *sp), np.float64)
    t1 = np.flatnonzero(p0 > 0)
    p1 = np.asarray(token_probs(logits_of(target, TARGET_CFG, np.array([prompt + [int(a)] for a in t1]))[:, -1], *sp),
                    np.float64)
    paths = [(a, b) for i, a in enumerate(t1) for b in np.flatnonzero(p1[i] > 0)]
    weights = np.array([p0[a] * p1[i, b] for i, a in enumerate(t1) for b in np.flatnonzero(p1[i] > 0)])
    p2 = np.asarray(token_probs(logits_of(target, TARGET_CFG, np.array([prompt + [int(a), int(b)] for a, b in paths]))[:, -1],
                                *sp), np.float64)
    expected = n * (weights @ p2)
    counts = np.bincount(third, minlength=TARGET_CFG.vocab_size)
    assert counts[expected == 0].sum() == 0
    stat, critical = _chi_square(counts, expected)
    assert stat < critical, (stat, critical)
    offered_second = sum(r.stats.offered_at[1] for r in out)
    rounds = sum(r.stats.offered_at[0] for r in out)
    assert 0 < offered_second < rounds  # the confidence stop both cut and allowed a second proposal


def _chi_square(counts, expected):
    """(statistic, 0.999 critical value) of observed ``counts`` against ``expected`` (same total);
    cells expected below 5 are pooled."""
    cells = expected >= 5
    rest = ~cells & (expected > 0)
    obs, exp = counts[cells], expected[cells]
    if rest.any():
        obs, exp = np.r_[obs, counts[rest].sum()], np.r_[exp, expected[rest].sum()]
    df = len(obs) - 1
    return float(((obs - exp) ** 2 / exp).sum()), df * (1 - 2 / (9 * df) + 3.09 * np.sqrt(2 / (9 * df))) ** 3


def test_spec_cascade_greedy_ends_of_the_alpha_range(draft, target):
    """Chow's rule keeps the small model's token where max q >= 1 - alpha: at alpha = 1 it never
    defers (every proposal is the small model's greedy token and is accepted; the large model adds
    the prefill's token and each round's token after the k proposals); at alpha = 0 it defers
    wherever the small model is not certain, which here is everywhere (the large model's output)."""
    from cascade.models.decoder import logits_of

    draft, draft_cfg = draft
    prompt = PROMPTS[0]
    large = generate(target, TARGET_CFG, [prompt], max_new_tokens=30, eos_ids=()).tokens[0]
    never = speculative_generate(draft, draft_cfg, target, TARGET_CFG, prompt, max_new_tokens=30, draft_len=4,
                                 eos_ids=(), rule="chow", alpha=1.0)
    assert never.stats.deferred_tokens == 0 and never.stats.acceptance_rate == 1.0
    text = [prompt + never.tokens]
    small_next = np.argmax(np.asarray(logits_of(draft, draft_cfg, text))[0], axis=-1)
    large_next = np.argmax(np.asarray(logits_of(target, TARGET_CFG, text))[0], axis=-1)
    for i, tok in enumerate(never.tokens):  # token i is predicted at position len(prompt) + i - 1
        by = large_next if i % 5 == 0 else small_next  # i = 0 (prefill), 5, 10, ...: the large model's turn
        assert tok == by[len(prompt) + i - 1], i
    always = speculative_generate(draft, draft_cfg, target, TARGET_CFG, prompt, max_new_tokens=30, draft_len=4,
                                  eos_ids=(), rule="chow", alpha=0.0)
    assert always.stats.deferred_tokens == always.stats.judged_tokens > 0
    assert always.tokens == large and never.tokens != large
    mid = speculative_generate(draft, draft_cfg, target, TARGET_CFG, prompt, max_new_tokens=30, draft_len=4,
                               eos_ids=(), rule="chow", alpha=0.5)
    assert mid.stats.acceptance_rate >= always.stats.acceptance_rate


@pytest.mark.parametrize("rule,alpha", [("diff", 0.02), ("opt", 0.02), ("chow", 0.88)])
def test_sampled_spec_cascade_follows_its_mixture(target, rule, alpha):
    """The second generated token over 4,000 rows is distributed as the stated mixture
    ``sum_t p(t) pi(. | t)``, ``pi = p`` where the rule defers and ``q`` where it does not, computed
    from both models' own logits; and measurably not as the large model alone."""
    from cascade.models.decoder import logits_of
    from cascade.speculative import deferral, speculative_generate_batch

    draft = _peaked(init_params(DRAFT_CFG, jax.random.key(1)), 3.0)
    prompt = [0, 5, 17, 33]
    sp = (jnp.float32(1.0), jnp.int32(12), jnp.float32(1.0))
    n = 4000
    out = speculative_generate_batch(draft, DRAFT_CFG, target, TARGET_CFG, [prompt] * n, max_new_tokens=2, draft_len=2,
                                     sampling=SamplingConfig(temperature=1.0, top_k=12, seed=5), eos_ids=(),
                                     rule=rule, alpha=alpha)
    counts = np.bincount([r.tokens[1] for r in out], minlength=TARGET_CFG.vocab_size)
    p0 = np.asarray(token_probs(logits_of(target, TARGET_CFG, [prompt])[0, -1], *sp), np.float64)
    firsts = np.flatnonzero(p0 > 0)
    rows = np.array([prompt + [int(t)] for t in firsts])
    p1 = token_probs(logits_of(target, TARGET_CFG, rows)[:, -1], *sp)
    q1 = token_probs(logits_of(draft, DRAFT_CFG, rows)[:, -1], *sp)
    r = np.asarray(deferral(q1, p1, rule, alpha))
    mix = np.where(r[:, None], np.asarray(p1, np.float64), np.asarray(q1, np.float64))
    assert 0 < r.sum() < len(r)  # some first tokens defer, some keep the small model
    stat, critical = _chi_square(counts, n * (p0[firsts] @ mix))
    assert stat < critical, (stat, critical)
    stat_p, _ = _chi_square(counts, n * (p0[firsts] @ np.asarray(p1, np.float64)))
    assert stat_p > critical  # the test can tell the mixture from the large model alone
    assert 0 < sum(r.stats.deferred_tokens for r in out) < sum(r.stats.judged_tokens for r in out)


@pytest.mark.parametrize("kv", [None, "int8", "int4-kg8-s2"])
def test_rewind_leaves_the_caches_of_a_fresh_run_on_the_accepted_text(kv):
    """After rounds with rejections, each model's cache (every position it holds as valid) equals the
    cache a fresh prefill of the accepted text builds; a quantized cache is compared dequantized,
    with its full-precision ring."""
    from cascade.models.decoder import prefill
    from cascade.models.kv_cache import KVCache, read_kv
    from cascade.speculative import RoundState, speculative_round

    target = _peaked(init_params(TARGET_CFG, jax.random.key(2)), 3.0)
    draft = _peaked(init_params(DRAFT_CFG, jax.random.key(1)), 3.0)  # disagrees often: rejections
    prompt, k = [0, 5, 17, 33, 2, 9], 3
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, : len(prompt)] = prompt
    lengths = np.array([len(prompt)], np.int32)
    d_cache = KVCache.create(DRAFT_CFG, 1, 64, kv, rewind=k + 1)
    t_cache = KVCache.create(TARGET_CFG, 1, 64, kv, rewind=k + 1)
    _, d_cache = prefill(draft, DRAFT_CFG, tokens, lengths, d_cache)
    logits, t_cache = prefill(target, TARGET_CFG, tokens, lengths, t_cache)
    text = list(prompt)
    state = RoundState(d_cache, t_cache, pending=jnp.argmax(logits, axis=-1).astype(jnp.int32),
                       behind=jnp.full((1,), -1, jnp.int32), key=jax.random.key(0))
    sp = (jnp.float32(0), jnp.int32(0), jnp.float32(1))
    rejected = stopped = 0
    for r in range(8):  # every other round drafts adaptively: it may stop early and accept all it offered
        text.append(int(state.pending[0]))  # the pending token is about to be fed
        decided, state = speculative_round(
            draft, DRAFT_CFG, target, TARGET_CFG, state, jnp.array([True]), sp, jnp.float32(0),
            jnp.float32(0.9 if r % 2 else 0.0), k=k, greedy=True, adaptive=bool(r % 2))
        n = int(decided.n_accepted[0])
        rejected += n < int(decided.n_proposed[0])
        stopped += int(decided.n_proposed[0]) < k
        text += [int(t) for t in np.asarray(decided.proposals[0, :n])]
    assert rejected >= 2 and stopped >= 1
    d_cache, t_cache = state.d_cache, state.t_cache
    committed = int(t_cache.lengths[0])
    assert committed == len(text)
    for cfg, params, cache in ((TARGET_CFG, target, t_cache), (DRAFT_CFG, draft, d_cache)):
        valid = int(cache.lengths[0])  # the draft may be one behind
        fresh = KVCache.create(cfg, 1, 64, kv, rewind=k + 1)
        toks = np.zeros((1, 64), np.int32)
        toks[0, :valid] = text[:valid]
        _, fresh = prefill(params, cfg, toks, np.array([valid], np.int32), fresh)
        for layer in range(cfg.n_layers):
            for name in ("k", "v"):
                got = np.asarray(read_kv(getattr(cache, name)[layer], cfg.n_kv_heads))[0, :valid]
                want = np.asarray(read_kv(getattr(fresh, name)[layer], cfg.n_kv_heads))[0, :valid]
                if kv is None:
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
                else:  # codes of whole groups match; the last, partial group is read from the ring
                    g = cache.spec.key_positions
                    whole = valid // g * g
                    np.testing.assert_allclose(got[:whole], want[:whole], rtol=1e-2, atol=1e-2)
                    ring = np.asarray(getattr(cache, f"{name}_recent")[layer])[0]
                    ring_fresh = np.asarray(getattr(fresh, f"{name}_recent")[layer])[0]
                    # the window a query reads: the last R positions (the k + 1 extra slots absorb rejected writes)
                    window = cache.spec.residual_positions
                    slots = [p % ring.shape[0] for p in range(max(0, valid - window), valid)]
                    np.testing.assert_allclose(ring[slots], ring_fresh[slots], rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def quantized_pair(target):
    """The target at int8 and a noisy copy of it at int4-g16 as the draft (RTN, embeddings kept)."""
    from cascade.models.model import Model
    from cascade.models.quantize import quantize_model

    noise = lambda a: a + 0.4 * a.std() * jax.random.normal(jax.random.key(3), a.shape)  # noqa: E731
    q = lambda params, spec: quantize_model(Model(config=TARGET_CFG, params=params), spec, progress=False)[0].params  # noqa: E731
    return q(jax.tree.map(noise, target), "int4-g16"), q(target, "int8")


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), draft_len=st.sampled_from([1, 3, "auto"]), kv=st.sampled_from([None, "int8"]))
def test_greedy_speculation_of_quantized_models_equals_the_target_alone(quantized_pair, seed, draft_len, kv):
    """Property over seeds: random prompts of different lengths decoded together, an int4 draft and
    an int8 target, fixed and adaptive drafts, fp32 and int8 caches: every row is the int8 target's
    own greedy output with the same cache."""
    from cascade.speculative import speculative_generate_batch

    draft, target = quantized_pair
    rng = np.random.default_rng(seed)
    prompts = [[0] + rng.integers(2, TARGET_CFG.vocab_size, size=n).tolist() for n in rng.choice(15, 3, replace=False)]
    out = speculative_generate_batch(draft, TARGET_CFG, target, TARGET_CFG, prompts, max_new_tokens=24,
                                     draft_len=draft_len, eos_ids=(), draft_kv=kv, target_kv=kv)
    for p, r in zip(prompts, out):
        assert r.tokens == generate(target, TARGET_CFG, [p], max_new_tokens=24, eos_ids=(), kv=kv).tokens[0]
    assert 0 < sum(r.stats.accepted_tokens for r in out) < sum(r.stats.draft_tokens for r in out)


def _second_token_test(target, draft, draft_cfg, n=4000, seed=11):
    """(counts, expected) of the second generated token over ``n`` sampled rows (temperature 1, no
    top-k: every token the target can emit is a cell) against the target's exact marginal."""
    from cascade.models.decoder import logits_of
    from cascade.speculative import speculative_generate_batch

    prompt = [0, 5, 17, 33]
    s = SamplingConfig(temperature=1.0, seed=seed)
    sp = (jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    out = speculative_generate_batch(draft, draft_cfg, target, TARGET_CFG, [prompt] * n, max_new_tokens=2,
                                     draft_len=3, sampling=s, eos_ids=())
    second = np.array([r.tokens[1] for r in out])
    p0 = np.asarray(token_probs(logits_of(target, TARGET_CFG, [prompt])[0, -1], *sp), np.float64)
    p1 = np.asarray(token_probs(logits_of(target, TARGET_CFG, np.array([prompt + [t] for t in range(96)]))[:, -1],
                                *sp), np.float64)
    return np.bincount(second, minlength=96), n * (p0 @ p1), sum(r.stats.accepted_tokens for r in out)


def test_sampled_reduced_vocabulary_draft_follows_the_target_distribution(target, monkeypatch):
    """A draft that proposes only from a subset of the vocabulary is still a valid ``q`` (zero
    elsewhere): the sampled output follows the target's distribution, tokens outside the subset
    included (they come from the residual).  Mutation check: the same draws judged with a ``q``
    computed over the full vocabulary without the subset's mask (every other token given the mean
    logit) must fail the same test."""
    import cascade.speculative as spec
    from cascade.models.sampling import filtered_logits

    draft = _reduced_draft()
    counts, expected, accepted = _second_token_test(target, draft, REDUCED_CFG)
    stat, critical = _chi_square(counts, expected)
    assert stat < critical, (stat, critical)
    outside = np.setdiff1d(np.arange(96), SUBSET)
    assert counts[outside].sum() > 0 and 0 < accepted  # both the residual and acceptance produced tokens

    draw = spec._draw

    def unmasked(logits, key, greedy, sampling, want_q):
        token, _ = draw(logits, key, greedy, sampling, want_q)  # drawn from the subset, as before
        finite = jnp.isfinite(logits)
        mean = jnp.sum(jnp.where(finite, logits, 0.0), -1, keepdims=True) / jnp.sum(finite, -1, keepdims=True)
        return token, jax.nn.softmax(filtered_logits(jnp.where(finite, logits, mean), *sampling), axis=-1)

    monkeypatch.setattr(spec, "_draw", unmasked)
    jax.clear_caches()  # trace the round again with the mutation
    counts, expected, _ = _second_token_test(target, draft, REDUCED_CFG)
    stat, critical = _chi_square(counts, expected)
    jax.clear_caches()
    assert stat > critical, (stat, critical)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0, top_k=20, seed=5)])
@pytest.mark.parametrize("draft_len,rule", [(3, None), ("auto", None), (2, "chow")])
def test_rounds_in_one_device_call_decide_what_one_round_a_call_does(target, sampling, draft_len, rule):
    """speculative_rounds (several rounds per call, each row stopped on the device at its EOS or
    room) against one call per round: the same tokens, stop reasons and counters, rows of different
    lengths stopping at different rounds, in calls of 3 rounds (the default 8 runs in every other
    test of this file).  The reduced-vocabulary draft: the one with the most to get wrong."""
    from cascade.speculative import speculative_generate_batch

    draft, draft_cfg = _reduced_draft(), REDUCED_CFG
    ref = generate(target, TARGET_CFG, [PROMPTS[0]], max_new_tokens=40, eos_ids=()).tokens[0]
    eos = (ref[9],)  # stops some rows early, at different rounds

    def run(per_call):
        out = speculative_generate_batch(draft, draft_cfg, target, TARGET_CFG, PROMPTS, max_new_tokens=23,
                                         draft_len=draft_len, sampling=sampling, eos_ids=eos, rule=rule, alpha=0.2,
                                         rounds_per_call=per_call)
        return [(r.tokens, r.stop_reason, r.stats.to_json()) for r in out]

    one = run(1)
    assert {stop for _, stop, _ in one} == {"eos", "max_tokens"} or sampling.temperature > 0
    assert run(3) == one


def test_room_after_a_round_follows_the_host_rule():
    from cascade.speculative import room_after

    proposals = jnp.asarray([[4, 5, 6], [4, 5, 6], [4, 9, 6], [4, 5, 6], [4, 5, 6]])
    n_acc = jnp.asarray([3, 1, 3, 2, 0])
    token = jnp.asarray([7, 7, 7, 9, 9])
    room = jnp.asarray([10, 10, 10, 2, 0])
    # row 0 emits 4 5 6 7; row 1 emits 4 7; row 2 hits EOS 9 at its second token; row 3 has room for
    # 4 5 only (its 9 is never emitted); row 4 has stopped already
    assert room_after(room, proposals, n_acc, token, jnp.asarray([9])).tolist() == [6, 8, 0, 0, 0]
