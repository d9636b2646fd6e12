"""scripts/train_smollm2_draft.py: its pieces against hand cases, and the whole recipe end to end on
a tiny configuration (teacher default-large, a few steps) whose exported draft then drafts exactly."""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from cascade.models.training import distillation_loss, subset_logits
from tests.shared_data import DATA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_smollm2_draft",
                                                  os.path.join(ROOT, "scripts", "train_smollm2_draft.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_frequent_tokens_hand_case(script):
    stream = np.array([5, 5, 5, 3, 3, 9, 9, 1, 7])
    # 'always' first, then by count (ties by id), n in all, then the -1 row
    assert script.frequent_tokens(stream, 4, always=[7]).tolist() == [7, 5, 3, 9, -1]
    assert script.frequent_tokens(stream, 10).tolist() == [5, 3, 9, 1, 7, -1]


def test_subset_distillation_loss_against_numpy():
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(3, 10)), rng.normal(size=(3, 4))
    vocab_map = np.array([4, 0, 7, -1])
    t = np.asarray(subset_logits(jnp.asarray(teacher, jnp.float32), jnp.asarray(vocab_map)))
    assert np.isneginf(t[:, 3]).all() and np.allclose(t[:, :3], teacher[:, [4, 0, 7]])
    got = float(distillation_loss(jnp.asarray(student, jnp.float32), jnp.asarray(t)))
    p = np.exp(teacher[:, [4, 0, 7]]) / np.exp(teacher[:, [4, 0, 7]]).sum(-1, keepdims=True)  # renormalized on the subset
    log_q = student - np.log(np.exp(student).sum(-1, keepdims=True))
    want = (p * (np.log(p) - log_q[:, :3])).sum(-1).mean()
    assert got == pytest.approx(want, rel=1e-5)


def test_tiny_distillation_end_to_end(script, tmp_path, capsys):
    """The recipe on default-large as the teacher: data, subset, student from the teacher, a few
    distillation steps, the export; the exported draft speaks the teacher's vocabulary and drafts
    for it exactly (greedy speculative output = the teacher's own)."""
    from cascade.models import load_model
    from cascade.models.decoder import logits_of
    from cascade.pair import load_pair, run

    run_dir, out = tmp_path / "run", tmp_path / "out"
    script.main(["--teacher", "default-large", "--data", str(DATA / "text"), "--run-dir", str(run_dir), "--tiny",
                 "--subset", "300", "--generate", "4", "--gen-tokens", "8", "--export", str(out)])
    record = json.loads((run_dir / "training.json").read_text())
    rows = record["subset"]  # at most 300: the tiny stream (answers + as many story tokens) may hold fewer tokens
    assert record["steps"] == 3 and np.isfinite(record["final_train_kl"]) and 10 < rows <= 300
    answers = np.load(run_dir / "generated.npy")  # the teacher's answers: 4 prompts + up to 8 tokens + an end each
    assert 4 * 2 < len(answers) and record["teacher_answers"] == 4
    draft = load_model(str(out / "smollm2-draft"))  # the int4 checkpoint
    assert draft.config.vocab_subset == rows and draft.config.vocab_size == 2048 and draft.config.n_layers == 1
    assert draft.quant and f"the {rows - 1} most frequent tokens" in " ".join((out / "SMOLLM2_DRAFT.md").read_text().split())
    assert json.loads((out / "smollm2-draft-training.json").read_text())["weight_bytes"] > 0
    vm = np.asarray(draft.params["vocab_map"])
    assert vm.dtype == np.int32 and (vm == -1).sum() == 1 and len(set(vm.tolist())) == rows
    logits = np.asarray(logits_of(draft.params, draft.config, [[0, 426, 437]]))
    assert np.isfinite(logits[0, -1]).sum() == rows - 1  # a probability only on the subset's real tokens
    pair = load_pair(str(out / "smollm2-draft"), "default-large", small_quant="none", large_quant="none")
    want = run(pair, "Once upon a time", mode="large", max_new_tokens=24).token_ids
    got = run(pair, "Once upon a time", mode="speculative", max_new_tokens=24, draft_len=3)
    assert got.token_ids == want and got.stats.rounds > 0
