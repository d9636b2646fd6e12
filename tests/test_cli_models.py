"""The model commands (eval, generate, quantize -o, inspect) end to end on stories260K and a tiny HF model."""

import json
import os

import pytest

from cascade import cli

from tests.shared_data import DATA  # noqa: E402
BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
GGUF = os.path.join(DATA, "stories260K", "stories260K.gguf")
VAL = os.path.join(DATA, "text", "tinystories_val.txt")


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_is_the_greedy_story(capsys):
    code, out, _ = run(capsys, "generate", BIN, "Once upon a time", "--max-tokens", "12", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["text"].startswith(", there was a little girl named Lily")
    assert len(d["token_ids"]) == 12 and d["stop_reason"] == "max_tokens" and d["tokens_per_s"] > 0
    assert d["matmul_backends"] == {}  # float weights: no quantized matmul


def test_generate_json_says_which_backend_ran(capsys, monkeypatch):
    code, out, _ = run(capsys, "generate", BIN, "Once upon a time", "--max-tokens", "4", "--quant", "int4-g32", "--json")
    assert code == 0 and json.loads(out)["matmul_backends"] == {"cpu": 7 * 5}  # 5 layers x (q, k, v, o, gate, up, down)
    assert json.loads(out)["attention_backend"] == "cpu"  # the native KV-cache attention kernel
    monkeypatch.setenv("CASCADE_MATMUL_BACKEND", "xla")
    monkeypatch.setenv("CASCADE_ATTENTION_BACKEND", "xla")
    code, out, _ = run(capsys, "generate", BIN, "Once upon a time", "--max-tokens", "4", "--quant", "int4-g32", "--json")
    assert code == 0 and json.loads(out)["matmul_backends"] == {"xla": 7 * 5}
    assert json.loads(out)["attention_backend"] == "xla"


def test_generate_sampling_is_seeded(capsys):
    args = ("generate", GGUF, "Once upon a time", "--max-tokens", "16", "--temperature", "1.0", "--top-p", "0.9", "--json")
    a = json.loads(run(capsys, *args, "--seed", "1")[1])
    b = json.loads(run(capsys, *args, "--seed", "1")[1])
    c = json.loads(run(capsys, *args, "--seed", "2")[1])
    assert a["token_ids"] == b["token_ids"] != c["token_ids"]


def test_quantize_save_then_eval_and_inspect_the_checkpoint(capsys, tmp_path):
    out_dir = str(tmp_path / "q8")
    code, out, _ = run(capsys, "quantize", BIN, "--quant", "int8", "-o", out_dir, "--json")
    assert code == 0 and json.loads(out)["bytes_after"] < json.loads(out)["bytes_before"]
    code, out, _ = run(capsys, "quantize", BIN, "--quant", "int8", "-o", out_dir)
    assert code == 2  # exists, no --overwrite: refused before quantizing
    evals = {}
    for name, model, extra in (("fp", BIN, ()), ("saved", out_dir, ()), ("flag", BIN, ("--quant", "int8"))):
        code, out, _ = run(capsys, "eval", model, "--data", VAL, "--limit", "5", "--json", *extra)
        assert code == 0
        evals[name] = json.loads(out)
    assert evals["saved"]["ppl"] == evals["flag"]["ppl"]  # the checkpoint is the quantized model, bit for bit
    assert evals["saved"]["weight_bytes"] == evals["flag"]["weight_bytes"] < evals["fp"]["weight_bytes"]
    assert evals["fp"]["tokens"] == evals["saved"]["tokens"] > 0
    code, out, _ = run(capsys, "inspect", out_dir, "--json")
    info = json.loads(out)
    assert info["format"] == "checkpoint" and info["quant"] == "int8"
    prec = {t["name"]: t["precision"] for t in info["tensors"]}
    assert prec["layers_0/mlp/up_proj/kernel"] == "int8" and prec["embed/embedding"] == "bfloat16"
    matmul = {t["name"]: t["matmul"] for t in info["tensors"]}
    assert matmul["layers_0/mlp/up_proj/kernel"] == "cpu" and matmul["embed/embedding"] is None
    assert info["matmul_backends"] == {"cpu": 7 * 5}
    code, out, err = run(capsys, "inspect", out_dir)
    assert "quantized matmuls (decode): 35 on cpu" in out + err


TRAIN = os.path.join(DATA, "text", "tinystories_train_00.txt")


def test_quantize_picks_the_method_and_says_which_and_the_grid(capsys, tmp_path):
    """Without --calib: rtn on the full grid; with it: awq-gptq on -mse ranges (the measured best),
    named in the text output and the JSON; a named method is used as given."""
    calib = ("--calib", TRAIN, "--calib-samples", "32", "--calib-len", "64")
    code, out, _ = run(capsys, "quantize", BIN, "--quant", "attn=int8,*=int3-g32", "--json")
    d = json.loads(out)
    assert code == 0 and (d["method"], d["method_default"], d["quant"]) == ("rtn", True, "attn=int8,*=int3-g32-full")
    code, out, _ = run(capsys, "quantize", BIN, "--quant", "int3-g32", *calib, "-o", str(tmp_path / "q"), "--json")
    d = json.loads(out)
    assert code == 0 and (d["method"], d["method_default"], d["quant"]) == ("awq-gptq", True, "int3-g32-full-mse")
    assert "the default with calibration text" in d["ptq"]["default"]
    code, out, _ = run(capsys, "inspect", str(tmp_path / "q"), "--json")
    info = json.loads(out)
    assert info["quant"] == "int3-g32-full-mse" and info["ptq"]["method"] == "awq-gptq"
    code, out, err = run(capsys, "quantize", BIN, "--quant", "int3-g32-narrow", *calib, "--method", "gptq")
    assert code == 0 and "precision rules: int3-g32-narrow\n" in err and "quantized with: gptq (" in err
    assert "[the default" not in err
    code, out, err = run(capsys, "quantize", BIN, "--quant", "int4", *calib)
    assert code == 0 and "precision rules: int4-full-mse\n" in err and "[the default with calibration text" in err
    code, out, err = run(capsys, "quantize", BIN, "--quant", "int4", "--damp", "0.1", *calib)
    assert code == 2 and "--damp" in err and "name one with --method" in err


@pytest.mark.parametrize("args, match", [
    (("eval", BIN, "--data", VAL, "--ctx", "4096"), "exceeds the model context"),
    (("eval", "/nonexistent/model", "--data", VAL), "no such file"),
    (("generate", BIN, "x " * 600, "--max-tokens", "5"), "context"),
    (("eval", BIN, "--data", VAL, "--quant", "int9"), "int9"),
    (("generate", BIN, "hi", "--temperature", "-1"), "temperature"),
])
def test_model_command_errors_are_one_line(capsys, args, match):
    code, out, err = run(capsys, *args)
    assert code in (1, 2) and out == "" and err.count("\n") == 1 and match in err


def test_corrupt_checkpoint_is_one_line_error(capsys, tmp_path):
    out_dir = tmp_path / "q"
    assert run(capsys, "quantize", BIN, "--quant", "int4-g32", "-o", str(out_dir))[0] == 0
    biggest = max((p for p in out_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    code, out, err = run(capsys, "eval", str(out_dir), "--data", VAL, "--limit", "1")
    assert code == 1 and out == "" and err.count("\n") == 1 and str(out_dir) in err


def test_generate_keeps_the_space_after_a_one_word_prompt(capsys):
    code, out, _ = run(capsys, "generate", BIN, "Once", "--max-tokens", "3", "--json")
    assert code == 0 and json.loads(out)["text"].startswith(" upon")


@pytest.fixture(scope="module")
def hf_chat_dir(tmp_path_factory):
    """A tiny random HF Llama with stories260K's SentencePiece tokenizer and a chat template that writes BOS."""
    import shutil

    from tests.models.hf_fixtures import make_hf_model

    d = tmp_path_factory.mktemp("chat")
    make_hf_model("llama3", d, vocab_size=512)
    shutil.copy(os.path.join(DATA, "stories260K", "tok512.model"), d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return d


def test_chat_prompt_gets_one_bos(capsys, hf_chat_dir):
    code, out, _ = run(capsys, "generate", str(hf_chat_dir), "Hello", "--chat", "--max-tokens", "2", "--json")
    assert code == 0
    ids = json.loads(out)["prompt_token_ids"]
    assert ids[0] == 1 and ids[1] != 1
    code, out, _ = run(capsys, "generate", str(hf_chat_dir), "Hello", "--max-tokens", "2", "--json")
    assert json.loads(out)["prompt_token_ids"][0] == 1  # plain prompt: the tokenizer's add_bos


def test_hf_directory_eval_and_bad_config(capsys, hf_chat_dir, tmp_path):
    code, out, _ = run(capsys, "eval", str(hf_chat_dir), "--data", VAL, "--limit", "2", "--ctx", "64", "--json")
    d = json.loads(out)
    assert code == 0 and d["ctx"] == 64 and d["stride"] == 32 and d["ppl"] > 1
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_chat_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": None}))
    code, out, err = run(capsys, "inspect", str(bad))
    assert code == 1 and out == "" and err.count("\n") == 1 and "config.json: bad value in config" in err


def test_eval_reference_reports_kl_divergence_top1_and_delta_ppl(capsys, tmp_path):
    base = ("eval", BIN, "--data", VAL, "--limit", "8", "--json")
    code, out, err = run(capsys, *base, "--quant", "int3-g32", "--reference")
    assert code == 0, err
    d = json.loads(out)
    f = d["fidelity"]
    assert d["reference"] == BIN and d["ppl"] == f["ppl"] and f["tokens"] == d["tokens"]
    float_ppl = json.loads(run(capsys, *base)[1])["ppl"]
    assert abs(f["ref_ppl"] - float_ppl) < 1e-6 * float_ppl  # the reference is the unquantized model
    assert abs(f["delta_ppl"] - (d["ppl"] - float_ppl)) < 1e-4
    assert 0 < f["kld_mean"] < f["kld_p99"] <= f["kld_max"] and 0.3 < f["top1_agreement"] < 1
    # int8 stays much closer to the source than int3
    g = json.loads(run(capsys, *base, "--quant", "int8", "--reference", BIN)[1])["fidelity"]
    assert g["kld_mean"] < f["kld_mean"] / 10 and g["top1_agreement"] > f["top1_agreement"]
    # a checkpoint made by `cascade quantize` finds its source by itself
    ck = str(tmp_path / "ck")
    assert run(capsys, "quantize", BIN, "--quant", "int8", "-o", ck)[0] == 0
    h = json.loads(run(capsys, "eval", ck, "--data", VAL, "--limit", "8", "--json", "--reference")[1])
    assert h["reference"] == BIN and abs(h["fidelity"]["kld_mean"] - g["kld_mean"]) < 1e-6
    code, _, err = run(capsys, "eval", BIN, "--data", VAL, "--reference")
    assert code == 2 and "--reference without a value needs --quant" in err
    code, _, err = run(capsys, "eval", BIN, "--data", VAL, "--quant", "int8", "--reference", "--kv", "int8")
    assert code == 2 and "drop --kv" in err


def test_compare_shows_the_first_diverging_token(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n\nThe little dog\n")
    ck = str(tmp_path / "int3")
    assert run(capsys, "quantize", BIN, "--quant", "int3-g32", "-o", ck)[0] == 0
    code, out, err = run(capsys, "compare", BIN, BIN, "--prompts", str(prompts), "--max-tokens", "12", "--json")
    assert code == 0, err
    same = json.loads(out)
    assert same["identical"] == 2 and all(r["first_divergence"] is None for r in same["prompts"])
    code, out, err = run(capsys, "compare", BIN, ck, "--prompts", str(prompts), "--max-tokens", "24", "--json")
    d = json.loads(out)
    assert code == 0 and d["b_quant"] == "int3-g32-full" and len(d["prompts"]) == 2
    for r in d["prompts"]:
        at = r["first_divergence"]
        if at is not None:
            assert r["a_token_ids"][:at] == r["b_token_ids"][:at] and r["a_token_ids"][at] != r["b_token_ids"][at]
            assert r["a"].startswith(r["a"][:1]) and all(t is not None for t in r["diverging_tokens"])
    assert d["identical"] < 2  # int3 RTN changes stories260K's greedy text
    code, _, err = run(capsys, "compare", BIN, ck, "--prompts", str(prompts))
    assert code == 0 and "prompts identical over 32 greedy tokens" in err and "diverge at token" in err
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    code, _, err = run(capsys, "compare", BIN, ck, "--prompts", str(empty))
    assert code == 2 and "no prompts" in err  # a usage error, as in `run --prompts` (tests/test_cli_run.py)
