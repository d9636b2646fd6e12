"""`cascade export --format gguf`: quantize and export in one command, and the exported file is a
MODEL that gives the same tokens and the same perplexity as the checkpoint it came from."""

import json
import os

import pytest

from cascade import cli
from cascade.models.export_gguf import exact_type
from cascade.quant import parse_spec
from tests.shared_data import DATA

VAL = os.path.join(DATA, "text", "tinystories_val.txt")


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_checkpoint_and_its_gguf_export_give_the_same_tokens_and_perplexity(capsys, tmp_path):
    ckpt, gguf_file = str(tmp_path / "q4"), str(tmp_path / "q4.gguf")
    assert run(capsys, "quantize", "default-small", "--quant", "embed=int8-g32,*=int4-g32-asym", "-o", ckpt)[0] == 0
    code, out, _ = run(capsys, "export", ckpt, "-o", gguf_file, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["out"] == gguf_file and os.path.getsize(gguf_file) == d["bytes"]
    assert d["file_type"] == "MOSTLY_Q4_1"
    by_type = {t["name"]: t["type"] for t in d["tensors"]}
    assert by_type.pop("token_embd.weight") == "Q8_0"  # tied: the embedding is the head too
    assert {n for n, t in by_type.items() if t == "Q4_1"} == {n for n in by_type if not n.endswith("norm.weight")}
    assert {t for n, t in by_type.items() if n.endswith("norm.weight")} == {"F32"}
    assert d["requantized"] == 0 and d["tokenizer"] == {"model": "gpt2", "pre": "gpt-2", "tokens": 2048}
    results = {}
    for name in (ckpt, gguf_file):
        code, out, _ = run(capsys, "eval", name, "--data", VAL, "--limit", "4", "--json")
        assert code == 0
        ppl = json.loads(out)["ppl"]
        code, out, _ = run(capsys, "generate", name, "Once upon a time", "--max-tokens", "24", "--json")
        assert code == 0
        results[name] = (ppl, json.loads(out)["token_ids"])
    # Q4_1's minimum is rounded to fp16 once on the way out; the tokens are the same and the
    # perplexity within that rounding
    assert results[ckpt][1] == results[gguf_file][1]
    assert results[gguf_file][0] == pytest.approx(results[ckpt][0], rel=1e-4)


def test_quantize_and_export_in_one_command_is_exact(capsys, tmp_path):
    out_file = str(tmp_path / "m.gguf")
    code, out, err = run(capsys, "export", "default-small", "--quant", "int4-g32", "-o", out_file)
    assert code == 0 and out == ""
    assert "precision rules: int4-g32-full" in err and "every tensor written exactly" in err
    evals = [json.loads(run(capsys, "eval", *m, "--data", VAL, "--limit", "4", "--json")[1])["ppl"]
             for m in ((out_file,), ("default-small", "--quant", "int4-g32"))]
    assert evals[0] == evals[1]  # Q4_0: the same codes and fp16 scales, the same arithmetic


def test_auto_mixed_precision_exports_each_tensor_in_its_own_type(capsys, tmp_path):
    out_file = str(tmp_path / "auto.gguf")
    code, out, _ = run(capsys, "export", "default-small", "--quant", "auto", "--candidates", "int8-g32,int4-g32,int4-g32-asym",
                       "--avg-bits", "5.5", "--calib", VAL, "--calib-samples", "32", "--calib-len", "64", "-o", out_file,
                       "--json")
    assert code == 0
    d = json.loads(out)
    specs = {t["param"]: t["spec"] for t in d["tensors"]}
    kinds = set()
    for t in d["tensors"]:
        if t["spec"].startswith("int"):
            assert t["type"] == exact_type(parse_spec(t["spec"])), t["name"]
            kinds.add(t["type"])
    assert len(kinds) >= 2 and not d["requantized"]
    assert d["quant"] and all(specs[p] in d["quant"] or not specs[p].startswith("int") for p in specs)


@pytest.mark.parametrize("args,match", [
    (("nonesuch", "-o", "{tmp}/a.gguf"), "no such file or directory"),
    (("default-small", "--quant", "int4-g128", "-o", "{tmp}/a.gguf"), "int4-g128-full has no exact GGUF type.*--requantize"),
    (("default-small", "--format", "onnx", "-o", "{tmp}/a.gguf"), "'onnx' is not 'gguf'"),
    (("default-small",), "Missing option '-o'"),
    (("default-small", "--calib", VAL, "-o", "{tmp}/a.gguf"), "--calib applies only with --quant"),
    (("default-small", "--requantize", "Q5_K", "-o", "{tmp}/a.gguf"), "'Q5_K' is not one of"),
    (("default-small", "-o", "{tmp}/exists.gguf"), "already exists \\(pass --overwrite"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, args, match):
    (tmp_path / "exists.gguf").write_bytes(b"mine")
    code, out, err = run(capsys, "export", *(a.format(tmp=tmp_path) for a in args))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 or lines[0].startswith("Usage:"), err
    import re

    assert re.search(match, err), err
    assert sorted(os.listdir(tmp_path)) == ["exists.gguf"] and (tmp_path / "exists.gguf").read_bytes() == b"mine"


def test_requantize_converts_and_reports_the_added_error(capsys, tmp_path):
    out_file = str(tmp_path / "m.gguf")
    code, out, _ = run(capsys, "export", "default-small", "--quant", "attn=int4-g128,*=int4-g32", "--requantize", "q4_0",
                       "-o", out_file, "--json")
    assert code == 0
    d = json.loads(out)
    redone = [t for t in d["tensors"] if t["requantized"]]
    assert d["requantized"] == len(redone) == 4 * 3  # q, k, v, o of default-small's 3 blocks
    assert all(t["spec"] == "int4-g128-full" and t["type"] == "Q4_0" and t["rel_rms_error"] > 0 for t in redone)


@pytest.mark.parametrize("args,match", [
    (("--quant", "int4-g128"), "int4-g128 has no exact GGUF type"),
    (("--quant", "embed=int8,*=int4-g32"), "int8 has no exact GGUF type"),
    (("--method", "gptq"), "--method gptq needs calibration text"),
    (("--method", "nope"), "unknown method 'nope'"),
])
def test_bench_export_usage_errors(capsys, tmp_path, args, match):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 3\n")
    code, out, err = run(capsys, "bench", "export", "default-small", "--data", VAL, "--llamacpp", str(fake), *args)
    assert code == 2 and out == "" and match in err


def test_bench_export_needs_llamacpp(capsys, tmp_path):
    code, _, err = run(capsys, "bench", "export", "default-small", "--data", VAL, "--llamacpp", str(tmp_path / "none"))
    assert code == 2 and "no such file (build the venv with bench/llamacpp_venv.sh)" in err


def test_specs_without_an_exact_type_are_refused_before_quantizing(capsys, tmp_path, monkeypatch):
    """`--quant int4-g128` (and an auto candidate without an exact type) is refused from the rules,
    before the model loads or any quantization runs."""
    import cascade.models

    def boom(*a, **k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(cascade.models, "load_model", boom)
    out = str(tmp_path / "a.gguf")
    code, _, err = run(capsys, "export", "default-small", "--quant", "embed=int8,*=int4-g32", "-o", out)
    assert code == 2 and "int8 has no exact GGUF type" in err
    code, _, err = run(capsys, "export", "default-small", "--quant", "auto", "--avg-bits", "5", "--calib", VAL,
                       "--candidates", "int8-g32,int4-g64", "-o", out)
    assert code == 2 and "int4-g64-full has no exact GGUF type" in err
    assert os.listdir(tmp_path) == []
