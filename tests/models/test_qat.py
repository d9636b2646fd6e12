"""QAT: a few steps lower the quantized model's loss; resuming equals an uninterrupted run; the
result is a real quantized checkpoint that loads and generates; starting points and their notes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade import quant
from cascade.models import load_checkpoint, save_checkpoint
from cascade.models.config import ModelConfig
from cascade.models.llama import init_params
from cascade.models.model import Model
from cascade.models.qat import FakeQuantize, qat, starting_point, teacher_params
from cascade.models.quantize import quantize_model
from cascade.models.training import TrainConfig, lm_loss

CFG = ModelConfig(vocab_size=64, dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  max_seq_len=64, tie_embeddings=True)
RULES = "int2-g16-asym"
TC = TrainConfig(steps=12, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=6, ckpt_every=6, log_every=1)


def _stream(n=4000, seed=0):
    """A learnable stream: a fixed random walk over the vocabulary (next token = token + small step)."""
    rng = np.random.default_rng(seed)
    return (np.cumsum(rng.integers(1, 3, n)) % 64).astype(np.int32)


@pytest.fixture(scope="module")
def start():
    params = init_params(CFG, jax.random.key(0))
    return Model(config=CFG, params=params, source="tiny")


def _quantized_loss(model, tokens):
    from cascade.models.sensitivity import float_params

    return float(lm_loss(float_params(model.params), CFG, jnp.asarray(tokens)))


def test_the_transform_is_the_rtn_round_trip_forward_and_straight_through_backward(start):
    parsed = quant.PrecisionRules.parse(RULES)
    fq = FakeQuantize(parsed)(start.params)
    rtn, _ = quantize_model(start, RULES, scale_dtype="float32", progress=False)
    w = fq["layers_0"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_allclose(w, quant.dequantize(rtn.params["layers_0"]["mlp"]["up_proj"]["kernel"], "float32"),
                               rtol=1e-5, atol=1e-6)
    norm = fq["layers_0"]["attn_norm"]["scale"]  # kept in bf16 by the default rules: a cast
    np.testing.assert_array_equal(norm, np.asarray(start.params["layers_0"]["attn_norm"]["scale"]).astype(jnp.bfloat16).astype(np.float32))
    g = jax.grad(lambda p: jnp.sum(FakeQuantize(parsed)(p)["layers_0"]["attn_norm"]["scale"] * 3.0))(start.params)
    np.testing.assert_array_equal(g["layers_0"]["attn_norm"]["scale"], 3.0)
    assert hash(FakeQuantize(parsed)) == hash(FakeQuantize(quant.PrecisionRules.parse(RULES)))


def test_qat_lowers_the_quantized_loss_and_saves_a_checkpoint_that_generates(start, tmp_path):
    stream = _stream()
    val = _stream(600, seed=1)[: 4 * 17].reshape(4, 17)
    ptq, _ = quantize_model(start, RULES, progress=False)
    before = _quantized_loss(ptq, val)
    model, result, notes = qat(start, TC, stream, str(tmp_path / "run"), rules=RULES, progress=False)
    after = _quantized_loss(model, val)
    assert after < before - 0.1, (before, after)
    assert model.ptq["method"] == "qat" and model.ptq["settings"]["steps_done"] == 12 and notes == []
    leaf = model.params["layers_1"]["attn"]["q_proj"]["kernel"]
    assert isinstance(leaf, quant.QuantizedTensor) and str(leaf.spec) == str(quant.parse_spec(RULES))
    assert os.path.exists(tmp_path / "run" / "loss.csv")
    save_checkpoint(str(tmp_path / "ckpt"), model)
    back = load_checkpoint(str(tmp_path / "ckpt"))
    assert back.ptq["method"] == "qat"
    from cascade.models.generation import generate

    out = generate(back.params, CFG, [[1, 2, 3]], max_new_tokens=5)
    assert 1 <= len(out.tokens[0]) <= 5
    assert out.tokens == generate(model.params, CFG, [[1, 2, 3]], max_new_tokens=5).tokens


@pytest.mark.parametrize("learn_clip", [False, True])
def test_a_resumed_run_equals_an_uninterrupted_one(start, tmp_path, learn_clip):
    stream = _stream()
    kw = {"rules": RULES, "progress": False, "learn_clip": learn_clip}
    whole, r1, _ = qat(start, TC, stream, str(tmp_path / "a"), **kw)
    qat(start, TC, stream, str(tmp_path / "b"), stop_after=6, **kw)
    resumed, r2, _ = qat(start, TC, stream, str(tmp_path / "b"), **kw)
    assert r2.resumed_from == 6 and r2.losses == r1.losses[6:]
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_learned_clipping_is_refused_for_a_rotated_spec(start):
    fq = FakeQuantize(quant.PrecisionRules.parse("w8a8-had"), learn_clip=True)
    with pytest.raises(ValueError, match="learned clipping does not apply to w8a8-had"):
        fq.init_clip(start.params)


def test_learned_clipping_starts_at_the_plain_transform_and_gets_gradients(start):
    parsed = quant.PrecisionRules.parse(RULES)
    fq = FakeQuantize(parsed, learn_clip=True)
    clip = fq.init_clip(start.params)
    assert set(clip) == {"layers_0", "layers_1"}  # the integer matrices only (embeddings and head stay bf16)
    a = clip["layers_0"]["mlp"]["down_proj"]["kernel"]["a"]
    assert a.shape == (48 // 16, 32) and bool((a == 1).all())  # (groups, output columns)
    learned, plain = fq({"weights": start.params, "clip": clip}), FakeQuantize(parsed)(start.params)
    for x, y in zip(jax.tree.leaves(learned), jax.tree.leaves(plain)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    tokens = jnp.asarray(_stream()[: 4 * 17].reshape(4, 17))
    g = jax.grad(lambda p: lm_loss(p, CFG, tokens, transform=fq))({"weights": start.params, "clip": clip})
    for leaf in ("a", "b"):
        assert float(jnp.abs(g["clip"]["layers_1"]["attn"]["o_proj"]["kernel"][leaf]).max()) > 0
    assert float(jnp.abs(g["weights"]["layers_1"]["attn"]["o_proj"]["kernel"]).max()) > 0


def test_qat_with_learned_clipping_saves_what_it_trained(start, tmp_path):
    """The factors move, the loss falls, and the checkpoint's kernels are the transform's forward
    on the trained weights and factors (float32 scales: code for code), not RTN of the weights."""
    stream = _stream()
    val = _stream(600, seed=1)[: 4 * 17].reshape(4, 17)
    before = _quantized_loss(quantize_model(start, RULES, progress=False)[0], val)
    model, result, _ = qat(start, TC, stream, str(tmp_path / "run"), rules=RULES, progress=False,
                           learn_clip=True, clip_rate=10.0, scale_dtype="float32")
    assert _quantized_loss(model, val) < before - 0.1 and model.ptq["settings"]["learn_clip"] is True
    clip = result.params["clip"]
    assert any(bool((f != 1).any()) for f in jax.tree.leaves(clip))
    assert model.ptq["settings"]["clip_rate"] == 10.0
    fq = FakeQuantize(quant.PrecisionRules.parse(RULES), learn_clip=True, clip_rate=10.0)(result.params)
    plain, _ = quantize_model(Model(config=CFG, params=result.params["weights"], source="w"), RULES,
                              scale_dtype="float32", progress=False)
    differs = 0
    for layer in ("layers_0", "layers_1"):
        for block, name in (("attn", "q_proj"), ("attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj")):
            saved = quant.dequantize(model.params[layer][block][name]["kernel"], "float32")
            np.testing.assert_allclose(saved, fq[layer][block][name]["kernel"], rtol=1e-5, atol=1e-6)
            differs += not np.allclose(saved, quant.dequantize(plain.params[layer][block][name]["kernel"], "float32"))
    assert differs > 0


def _kl_to(model, reference, tokens):
    from cascade.models.sensitivity import float_params

    return float(lm_loss(float_params(model.params), CFG, jnp.asarray(tokens), teacher=reference.params))


def test_distillation_pulls_the_quantized_model_toward_its_teacher(start, tmp_path):
    """QAT with the float model as teacher lowers the KL from it (what it trains on), records the
    teacher, and a teacher of another architecture is one clear error."""
    import dataclasses
    import json

    val = _stream(600, seed=1)[: 4 * 17].reshape(4, 17)
    # a random init predicts nearly uniformly; a larger final norm makes its predictions peaked
    params = {**start.params, "final_norm": {"scale": start.params["final_norm"]["scale"] * 30}}
    float_model = dataclasses.replace(start, params=params)
    ptq, _ = quantize_model(float_model, RULES, progress=False)
    before = _kl_to(ptq, float_model, val)
    tc = dataclasses.replace(TC, lr=3e-4)  # the KL's gradients are small: Adam at 3e-3 random-walks
    model, result, _ = qat(ptq, tc, _stream(), str(tmp_path / "run"), progress=False, teacher=float_model)
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert before > 0.005 and _kl_to(model, float_model, val) < 0.85 * before, (before, _kl_to(model, float_model, val))
    assert model.ptq["settings"]["teacher"] == "tiny" and model.ptq["start"]["method"] == "rtn"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["qat"]["teacher"] == "tiny"
    other = dataclasses.replace(start, config=dataclasses.replace(CFG, hidden_dim=64),
                                params=init_params(dataclasses.replace(CFG, hidden_dim=64), jax.random.key(1)))
    with pytest.raises(ValueError, match="not the student's architecture .differs in: hidden_dim"):
        teacher_params(start, other)


def test_starting_points_and_their_notes(start):
    ptq, _ = quantize_model(start, "int4-g16", progress=False)
    params, rules, notes = starting_point(ptq)
    assert rules == quant.PrecisionRules.parse("int4-g16") and "dequantized weights of rtn" in notes[0]
    np.testing.assert_allclose(params["layers_0"]["attn"]["q_proj"]["kernel"],
                               quant.dequantize(ptq.params["layers_0"]["attn"]["q_proj"]["kernel"], "float32"))
    with pytest.raises(ValueError, match="already quantized"):
        starting_point(ptq, "int8")
    gguf_like = Model(config=CFG, params=ptq.params, source="model.gguf", format="gguf")
    _, _, notes = starting_point(gguf_like, "int4-g16")
    assert "stores quantized weights (gguf); dequantized to float32" in notes[0]
    with pytest.raises(ValueError, match="needs precision rules"):
        starting_point(start)


# -- the command line --------------------------------------------------------------------------

import json  # noqa: E402

from cascade import cli  # noqa: E402

from tests.shared_data import DATA  # noqa: E402

BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
VAL = os.path.join(DATA, "text", "tinystories_val.txt")


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "small.txt"
    with open(VAL, encoding="utf-8") as f:
        path.write_text(f.read(60_000))
    return str(path)


def test_the_qat_command_trains_saves_and_resumes(capsys, tmp_path, text):
    out_dir = str(tmp_path / "qat")
    args = ("qat", BIN, "--quant", "int3-g32", "--data", text, "--val", text, "--steps", "4", "--batch-size", "2",
            "--seq-len", "32", "--eval-every", "2", "-o", out_dir, "--json")
    code, out, err = run(capsys, *args)
    assert code == 0, err
    d = json.loads(out)
    assert d["steps"] == 4 and d["resumed_from"] is None and d["val_loss"] > 0 and d["ptq"]["method"] == "qat"
    assert os.path.exists(os.path.join(tmp_path, "qat.run", "loss.csv"))
    code, out, err = run(capsys, "inspect", out_dir, "--json")
    assert code == 0 and json.loads(out)["ptq"]["method"] == "qat"
    # the same command again: refused onto the saved model without --overwrite, resumed with it
    code, _, err = run(capsys, *args)
    assert code == 2 and "--overwrite" in err
    code, out, err = run(capsys, *args, "--overwrite")
    assert code == 0 and json.loads(out)["resumed_from"] == 4
    # a checkpoint keeps its precisions: QAT from it needs no --quant (here with learned clipping)
    code, out, err = run(capsys, "qat", out_dir, "--data", text, "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                         "--learn-clip", "-o", str(tmp_path / "again"), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["notes"] == ["starting from the dequantized weights of qat (int3-g32-full)"]
    assert d["ptq"]["settings"]["learn_clip"] is True
    # distillation: from the float model itself, or a --teacher for a checkpoint
    code, out, err = run(capsys, "qat", out_dir, "--data", text, "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                         "--teacher", BIN, "-o", str(tmp_path / "distilled"), "--json")
    assert code == 0, err
    assert json.loads(out)["ptq"]["settings"]["teacher"] == BIN


@pytest.mark.parametrize("args, code, message", [
    (("--steps", "2"), 2, "QAT needs precision rules: pass --quant"),
    (("--steps", "2", "--quant", "int3-g32", "--seq-len", "4096"), 2, "4096 exceeds the model context (512)"),
    (("--steps", "0", "--quant", "int3-g32"), 2, "0 is not in the range"),
    (("--steps", "2", "--quant", "int3-g32", "--lr", "nan"), 2, "not a finite number"),
    (("--steps", "2", "--quant", "int3-g32", "--clip-rate", "5"), 2, "--clip-rate applies only with --learn-clip"),
    (("--steps", "2", "--quant", "int3-g32", "--teacher", "nope.bin"), 2, "nope.bin: no such file or directory"),
    (("--steps", "2", "--quant", "int3-g32", "--teacher", "default-small"), 2, "is not the student's architecture"),
])
def test_bad_qat_flags_are_one_line_errors(capsys, tmp_path, text, args, code, message):
    got, out, err = run(capsys, "qat", BIN, "--data", text, *args, "-o", str(tmp_path / "out"))
    assert got == code and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")
