"""Perplexity: document splitting, sliding windows, and the score against independent references."""

import math
import os

import jax
import numpy as np
import pytest
import sentencepiece as spm

from cascade.models.config import ModelConfig
from cascade.models.decoder import logits_of
from cascade.models.llama import init_params
from cascade.models.evaluation import perplexity, split_documents, windows_of

from tests.shared_data import DATA  # noqa: E402


def test_split_documents():
    text = "one\ntwo\n<|endoftext|>\n\nthree\n<|endoftext|>\n<|endoftext|>\n"
    assert split_documents(text) == ["one\ntwo", "three"]
    assert split_documents("no separator\nat all\n") == ["no separator\nat all"]
    assert split_documents("a <|endoftext|> inside a line") == ["a <|endoftext|> inside a line"]


@pytest.mark.parametrize("n, ctx, stride", [(10, 4, 2), (10, 4, 4), (11, 4, 3), (4, 4, 1), (3, 8, 8), (100, 16, 5)])
def test_windows_score_every_target_once_with_enough_context(n, ctx, stride):
    ids = list(range(n))
    scored = []
    for w in windows_of(ids, ctx, stride):
        assert len(w.tokens) <= ctx and w.first_scored >= 1
        assert w.tokens.tolist() == list(range(int(w.tokens[0]), int(w.tokens[-1]) + 1))  # contiguous
        start = int(w.tokens[0])
        for j in range(w.first_scored, len(w.tokens)):
            scored.append(start + j)
            assert start == 0 or j >= max(ctx - stride, 1)  # context seen before the target
    assert scored == list(range(1, n))


def test_truncate_scores_only_the_first_window():
    (w,) = windows_of(list(range(10)), 4, 2, truncate=True)
    assert w.tokens.tolist() == [0, 1, 2, 3] and w.first_scored == 1


def test_bad_window_settings():
    with pytest.raises(ValueError, match="stride"):
        windows_of([1, 2, 3], 4, 5)
    with pytest.raises(ValueError, match="ctx"):
        windows_of([1, 2, 3], 1, 1)


def test_perplexity_equals_numpy_sum_over_windows():
    """Batched, bucketed, padded evaluation == a per-window numpy log-softmax sum."""
    cfg = ModelConfig(vocab_size=50, dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      max_seq_len=64)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.RandomState(0)
    docs = [rng.randint(0, 50, n).tolist() for n in (5, 40, 64, 100, 2)]
    result = perplexity(params, cfg, docs, ctx=32, stride=24, batch_tokens=64)
    nll, count = 0.0, 0
    for d in docs:
        for w in windows_of(d, 32, 24):
            logits = np.asarray(logits_of(params, cfg, w.tokens[None]), np.float64)[0]
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
            for j in range(w.first_scored, len(w.tokens)):
                nll -= logp[j - 1, w.tokens[j]]
                count += 1
    assert result.tokens == count == sum(len(d) - 1 for d in docs)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.slow
def test_stories260k_perplexity_matches_numpy_reference_and_readme():
    """First 200 val stories, each BOS + tokens truncated to 512: 3.41 (data README), from both the
    Flax model and the independent float64 numpy forward pass."""
    from cascade.models.loaders.llama2c import load_llama2c
    from cascade.models.evaluation import tokenize_documents
    from tests.models import reference_llama2c as ref

    bin_path = os.path.join(DATA, "stories260K", "stories260K.bin")
    model = load_llama2c(bin_path)
    text = open(os.path.join(DATA, "text", "tinystories_val.txt"), encoding="utf-8").read()
    docs = split_documents(text)[:200]
    ours = perplexity(model.params, model.config, tokenize_documents(model.tokenizer, docs), ctx=512, truncate=True)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(DATA, "stories260K", "tok512.model"))
    w = ref.read_llama2c(bin_path)
    nll, count = 0.0, 0
    for d in docs:
        a, b = ref.nll_sum(w, ([1] + sp.encode(d.strip()))[:512])
        nll += a
        count += b
    assert ours.tokens == count == 67905
    assert ours.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert round(ours.ppl, 2) == 3.41


def test_min_context_scores_only_long_context_targets():
    ids = list(range(100))
    scored = [int(w.tokens[0]) + j for w in windows_of(ids, 16, 4, min_context=12) for j in range(w.first_scored, len(w.tokens))]
    assert scored == list(range(12, 100))
    with pytest.raises(ValueError, match="min_context"):
        windows_of(ids, 16, 4, min_context=16)


def test_perplexity_through_a_cache():
    """An fp32 cache scores what the plain forward scores; an int4 cache a little worse, and
    max_tokens cuts the windows."""
    cfg = ModelConfig(vocab_size=50, dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      max_seq_len=64)
    params = init_params(cfg, jax.random.key(0))
    docs = [np.random.RandomState(1).randint(0, 50, 200).tolist()]
    plain = perplexity(params, cfg, docs, ctx=64, stride=16)
    fp32 = perplexity(params, cfg, docs, ctx=64, stride=16, kv="fp32")
    int4 = perplexity(params, cfg, docs, ctx=64, stride=16, kv="int4-kg8")
    assert fp32.ppl == pytest.approx(plain.ppl, rel=1e-6) and fp32.kv == "fp32" and plain.kv is None
    assert int4.ppl != pytest.approx(plain.ppl, rel=1e-7) and int4.ppl == pytest.approx(plain.ppl, rel=0.05)
    cut = perplexity(params, cfg, docs, ctx=64, stride=16, max_tokens=80)
    assert cut.windows == 3 and cut.tokens == 63 + 16 + 16


def _fidelity_models():
    import jax

    from cascade.models.config import ModelConfig
    from cascade.models.llama import init_params

    cfg = ModelConfig(vocab_size=48, dim=32, hidden_dim=48, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                      max_seq_len=32, tie_embeddings=True)
    a = init_params(cfg, jax.random.key(0))
    b = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), a)
    return cfg, a, b


def test_fidelity_equals_a_float64_computation_over_the_same_windows():
    from cascade.models.evaluation import fidelity, windows_of
    from cascade.models.decoder import logits_of

    cfg, a, b = _fidelity_models()
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, 48, n)) for n in (5, 40, 17)]
    got = fidelity(b, cfg, a, cfg, docs, ctx=16, stride=8, progress=False)
    klds, same, nll, ref_nll = [], 0, 0.0, 0.0
    for ids in docs:
        for w in windows_of(ids, 16, 8):
            lp = np.asarray(logits_of(b, cfg, np.asarray(w.tokens)[None]), np.float64)[0]
            lr = np.asarray(logits_of(a, cfg, np.asarray(w.tokens)[None]), np.float64)[0]
            lp -= np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lp.max(-1, keepdims=True)
            lr -= np.log(np.exp(lr - lr.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lr.max(-1, keepdims=True)
            for t in range(w.first_scored, len(w.tokens)):
                klds.append(float((np.exp(lr[t - 1]) * (lr[t - 1] - lp[t - 1])).sum()))
                same += int(lp[t - 1].argmax() == lr[t - 1].argmax())
                nll -= lp[t - 1, w.tokens[t]]
                ref_nll -= lr[t - 1, w.tokens[t]]
    n = len(klds)
    assert got.tokens == n == sum(len(d) - 1 for d in docs)
    np.testing.assert_allclose(got.kld_mean, np.mean(klds), rtol=1e-3)
    np.testing.assert_allclose(got.kld_p99, np.percentile(klds, 99), rtol=1e-3)
    assert got.top1_agreement == same / n and 0 < got.kld_mean
    np.testing.assert_allclose([got.ppl, got.ref_ppl], np.exp([nll / n, ref_nll / n]), rtol=1e-5)
    np.testing.assert_allclose(got.delta_ppl, got.ppl - got.ref_ppl)
    itself = fidelity(a, cfg, a, cfg, docs, ctx=16, stride=8, progress=False)
    assert itself.kld_max < 1e-6 and itself.top1_agreement == 1.0 and itself.delta_ppl == 0.0


def test_fidelity_needs_a_shared_vocabulary():
    import dataclasses

    from cascade.models.evaluation import fidelity

    cfg, a, _ = _fidelity_models()
    with pytest.raises(ValueError, match="vocabulary of 64 tokens, the model 48"):
        fidelity(a, cfg, a, dataclasses.replace(cfg, vocab_size=64), [[1, 2, 3]])


def test_score_text_is_the_perplexity_or_fidelity_of_the_tokenized_documents(stories260k):
    """`score_text` (what `cascade eval` calls): the same numbers as `perplexity`/`fidelity` on the
    documents tokenized by hand; a model against itself: KL 0, top-1 1; a reference that tokenizes
    otherwise is refused."""
    import dataclasses

    from cascade.models.evaluation import fidelity, score_text, tokenize_documents

    with open(DATA / "text" / "tinystories_val.txt", encoding="utf-8") as f:
        docs = split_documents(f.read(40_000))[:3]
    tokens = tokenize_documents(stories260k.tokenizer, docs)
    cfg = stories260k.config
    score = score_text(stories260k, docs, ctx=64, kv="int8")
    want = perplexity(stories260k.params, cfg, tokens, ctx=64, kv="int8")
    assert score.result == want and score.fidelity is None and score.reference is None
    got = score.to_json()
    assert got["ppl"] == want.ppl and got["kv_bytes"] == score.kv_cache["bytes_per_sequence"] > 0
    assert got["tokens_per_s"] == want.tokens / score.seconds and f"perplexity {want.ppl:.4f}" in score.summary()

    self_score = score_text(stories260k, docs, reference=stories260k, ctx=64)
    fid = fidelity(stories260k.params, cfg, stories260k.params, cfg, tokens, ctx=64)
    assert self_score.fidelity == fid and fid.kld_max < 1e-5 and fid.top1_agreement == 1.0
    assert self_score.reference == stories260k.source and "top-1 agreement 100.00%" in self_score.summary()

    class Shifted:  # the same vocabulary size, other ids
        def __getattr__(self, name):
            return getattr(stories260k.tokenizer, name)

        def encode(self, text, **kwargs):
            return [(t + 1) % cfg.vocab_size for t in stories260k.tokenizer.encode(text, **kwargs)]

    other = dataclasses.replace(stories260k, tokenizer=Shifted())
    with pytest.raises(ValueError, match="does not share MODEL's tokenizer"):
        score_text(stories260k, docs, reference=other)
    with pytest.raises(ValueError, match="no text to score"):
        score_text(stories260k, [])
