"""The training loop and the tokenizer trainer: loss goes down, resuming is exact, logs are written."""

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade.models.config import ModelConfig
from cascade.models.decoder import logits_of
from cascade.models.llama import init_params
from cascade.models.tokenizer import Tokenizer
from cascade.models.training import (EOT, TrainConfig, distillation_loss, eval_batches, lm_loss, load_trained, make_optimizer, sample_batch,
                             save_hf_tokenizer, token_stream, train, train_tokenizer)

CFG = ModelConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                  max_seq_len=64, tie_embeddings=True, bos_token_id=0, eos_token_ids=(0,))
TC = TrainConfig(steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=6, ckpt_every=4, log_every=1,
                 eval_batches=2)
# a learnable stream: a repeating pattern with a little noise
_rng = np.random.default_rng(0)
STREAM = np.where(_rng.random(4000) < 0.1, _rng.integers(0, 64, 4000), np.arange(4000) % 17).astype(np.int32)

DOCS = ["Once upon a time, there was a little cat named Tom.\nTom liked to play.",
        "Lily saw a big red ball. \"Can I play?\" she asked.", "The end. Héllo wörld 🙂  two  spaces\tand a tab."] * 20


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("run-a")
    return run, train(CFG, TC, STREAM, run, val_tokens=STREAM[:1000], progress=False)


def test_loss_decreases(uninterrupted):
    _, r = uninterrupted
    assert r.step == TC.steps and len(r.losses) == TC.steps
    assert np.mean(r.losses[-3:]) < r.losses[0] - 1.0, r.losses
    assert r.val_loss < r.losses[0] - 1.0


def test_resume_continues_exactly(uninterrupted, tmp_path):
    run_a, a = uninterrupted
    first = train(CFG, TC, STREAM, tmp_path, val_tokens=STREAM[:1000], progress=False, stop_after=8)
    assert first.step == 8 and first.resumed_from is None
    second = train(CFG, TC, STREAM, tmp_path, val_tokens=STREAM[:1000], progress=False)
    assert second.resumed_from == 8 and second.step == TC.steps
    np.testing.assert_allclose(first.losses + second.losses, a.losses, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(second.params), jax.tree.leaves(a.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    cfg, params, step = load_trained(tmp_path)
    assert cfg == CFG and step == TC.steps
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(second.params)))


def test_resume_drops_log_rows_past_the_checkpoint(tmp_path):
    train(CFG, TC, STREAM, tmp_path, progress=False, stop_after=6)  # checkpoint at 4 and 6
    # pretend the process died after logging step 7-9 but before a checkpoint
    with open(tmp_path / "loss.csv", "a", newline="") as f:
        f.write("7,0,0,9,0,,0\n8,0,0,9,0,,0\n")
    train(CFG, TC, STREAM, tmp_path, progress=False)
    with open(tmp_path / "loss.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(1, TC.steps + 1))
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_logs_and_validation_rows(uninterrupted):
    run, r = uninterrupted
    with open(run / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(x["step"]) for x in rows] == list(range(1, 13))
    assert [int(x["step"]) for x in rows if x["val_loss"]] == [6, 12]
    assert float(rows[-1]["val_loss"]) == pytest.approx(r.val_loss)
    assert int(rows[-1]["tokens"]) == 12 * TC.batch_size * TC.seq_len
    with open(run / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_different_config_in_the_same_run_dir_is_refused(uninterrupted):
    run, _ = uninterrupted
    with pytest.raises(ValueError, match="different model or training config"):
        train(CFG, TrainConfig(**{**TC.to_dict(), "lr": 1e-3}), STREAM, run, progress=False)


def test_lm_loss_is_the_mean_next_token_cross_entropy():
    params = init_params(CFG, jax.random.key(3))
    tokens = STREAM[:66].reshape(2, 33)
    logits = np.asarray(logits_of(params, CFG, tokens[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ref = -np.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    assert float(lm_loss(params, CFG, jnp.asarray(tokens))) == pytest.approx(ref, rel=1e-5)
    bf16 = float(lm_loss(params, CFG, jnp.asarray(tokens), jnp.bfloat16))
    assert bf16 == pytest.approx(ref, rel=2e-2)


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_the_distillation_loss_is_kl_from_the_teacher_and_trains_only_the_student():
    student, teacher = init_params(CFG, jax.random.key(3)), init_params(CFG, jax.random.key(4))
    tokens = STREAM[:66].reshape(2, 33)
    log_q = _log_softmax64(logits_of(student, CFG, tokens[:, :-1]))
    log_p = _log_softmax64(logits_of(teacher, CFG, tokens[:, :-1]))
    ref = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()  # KL(teacher || student), averaged over positions
    assert ref > 0.01
    got = float(lm_loss(student, CFG, jnp.asarray(tokens), teacher=teacher))
    assert got == pytest.approx(ref, rel=1e-4)
    assert float(lm_loss(teacher, CFG, jnp.asarray(tokens), teacher=teacher)) == pytest.approx(0, abs=1e-6)
    # a hand case: uniform teacher over 2 classes, student (log 3, 0) -> KL = log 2 - 1/2 log 3 + log 4 - log 3 ...
    s, t = jnp.array([[np.log(3.0), 0.0]]), jnp.zeros((1, 2))
    assert float(distillation_loss(s, t)) == pytest.approx(0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25), rel=1e-6)
    g = jax.grad(lambda t: lm_loss(student, CFG, jnp.asarray(tokens), teacher=t))(teacher)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g))  # no gradient into the teacher


def test_weight_decay_spares_norms():
    params = init_params(CFG, jax.random.key(3))
    opt = make_optimizer(TrainConfig(steps=10, warmup_steps=0, weight_decay=0.5, lr=0.1))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    assert float(jnp.abs(updates["final_norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["layers_0"]["attn"]["q_proj"]["kernel"]).max()) > 0.0


def test_batches_are_a_function_of_seed_and_step():
    a, b = sample_batch(STREAM, 5, 4, 32, 0), sample_batch(STREAM, 5, 4, 32, 0)
    assert a.shape == (4, 33) and np.array_equal(a, b)
    assert not np.array_equal(a, sample_batch(STREAM, 6, 4, 32, 0))
    v = eval_batches(STREAM, 3, 4, 32)
    assert [x.shape for x in v] == [(4, 33)] * 3 and np.array_equal(v[0][1], STREAM[32:65])
    with pytest.raises(ValueError, match="too short for one sequence"):
        sample_batch(STREAM[:20], 0, 1, 32, 0)


def test_bad_train_config():
    with pytest.raises(ValueError, match="compute_dtype"):
        TrainConfig(steps=1, compute_dtype="float16")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    tok = train_tokenizer(DOCS, vocab_size=300)
    d = tmp_path_factory.mktemp("tok")
    save_hf_tokenizer(tok, d)
    return tok, d


def test_byte_level_bpe_round_trips_any_text(bpe):
    tok, d = bpe
    assert tok.get_vocab_size() == 300 and tok.token_to_id(EOT) == 0
    ours = Tokenizer.from_hf_dir(d)
    assert ours.bos_id == 0 and ours.eos_ids == (0,) and ours.add_bos
    for text in DOCS[:3] + ["never seen: ∑ ∫ 日本語 \u00a0 \r\n"]:
        ids = ours.encode(text)
        assert ids[0] == 0 and ours.decode(ids) == text


def test_transformers_reads_the_saved_tokenizer_the_same_way(bpe):
    from transformers import AutoTokenizer

    _, d = bpe
    hf = AutoTokenizer.from_pretrained(str(d))
    ours = Tokenizer.from_hf_dir(d)
    for text in DOCS[:3]:
        assert hf(text)["input_ids"] == ours.encode(text)
    assert hf.bos_token == hf.eos_token == EOT


def test_token_stream_separates_documents_with_eot(bpe):
    tok, _ = bpe
    s = token_stream(tok, DOCS[:2])
    eot_at = np.flatnonzero(s == 0)
    assert eot_at[0] == 0 and eot_at[-1] == len(s) - 1 and len(eot_at) == 3
    assert tok.decode(s[1:eot_at[1]].tolist()) == DOCS[0]


def test_elapsed_time_accumulates_over_resumes(tmp_path):
    from cascade.models.training import read_loss_log, training_seconds

    train(CFG, TC, STREAM, tmp_path, progress=False, stop_after=4)
    before = training_seconds(read_loss_log(tmp_path / "loss.csv"))
    train(CFG, TC, STREAM, tmp_path, progress=False)
    elapsed = [float(r["elapsed_s"]) for r in read_loss_log(tmp_path / "loss.csv")]
    assert elapsed == sorted(elapsed) and elapsed[-1] > before > 0
    assert training_seconds([{"elapsed_s": v} for v in (1, 2, 3, 1, 4)]) == 7  # restarts are summed
