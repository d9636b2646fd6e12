"""Regression tests for the bugs a hostile newcomer found (issue "Hardening"), one test per bug.

Each one failed before its fix.  The fuzz suite (tests/test_cli_fuzz.py) checks the general
properties (exit codes, one error line, strict JSON, nothing left behind) on generated input.
"""

import json
import os
import sys

import pytest

from cascade import cli
from tests.shared_data import DATA

BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
TOK = os.path.join(DATA, "stories260K", "tok512.model")
VAL = os.path.join(DATA, "text", "tinystories_val.txt")


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in err and "Traceback" not in err
    return lines[0]


def test_bench_ppl_reports_instead_of_crashing(capsys, tmp_path):
    """Bug 1: `bench ppl` always crashed after scoring ('dict' object has no attribute 'ctx')."""
    out_file = tmp_path / "ppl.json"
    code, out, err = run(capsys, "bench", "ppl", BIN, "--data", VAL, "--limit", "2", "--spec", "source,int8",
                         "--out", str(out_file), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["ctx"] == 512 and d["documents"] == 2 and [r["spec"] for r in d["rows"]] == ["source", "int8"]
    assert d["rows"][0]["ppl_change_pct"] == 0 and abs(d["rows"][1]["ppl_change_pct"]) < 1
    assert {"device", "cpu", "cores", "jax"} <= set(d) and json.loads(out_file.read_text()) == d
    code, _, err = run(capsys, "bench", "ppl", BIN, "--data", VAL, "--limit", "2", "--spec", "int9")
    assert code == 2 and "int9" in one_error_line(err)
    code, out, err = run(capsys, "bench", "ppl", BIN, "--data", VAL, "--limit", "2", "--spec", "int8,int8-a8",
                         "--max-tokens", "100", "--no-truncate", "--json")
    d = json.loads(out)
    assert code == 0 and d["max_tokens"] == 100 and all(r["tokens"] <= 100 for r in d["rows"])
    code, _, err = run(capsys, "bench", "ppl", BIN, "--data", VAL, "--max-tokens", "1")
    assert code == 2 and "--max-tokens" in one_error_line(err)


def test_a_file_named_like_a_spec_does_not_replace_it(capsys, tmp_path, monkeypatch):
    """Bug 2: a file `int8` in the working directory replaced the spec int8, default included."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "int8").write_text(json.dumps({"__default__": "int2-g16"}))
    code, out, _ = run(capsys, "run", "Once upon a time", "--max-tokens", "2", "--mode", "large", "--json")
    assert code == 0
    reference = json.loads(run(capsys, "quantize", "default-large", "--quant", "int8", "--json")[1])
    assert json.loads(out)["large"]["weight_bytes"] == reference["bytes_after"]
    specs = {r["spec"] for r in reference["layers"]}
    assert "int8" in specs and not any(s.startswith("int2") for s in specs)


@pytest.mark.parametrize("args", [
    ("quantize", "default-small", "--quant", ""),
    ("generate", "default-small", "hi", "--quant", ""),
    ("eval", "default-small", "--data", VAL, "--quant", " "),
    ("run", "hi", "--small", ""),
    ("plan", "--large", ""),
])
def test_an_empty_spec_is_a_usage_error(capsys, args):
    """Bug 3: `--quant ""` was an internal error in quantize and silently unquantized elsewhere."""
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and "empty precision rules" in one_error_line(err)


def test_inline_rules_keep_embeddings_norms_and_head_16bit(capsys):
    """Bug 4: inline rules quantized the embedding to int4 and left norms in fp32, against the help."""
    code, out, _ = run(capsys, "quantize", "default-small", "--quant", "attn=int8,*=int4-g32", "--json")
    assert code == 0
    spec = {r["path"]: r["spec"] for r in json.loads(out)["layers"]}
    assert spec["embed/embedding"] == "bf16" and spec["final_norm/scale"] == "bf16"
    assert spec["layers_0/attn_norm/scale"] == "bf16" and spec["layers_0/mlp_norm/scale"] == "bf16"
    assert spec["layers_0/attn/q_proj/kernel"] == "int8" and spec["layers_0/mlp/up_proj/kernel"] == "int4-g32"
    # a rule of the user's that names the embedding wins over the keep-16-bit rules
    code, out, _ = run(capsys, "quantize", "default-small", "--quant", "embed=int8,*=int4-g32", "--json")
    assert {r["path"]: r["spec"] for r in json.loads(out)["layers"]}["embed/embedding"] == "int8"
    assert "embeddings, norms and the LM head in bf16" in " ".join(run(capsys, "quantize", "--help")[1].split())


@pytest.mark.parametrize("command", [("generate", "default-small", "hi"), ("run", "hi")])
def test_one_seed_rule_for_every_command(capsys, command):
    """Bug 5: generate overflowed on 2**63 and accepted -1; run refused -1.  Now [0, 2**63-1] everywhere."""
    for seed in ("-1", str(2**63), "x"):
        code, out, err = run(capsys, *command, "--seed", seed, "--temperature", "1", "--max-tokens", "2")
        assert code == 2 and out == "" and "--seed" in one_error_line(err)
    code, out, err = run(capsys, *command, "--seed", str(2**63 - 1), "--temperature", "1", "--max-tokens", "2",
                         "--json")
    assert code == 0 and len(json.loads(out)["token_ids"]) == 2, err


def test_seed_rule_in_the_python_api():
    from cascade.models import SamplingConfig

    SamplingConfig(seed=2**63 - 1)
    for bad in (-1, 2**63, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            SamplingConfig(seed=bad)


@pytest.mark.parametrize("command", [("generate", "default-small"), ("run",)])
def test_a_prompt_that_is_not_utf8_is_a_usage_error(capsys, command):
    """Bug 6: invalid UTF-8 bytes in the prompt (lone surrogates in argv) were an internal error."""
    bad = b"\xff\xfe bad".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    code, out, err = run(capsys, *command, bad, "--max-tokens", "2")
    assert code == 2 and out == "" and "not valid UTF-8" in one_error_line(err)


def test_tokenizers_refuse_text_that_is_not_utf8():
    from cascade.models import load_model
    from cascade.models.loaders.llama2c import load_llama2c

    bad = b"ok \xff".decode("utf-8", "surrogateescape")
    for tok in (load_model("default-small").tokenizer, load_llama2c(BIN).tokenizer):
        with pytest.raises(ValueError, match="not valid UTF-8"):
            tok.encode(bad)


@pytest.mark.parametrize("args", [
    ("generate", "default-small", "hi", "--kv", "int4-s99999"),
    ("run", "hi", "--kv", "int4-s512"),
    ("plan", "--kv", "int4-s1000000000"),
    ("plan", "--large-kv", "int8-r1024"),
    ("eval", "default-small", "--data", VAL, "--kv", "int4-kg1024"),
    ("inspect", "default-small", "--kv", "int4-s600"),
])
def test_kv_sinks_or_windows_beyond_the_context_are_usage_errors(capsys, args):
    """Bug 7: sinks beyond the context allocated 99,999 slots (plan: 3.6 TB, exit 0)."""
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and "context of 512 positions" in one_error_line(err)


def test_kv_spec_check_context_in_the_library():
    from cascade.models import KVCache, kv_cache_memory, load_model

    cfg = load_model("default-small").config
    for kv in ("int4-s512", "int8-r544", "int4-kg1024"):
        with pytest.raises(ValueError, match="do not fit"):
            KVCache.create(cfg, 1, 64, kv)
        with pytest.raises(ValueError, match="do not fit"):
            kv_cache_memory(cfg, kv, 64)
    assert kv_cache_memory(cfg, "int4-s511", 512)["bytes"] > 0


@pytest.mark.parametrize("args", [
    ("generate", "default-small", "hi", "--tokenizer", TOK),
    ("eval", "default-small", "--data", VAL, "--tokenizer", TOK),
    ("inspect", "default-small", "--tokenizer", TOK),
    ("quantize", "default-small", "--quant", "int8", "--tokenizer", TOK),
    ("bench", "ppl", "default-small", "--data", VAL, "--tokenizer", TOK),
])
def test_tokenizer_flag_is_refused_for_models_with_their_own(capsys, args):
    """Bug 9: --tokenizer was silently ignored for models that are not llama2.c .bin files."""
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and "--tokenizer applies only to a llama2.c .bin" in one_error_line(err)
    code, out, _ = run(capsys, "generate", BIN, "Once", "--tokenizer", TOK, "--max-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["token_ids"]


def test_tokenizer_argument_is_refused_by_load_model():
    from cascade.models import load_model

    with pytest.raises(ValueError, match="only to a llama2.c .bin"):
        load_model("default-small", tokenizer=TOK)


@pytest.mark.parametrize("args, flag", [
    (("generate", "default-small", "hi", "--temperature", "nan"), "--temperature"),
    (("run", "hi", "--temperature", "inf"), "--temperature"),
    (("generate", "no/such/model", "hi"), "MODEL"),
    (("eval", "no/such/model", "--data", VAL), "MODEL"),
    (("eval", "default-small", "--data", "no/such/file.txt"), "--data"),
    (("run", "hi", "--large-model", "no/such/model"), "--large-model"),
    (("generate", "default-small", ""), "PROMPT"),
    (("run", ""), "PROMPT"),
    (("eval", "default-small", "--data", "/dev/zero"), "--data"),
])
def test_range_and_missing_path_errors_are_all_usage_errors(capsys, args, flag):
    """Bug 10: nan exited 1 while other range errors exit 2; a missing model exited 1 but a missing
    --data 2; `run ""` was refused but `generate ""` accepted; /dev/zero ran out of memory."""
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and flag in one_error_line(err)


def test_overwrite_is_checked_before_quantizing(capsys, tmp_path, monkeypatch):
    """Bug 10: -o onto a checkpoint without --overwrite was reported after quantizing, naming overwrite=True."""
    out_dir = tmp_path / "ck"
    assert run(capsys, "quantize", "default-small", "--quant", "int8", "-o", str(out_dir))[0] == 0
    import cascade.models.quantize

    def fail(*a, **k):
        raise AssertionError("quantized before checking the destination")

    monkeypatch.setattr(cascade.models.quantize, "quantize_params", fail)
    code, out, err = run(capsys, "quantize", "default-small", "--quant", "int8", "-o", str(out_dir))
    line = one_error_line(err)
    assert code == 2 and "--overwrite" in line and "overwrite=True" not in line
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    code, _, err = run(capsys, "quantize", "default-small", "--quant", "int8", "-o", str(tmp_path / "mine"),
                       "--overwrite")
    assert code == 2 and "not a cascade checkpoint" in one_error_line(err)


def test_prompt_alone_too_long_says_so(capsys):
    """Bug 10: the over-long-prompt error told the user to lower --max-tokens when the prompt alone was too long."""
    for command in (("generate", "default-small"), ("run",)):
        code, _, err = run(capsys, *command, "hello " * 600, "--max-tokens", "2")
        line = one_error_line(err)
        assert code == 1 and "shorten the prompt" in line and "max-tokens" not in line
    code, _, err = run(capsys, "generate", "default-small", "hello " * 100, "--max-tokens", "500")
    assert code == 1 and "generate at most" in one_error_line(err)


def test_warnings_are_one_line_and_name_the_cli_flag(capsys, tmp_path):
    """Bug 10: warnings printed as raw `UserWarning` lines with a source line, suggesting a Python argument."""
    import numpy as np

    path = tmp_path / "tiny.npz"
    np.savez(path, w=np.full((8, 8), 1e-6, np.float32))
    code, out, err = run(capsys, "quantize", str(path), "--quant", "int8")
    warning = [line for line in err.splitlines() if "smallest normal" in line]
    assert code == 0 and len(warning) == 1 and warning[0].startswith("warning: ")
    assert "--scale-dtype float32" in warning[0] and "UserWarning" not in err
    code, out, err = run(capsys, "quantize", str(path), "--quant", "int8", "--scale-dtype", "float32", "--json")
    assert code == 0 and "warning" not in err
    assert json.loads(out)["layers"][0]["rel_error"] < 0.01


def test_speculative_metrics_count_only_emitted_proposals(capsys):
    """Bug 10: `run --max-tokens 2 --json` reported 4 accepted tokens for 2 emitted."""
    for n in (1, 2, 3, 7, 24):
        code, out, _ = run(capsys, "run", "Once upon a time", "--max-tokens", str(n), "--json")
        d = json.loads(out)
        s = d["speculative"]
        assert code == 0 and len(d["token_ids"]) == s["emitted_tokens"] == n
        assert s["accepted_tokens"] <= s["draft_tokens"] <= 4 * s["rounds"]
        # every emitted token after the prefill's is an accepted proposal or the target's own, at most one a round
        targets = n - 1 - s["accepted_tokens"]
        assert s["rounds"] - 1 <= targets <= s["rounds"]


def test_a_draft_equal_to_the_target_is_accepted_only_as_far_as_emitted():
    from cascade.speculative import speculative_generate
    from cascade.models import load_model

    m = load_model("default-small")
    ids = m.tokenizer.encode("Once upon a time")
    for n, (drafted, accepted) in {2: (1, 1), 3: (2, 2), 6: (4, 4)}.items():
        r = speculative_generate(m.params, m.config, m.params, m.config, ids, max_new_tokens=n, draft_len=4, eos_ids=())
        st = r.stats
        assert len(r.tokens) == st.emitted_tokens == n
        assert (st.draft_tokens, st.accepted_tokens) == (drafted, accepted), n  # 6: one full round, 4 + the bonus
        assert st.to_json()["acceptance_per_position"] == [1.0] * min(4, n - 1) + [0.0] * (4 - min(4, n - 1))


@pytest.mark.parametrize("command", [("error", "--k", "64", "--n", "8", "--spec", "int8"),
                                     ("kv", "default-small", "--data", VAL, "--limit", "2", "--ctx", "64",
                                      "--kv", "fp32,int8")])
def test_every_bench_json_has_the_device_context(capsys, command):
    """Bug 10: `bench error` and `bench kv` JSON lacked the device context the README promises."""
    code, out, err = run(capsys, "bench", *command, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert {"device", "cpu", "cores", "jax"} <= set(d) and d["cores"] >= 1


def test_huge_bench_matmul_shapes_are_refused_before_allocating(capsys):
    """Bug 10: huge shapes ended in a MemoryError internal error."""
    code, out, err = run(capsys, "bench", "matmul", "--k", "1000000", "--n", "1000000", "--batch", "1")
    assert code == 1 and out == "" and "GiB available" in one_error_line(err)


# ------------------------------------------------------------------------------------------ Hardening II
# Issue "Hardening II": input validated before any work, and one way to refuse.  Each test failed
# on the code before its fix (the bug numbers are the issue's).

S_BIN = BIN  # the issue's `S`


def _no_loading(monkeypatch):
    """Make any model load (or matmul benchmark) fail the test: what follows must be refused before it."""
    import cascade.bench.matmul
    import cascade.models
    import cascade.pair

    def fail(*a, **k):
        raise AssertionError("did work before refusing the command line")

    monkeypatch.setattr(cascade.models, "load_model", fail)
    monkeypatch.setattr(cascade.pair, "load_pair", fail)
    monkeypatch.setattr(cascade.bench.matmul, "run", fail)


@pytest.mark.parametrize("content, named", [
    ("[1, 2]", "a JSON array, not an object"),
    ('"results"', "a JSON string, not an object"),
    ('{"benchmark": "ptq", "model": "m", "data": "d", "float_ppl": NaN, "rows": []}', "'float_ppl' is nan"),
    ('{"benchmark": "ptq", "model": "m", "data": "d", "float_ppl": 3.5, "rows": {}}', "'rows' is a JSON object"),
    ('{"benchmark": "ptq", "model": "m", "data": "d", "float_ppl": 3.5, "rows": [{"method": "rtn", "spec": "int4", '
     '"weight_bytes": 5}]}', "rows[0] has no 'ppl' key"),
    ('{"benchmark": "qat", "model": "m", "data": "d", "float_ppl": 3.5, "spec": 4, "rows": []}', "'spec' is 4"),
    ('{"benchmark": "kv_cache", "rows": []}', "benchmark 'kv_cache'"),
])
def test_bench_plot_refuses_a_malformed_result_in_one_line(capsys, tmp_path, content, named):
    """Bug 6: `bench plot` on `[1,2]` or a string was "internal error (AttributeError ...)"."""
    path = tmp_path / "r.json"
    path.write_text(content)
    code, out, err = run(capsys, "bench", "plot", str(path), "--out-dir", str(tmp_path / "plots"))
    line = one_error_line(err)
    assert code == 2 and out == "" and str(path) in line and named in line
    assert not (tmp_path / "plots").exists()


def test_qat_reports_only_a_loss_curve_it_drew(capsys, tmp_path, monkeypatch):
    """Bug 7: without matplotlib `qat` still reported `loss curve: .../loss.png` (and `loss_png`)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    text = tmp_path / "train.txt"
    with open(VAL, encoding="utf-8") as f:
        text.write_text(f.read(4000))
    args = ("qat", S_BIN, "--quant", "int8", "--data", str(text), "--steps", "1", "--seq-len", "16", "--batch-size",
            "1", "-o", str(tmp_path / "q"))
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "loss curve:" not in out + err and "loss.png" not in out + err and "matplotlib" in err
    assert not (tmp_path / "q.run" / "loss.png").exists() and (tmp_path / "q.run" / "loss.csv").exists()
    code, out, err = run(capsys, *args, "--overwrite", "--json")  # resumes at its last step: no new steps
    d = json.loads(out)
    assert code == 0 and d["loss_png"] is None and any("matplotlib" in n for n in d["notes"])


@pytest.mark.parametrize("flag", ["--val", "--data"])
def test_qat_names_the_file_without_documents(capsys, tmp_path, monkeypatch, flag):
    """Bug 8: `qat --val empty.txt` said "no documents to train on", blaming the training data."""
    empty = tmp_path / "empty.txt"
    empty.write_text("<|endoftext|>\n\n")
    files = {"--data": VAL, "--val": VAL, flag: str(empty)}
    _no_loading(monkeypatch)
    code, out, err = run(capsys, "qat", S_BIN, "--quant", "int8", "--steps", "1", "-o", str(tmp_path / "q"),
                         *(a for item in files.items() for a in item))
    line = one_error_line(err)
    assert code == 2 and f"'{flag}'" in line and str(empty) in line and "train on" not in line


def test_qat_refuses_a_text_too_short_for_one_window(capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.\n")
    for flag, need in (("--val", 65), ("--data", 66)):  # a validation window is seq_len + 1 tokens, a training draw + 2
        files = {"--data": VAL, "--val": VAL, flag: str(short)}
        code, _, err = run(capsys, "qat", S_BIN, "--quant", "int8", "--steps", "1", "--seq-len", "64", "-o",
                           str(tmp_path / "q"), *(a for item in files.items() for a in item))
        line = one_error_line(err)
        assert code == 2 and f"'{flag}'" in line and f"needs {need}" in line
    assert not (tmp_path / "q.run").exists()


@pytest.mark.parametrize("command", ["matmul", "error"])
@pytest.mark.parametrize("spec, why", [("", "at least one"), (",", "at least one"), ("int5", "unknown precision spec"),
                                       ("bf16", "float type"), ("w8a8-static", "w8a8-static")])
def test_bench_spec_lists_are_checked_at_parse_time(capsys, monkeypatch, command, spec, why):
    """Bug 10: `bench matmul --spec ''` ran the default benchmark; int5 and bf16 failed in the library (exit 1)."""
    _no_loading(monkeypatch)
    code, out, err = run(capsys, "bench", command, "--k", "8", "--n", "8", "--spec", spec)
    line = one_error_line(err)
    assert code == 2 and out == "" and "'--spec'" in line and why in line


@pytest.mark.parametrize("args", [
    ("generate", S_BIN, "hi", "--kv", "int4-g7"),
    ("eval", S_BIN, "--data", VAL, "--kv", "int4-g7"),
    ("inspect", S_BIN, "--kv", "int8-g5"),
    ("bench", "kv", S_BIN, "--data", VAL, "--kv", "fp32,int4-g6"),
    ("bench", "decode", S_BIN, "--kv", "int8-g3"),
    ("run", "hi", "--kv", "int4-g14"),  # the default pair: 48 values a token
    ("generate", S_BIN, "hi", "--kv", "int4-g1"),  # an odd int4 value group: refused by the spec itself
])
def test_kv_specs_are_checked_before_the_weights_load(capsys, monkeypatch, args):
    """Bug 13: `--kv int4-g7` exited 1 after loading where `--kv int4-r3` exited 2 up front."""
    _no_loading(monkeypatch)
    code, out, err = run(capsys, *args)
    line = one_error_line(err)
    assert code == 2 and out == "" and "'--kv'" in line and "value group" in line


def test_kv_check_model_in_the_library():
    from cascade.quant.kv import parse_kv_spec

    spec = parse_kv_spec("int4-g6")
    spec.check_model(context=64, n_kv_heads=2, head_dim=6)  # 12 values a token: 6 divides them
    with pytest.raises(ValueError, match="does not divide the 16 values"):
        spec.check_model(context=64, n_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="sink"):
        parse_kv_spec("int4-s64").check_model(context=64, n_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="int4 value group must be even"):
        parse_kv_spec("int4-g3")
    parse_kv_spec("int8-g3")  # int8 stores a byte a value: any group


@pytest.mark.parametrize("make_args, flag", [
    (lambda d: ("bench", "ppl", S_BIN, "--data", VAL, "--limit", "1", "--out", str(d / "missing" / "x.json")), "--out"),
    (lambda d: ("bench", "matmul", "--k", "8", "--n", "8", "--out", str(d)), "--out"),
    (lambda d: ("sensitivity", S_BIN, "--calib", VAL, "--out", str(d / "missing" / "s.json")), "--out"),
    (lambda d: ("quantize", S_BIN, "--quant", "auto", "--avg-bits", "5", "--calib", VAL, "--rules-out",
                str(d / "afile" / "r.json")), "--rules-out"),
    (lambda d: ("qat", S_BIN, "--quant", "int8", "--data", VAL, "--steps", "1", "-o", str(d / "afile" / "q")), "--out"),
    (lambda d: ("qat", S_BIN, "--quant", "int8", "--data", VAL, "--steps", "1", "-o", str(d / "q"), "--run-dir",
                str(d / "afile")), "--run-dir"),
    (lambda d: ("bench", "plot", str(d / "afile"), "--out-dir", str(d / "afile" / "plots")), "--out-dir"),
])
def test_output_paths_are_checked_before_the_work(capsys, tmp_path, monkeypatch, make_args, flag):
    """Bug 13: `bench ppl --out /missing/dir/x.json` (and sensitivity's --out) failed after all the measuring."""
    (tmp_path / "afile").write_text("{}")
    _no_loading(monkeypatch)
    code, out, err = run(capsys, *make_args(tmp_path))
    assert code == 2 and out == "" and f"'{flag}'" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_plot_without_matplotlib_is_refused_before_measuring(capsys, tmp_path, monkeypatch):
    """Bug 13: `sensitivity --plot` with no matplotlib failed after the whole sweep."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _no_loading(monkeypatch)
    code, out, err = run(capsys, "sensitivity", S_BIN, "--calib", VAL, "--plot", str(tmp_path / "s.png"))
    line = one_error_line(err)
    assert code == 2 and "'--plot'" in line and "pip install matplotlib" in line


def test_output_path_check_in_one_place(tmp_path):
    """The one check behind every output path: a hand case per rule."""
    (tmp_path / "afile").write_text("x")
    problem = cli._output_problem
    assert problem(str(tmp_path / "new.json")) is None and problem(str(tmp_path / "afile")) is None
    assert "is a directory" in problem(str(tmp_path))
    assert "does not exist" in problem(str(tmp_path / "missing" / "x.json"))
    assert "not a directory" in problem(str(tmp_path / "afile" / "x.json"))
    assert "not a regular file" in problem("/dev/null")  # replacing it atomically would replace the device
    assert problem("") == "an empty path"
    assert problem(str(tmp_path / "a" / "b" / "ck"), directory=True) is None  # missing parents are created
    assert "not a directory" in problem(str(tmp_path / "afile"), directory=True)
    assert "not a directory" in problem(str(tmp_path / "afile" / "ck"), directory=True)


@pytest.mark.parametrize("args, message", [
    (("run", "hi", "--mode", "small", "--large-kv", "int4"),
     "--large-kv applies only to --mode speculative, spec-cascade, defer or large"),
    (("run", "hi", "--mode", "large", "--small", "int8", "--small-kv", "int8"),
     "--small, --small-kv apply only to --mode speculative, spec-cascade, defer or small"),
    (("plan", "--mode", "large", "--small-kv", "int4"), "--small-kv applies only to --mode speculative or small"),
    (("run", "hi", "--top-p", "0.5", "--seed", "3"), "--top-p, --seed apply only to sampling (--temperature above 0)"),
    (("generate", "default-small", "hi", "--top-k", "5"), "--top-k applies only to sampling (--temperature above 0)"),
    (("generate", "default-small", "hi", "--scale-dtype", "float32"), "--scale-dtype applies only with --quant"),
    (("eval", "default-small", "--data", VAL, "--scale-dtype", "float32"), "--scale-dtype applies only with --quant"),
    (("eval", "default-small", "--data", VAL, "--truncate", "--stride", "5"),
     "--stride applies only to sliding windows (without --truncate)"),
    (("bench", "ppl", "default-small", "--data", VAL, "--stride", "5"), "--stride applies only with --no-truncate"),
    (("quantize", "default-small", "--quant", "int4", "--avg-bits", "4"), "--avg-bits applies only to --quant auto"),
    (("quantize", "default-small", "--quant", "int4", "--damp", "0.1", "--act-order"),
     "--damp, --act-order apply only to --method gptq or awq-gptq, not to the default method (name one with --method)"),
    (("qat", "default-small", "--quant", "int4", "--data", VAL, "--steps", "1", "-o", "x", "--clip-rate", "1"),
     "--clip-rate applies only with --learn-clip"),
    (("bench", "kv", "default-small", "--data", VAL, "--gen-prompt", "4"), "--gen-prompt applies only with --gen-tokens"),
])
def test_flags_that_do_not_apply_are_refused_the_same_way(capsys, monkeypatch, args, message):
    """Consistency: `--mode small --large-kv int4`, `--scale-dtype` without `--quant`, `--top-p`/`--seed` at
    temperature 0 and `eval --truncate --stride 5` were silently ignored; the refusals that existed said
    "--avg-bits apply only"."""
    _no_loading(monkeypatch)
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and one_error_line(err) == f"error: {message} (see 'cascade {args[0]}" + (
        f" {args[1]}" if args[0] == "bench" else "") + " --help')"


def test_the_same_flags_are_accepted_under_both_names(capsys, monkeypatch):
    """Names that line up: `sensitivity --candidates` (as quantize and bench workflow name it) and
    `--truncate`/`--no-truncate` in both eval and bench ppl."""
    _no_loading(monkeypatch)
    for args in (("sensitivity", S_BIN, "--calib", VAL, "--candidates", "int9"),
                 ("eval", S_BIN, "--data", VAL, "--no-truncate", "--ctx", "0"),
                 ("bench", "ppl", S_BIN, "--data", VAL, "--truncate", "--ctx", "0")):
        code, _, err = run(capsys, *args)  # each reaches the value check of its last flag: the name is known
        assert code == 2 and "no such option" not in err and ("int9" in err or "--ctx" in err), err
