"""Regression tests for issue 38 ("Hardening II") on loading and quantizing models, one test per bug:
a Hugging Face directory without a tokenizer (bug 3), invalid config hyperparameters (bug 4), and
the quantization checks that ran only after the work (bug 13).  Each one failed before its fix."""

import json
import os
import shutil

import numpy as np
import pytest

from tests.shared_data import DATA

BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
TOK = os.path.join(DATA, "stories260K", "tok512.model")
VAL = os.path.join(DATA, "text", "tinystories_val.txt")


from tests.test_cli_hardening import one_error_line, run  # the shared CLI helpers


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random Hugging Face directory without tokenizer files, and one with default-small's."""
    import jax

    from cascade.models.config import ModelConfig
    from cascade.models.defaults import default_model_dir
    from cascade.models.export import save_hf
    from cascade.models.llama import init_params

    d = tmp_path_factory.mktemp("hf38")
    cfg = ModelConfig(vocab_size=2048, dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                      max_seq_len=128, bos_token_id=1, eos_token_ids=(2,))
    params = init_params(cfg, jax.random.key(0))
    small = default_model_dir("default-small")
    return {"bare": save_hf(params, cfg, d / "bare"), "with_tok": save_hf(params, cfg, d / "with_tok", tokenizer_dir=small),
            "small": small}


# ----------------------------------------------------------------------------- bug 3


def test_hf_directory_without_tokenizer_follows_its_own_advice(capsys, tiny_hf, tmp_path):
    """Bug 3: the error said "pass --tokenizer PATH", and passing it said "--tokenizer applies only
    to a llama2.c .bin model": a dead end."""
    from cascade.models.tokenizer import Tokenizer

    code, out, err = run(capsys, "generate", tiny_hf["bare"], "Once", "--max-tokens", "2")
    line = one_error_line(err)
    assert code == 1 and out == "" and "pass --tokenizer PATH" in line and "tokenizer.json" in line
    reference = Tokenizer.from_hf_dir(tiny_hf["small"])  # the tokenizer the flag names, read on its own
    bare_json = tmp_path / "tok.json"  # a tokenizer.json alone, without its tokenizer_config.json
    shutil.copyfile(os.path.join(tiny_hf["small"], "tokenizer.json"), bare_json)
    for tok, want in [(os.path.join(tiny_hf["small"], "tokenizer.json"), reference.encode("Once")),
                      (str(bare_json), reference.encode("Once", add_bos=False)),
                      (TOK, Tokenizer.from_sentencepiece(TOK).encode("Once"))]:
        code, out, err = run(capsys, "generate", tiny_hf["bare"], "Once", "--max-tokens", "2", "--tokenizer", tok, "--json")
        assert code == 0, err
        d = json.loads(out)
        assert d["prompt_token_ids"] == want and len(d["token_ids"]) == 2
    # the same model through the Python API
    from cascade.models import load_model

    assert load_model(tiny_hf["bare"]).tokenizer is None
    assert load_model(tiny_hf["bare"], tokenizer=TOK).tokenizer.encode("Once") == want


def test_tokenizer_flag_for_a_model_with_its_own_names_what_takes_it(capsys, tiny_hf):
    code, out, err = run(capsys, "generate", tiny_hf["with_tok"], "Once", "--tokenizer", TOK)
    line = one_error_line(err)
    assert code == 2 and "without a tokenizer of its own" in line and "Hugging Face directory without tokenizer files" in line
    code, out, err = run(capsys, "generate", tiny_hf["bare"], "Once", "--tokenizer", VAL)  # a text file is no tokenizer
    assert code == 1 and "SentencePiece .model" in one_error_line(err)


# ----------------------------------------------------------------------------- bug 4

BAD_CONFIG = [
    ("rms_norm_eps", float("nan")), ("rms_norm_eps", -1e-5), ("rms_norm_eps", 0), ("rope_theta", float("inf")),
    ("rope_theta", -10000.0), ("num_attention_heads", 0), ("num_key_value_heads", -1), ("vocab_size", -5),
    ("hidden_size", 32.5), ("intermediate_size", 0), ("num_hidden_layers", True), ("max_position_embeddings", 0),
    ("head_dim", 15), ("bos_token_id", 99999), ("eos_token_id", -1), ("tie_word_embeddings", "yes"),
    ("rope_scaling", {"rope_type": "linear", "factor": float("nan")}),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}),
]


def _bad_copy(src, tmp_path, key, value):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, key: value}))  # json writes NaN/Infinity as Python reads them
    return str(bad)


@pytest.mark.parametrize("key,value", BAD_CONFIG, ids=[f"{k}={v}" for k, v in BAD_CONFIG])
def test_invalid_config_values_are_refused_in_one_line(capsys, tiny_hf, tmp_path, key, value):
    """Bug 4: rms_norm_eps = NaN gave "perplexity nan" (exit 0) and garbage text; every value is checked."""
    bad = _bad_copy(tiny_hf["with_tok"], tmp_path, key, value)
    for args in (("eval", bad, "--data", VAL, "--limit", "1", "--ctx", "32", "--json"),
                 ("generate", bad, "Once", "--max-tokens", "2")):
        code, out, err = run(capsys, *args)
        line = one_error_line(err)
        assert code in (1, 2) and out == ""
        assert "config.json" in line and key in line, line
    from cascade.models import load_model

    with pytest.raises(ValueError, match=key):
        load_model(bad)


def test_the_named_value_is_the_bad_one(capsys, tiny_hf, tmp_path):
    bad = _bad_copy(tiny_hf["with_tok"], tmp_path, "rms_norm_eps", float("nan"))
    code, _, err = run(capsys, "inspect", bad)
    assert code == 1 and "rms_norm_eps = nan" in one_error_line(err) and "finite" in err


# ----------------------------------------------------------------------------- bug 13


@pytest.fixture
def no_work(monkeypatch):
    """Any loading of weights or calibration fails the test: the refusal must come before them."""
    import cascade.models
    import cascade.models.calibration

    def forbidden(*a, **k):
        pytest.fail("the work started before the request was refused")

    monkeypatch.setattr(cascade.models, "load_model", forbidden)
    monkeypatch.setattr(cascade.models.calibration, "calibration_tokens", forbidden)


@pytest.mark.parametrize("args,message", [
    (("--method", "awq", "--quant", "int8-tensor", "--calib", VAL),
     "awq does not support per-tensor specs (int8-tensor, for layers_0/attn/q_proj/kernel)"),
    (("--method", "gptq", "--quant", "q_proj=w8a8-had,*=int8", "--calib", VAL),
     "gptq cannot produce w8a8-had weights"),
    (("--method", "smoothquant", "--quant", "mlp=int8-tensor,*=w8a8", "--calib", VAL), "smoothquant does not support per-tensor"),
    (("--quant", "atn=int8,*=int4"), "precision rule 'atn=int8' does nothing"),
    (("--method", "gptq", "--quant", "auto", "--avg-bits", "5", "--candidates", "int8,w8a8-had", "--calib", VAL),
     "gptq cannot produce w8a8-had weights"),
])
def test_method_and_spec_checks_come_before_any_work(capsys, no_work, args, message):
    """Bug 13: `--method awq --quant int8-tensor` failed only after loading and calibrating."""
    code, out, err = run(capsys, "quantize", BIN, *args)
    assert code == 2 and out == "" and message in one_error_line(err)


def test_gptq_makes_w8a8(capsys):
    """Bug 13: `--method gptq --quant w8a8` failed after calibrating ("int8 activations (w8a8) go with
    int8 per-channel symmetric min-max weights only"), though w8a8 weights are exactly that."""
    code, out, err = run(capsys, "quantize", BIN, "--method", "gptq", "--quant", "w8a8", "--calib", VAL,
                         "--calib-samples", "32", "--calib-len", "16", "--json")
    assert code == 0, err
    d = json.loads(out)
    kernels = [r for r in d["layers"] if r["path"].endswith("/kernel")]
    assert d["ptq"]["method"] == "gptq" and kernels and all(r["spec"] == "w8a8" for r in kernels)
    assert all(0 < r["rel_error"] < 0.05 for r in kernels)  # int8 per channel: well under 5%


def test_a_rule_that_matches_nothing_is_refused_wherever_rules_meet_a_model(capsys, tmp_path):
    """Bug 13: `--quant "atn=int8,*=int4"` (a typo) quantized attention as int4, silently."""
    for args in (("quantize", BIN, "--quant", "atn=int8,*=int4"), ("generate", BIN, "Once", "--quant", "atn=int8,*=int4"),
                 ("eval", BIN, "--data", VAL, "--quant", "attn=int8,attn/q_proj=int4,*=int4"),
                 ("qat", BIN, "--quant", "norm=int8,*=int4", "--data", VAL, "--steps", "1", "-o", str(tmp_path / "q"))):
        code, out, err = run(capsys, *args)
        line = one_error_line(err)
        assert code == 2 and out == "" and "does nothing" in line and "REGEX=SPEC" in line
    assert os.listdir(tmp_path) == []  # QAT refused before training: nothing written
    code, out, err = run(capsys, "quantize", BIN, "--quant", "attn=int8,*=int4", "--json")  # the typo fixed
    assert code == 0 and json.loads(out)["quant"] == "attn=int8,*=int4-full"


def test_integer_weights_in_safetensors_are_refused(capsys, tiny_hf, tmp_path):
    """Bug 13: an int32 tensor in model.safetensors was loaded and used as integer weights."""
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "int"
    shutil.copytree(tiny_hf["with_tok"], bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = np.round(tensors[name] * 100).astype(np.int32)
    save_file(tensors, bad / "model.safetensors")
    code, out, err = run(capsys, "generate", str(bad), "Once", "--max-tokens", "2")
    line = one_error_line(err)
    assert code == 1 and "layers_0/attn/q_proj/kernel" in line and "int32" in line and "floating point" in line



# ----------------------------------------------------------------------------- the same rules in every command


def test_compare_takes_tokenizer_for_a_model_without_one(capsys, tiny_hf, tmp_path):
    """`compare` kept the old rule ("--tokenizer applies only to a llama2.c .bin model"), so a Hugging
    Face directory without tokenizer files could not be compared at all."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once\n")
    tok = os.path.join(tiny_hf["small"], "tokenizer.json")
    code, out, err = run(capsys, "compare", tiny_hf["bare"], tiny_hf["bare"], "--prompts", str(prompts),
                         "--max-tokens", "2", "--tokenizer", tok, "--json")
    assert code == 0, err
    row = json.loads(out)["prompts"][0]
    assert row["a_token_ids"] == row["b_token_ids"] and len(row["a_token_ids"]) == 2
    code, out, err = run(capsys, "compare", tiny_hf["with_tok"], tiny_hf["with_tok"], "--prompts", str(prompts),
                         "--tokenizer", tok)
    assert code == 2 and "without a tokenizer of its own" in one_error_line(err)


def test_pair_rules_that_decide_nothing_are_refused_before_loading(capsys, monkeypatch):
    """`run --small "atn=int8,*=int4"` failed with exit 1 after loading the pair; `plan` did not check."""
    import cascade.pair

    def no_load(*a, **k):
        raise AssertionError("the pair was loaded before the rules were checked")

    monkeypatch.setattr(cascade.pair, "load_pair", no_load)
    for command in (["run", "Once", "--max-tokens", "2"], ["plan"]):
        code, out, err = run(capsys, *command, "--small", "atn=int8,*=int4")
        line = one_error_line(err)
        assert code == 2 and out == "" and "--small" in line and "atn" in line
        code, out, err = run(capsys, *command, "--large", "lm_head=int4,*=int8")  # default-large ties its head
        assert code == 2 and "lm_head" in one_error_line(err)


@pytest.mark.parametrize("command", [["quantize", "default-small", "--quant", "int4", "--method", "gptq"],
                                     ["sensitivity", "default-small"]])
def test_calibration_text_is_checked_before_loading(capsys, monkeypatch, tmp_path, command):
    """An empty or binary --calib failed with exit 1 only after the model loaded."""
    import cascade.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --calib was read")

    monkeypatch.setattr(cascade.models, "load_model", no_load)
    empty, binary = tmp_path / "empty.txt", tmp_path / "bin.txt"
    empty.write_text("\n<|endoftext|>\n  \n")
    binary.write_bytes(b"\xff\xfe\x00\x81" * 64)
    for path, words in ((empty, "holds no documents"), (binary, "not UTF-8")):
        code, out, err = run(capsys, *command, "--calib", str(path))
        line = one_error_line(err)
        assert code == 2 and "--calib" in line and words in line
