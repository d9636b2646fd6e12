"""Property-based fuzzing of every subcommand (hypothesis): generated argument lists, valid and
invalid values for every option, odd strings, huge and negative numbers, bad paths and damaged
model files made here.  Whatever the input, the command line must:

* exit with 0, 1 or 2;
* on failure print exactly one ``error:`` line on stderr, never a traceback or "internal error"
  (``run --prompts``: one for each prompt that failed, or its ``--json`` row with ``error``);
* on success with ``--json`` print exactly one strict JSON object (no NaN/Infinity) on stdout
  (``run --prompts``: one per prompt, a line each);
* on failure leave the output directory exactly as it was (no half-written file or checkpoint).

CI runs ``CASCADE_FUZZ_EXAMPLES`` (default 10) examples per subcommand, derandomized (the same
examples every run).  Setting the variable runs that many with fresh random examples, e.g.
``CASCADE_FUZZ_EXAMPLES=300 python -m pytest tests/test_cli_fuzz.py --hypothesis-show-statistics`` (the
statistics count the exit codes reached).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cascade import cli
from tests.shared_data import DATA

EXPLORE = "CASCADE_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("CASCADE_FUZZ_EXAMPLES", "10"))

# ------------------------------------------------------------------------------------ value pools
# "@name" stands for a file the fixture makes (or the per-example output directory, "@out").  Each
# pool is (valid values, invalid values); `values` draws a valid one most of the time, so that
# examples get past parsing and reach the loaders, the quantizer and generation too.  Valid models
# are mostly tiny (one layer): every new combination of precisions compiles new programs.

MODELS = (["@tiny_hf", "@tiny_hf", "@tiny_ckpt", "default-small", "@stories_bin"],
          ["@ckpt_damaged", "@hf_truncated", "@hf_bad_config", "@garbage_gguf", "@garbage_bin", "@empty_dir",
           "@text_file", "no/such/model", "", "default-medium", "-"])
WEIGHT_FILES = (["@weights_st", "@weights_npz"], ["@weights_truncated"])
PROMPTS = (["Once upon a time", "The dog", "hi", " ", "héllo wörld ✓ 日本", "<|endoftext|>"],
           ["", "\udcff\udcfe bad", "x " * 700, "\x00\x01", "--json", "-1"])
RULES = (["int8", "int4-g32", "int4-g32-asym", "int3-g32", "int2-g16-asym", "bf16", "fp32", "attn=int8,*=int4-g32",
          "embed=int8,*=int4", "@rules_json", "w8a8"],
         ["", " ", "int9", "w8a8-static", "int4-g0", "int4-g32-tensor", "(=int8", "*=int8,*=int4", "@rules_bad_json", "missing.json",
          "./missing", "attn=", "=int8"])
PAIR_RULES = (RULES[0] + ["none"], RULES[1])
KVS = (["fp32", "fp16", "bf16", "int8", "int4", "int4-s4", "int4-r64", "int8-kg16", "INT8"],
       ["int4-s99999", "int8-r1024", "int4-kg3", "int2", "", "x"])
INTS = (["1", "2", "3", "7", "16", "64"], ["0", "-1", "9223372036854775808", "x", "1.5", "", "1e3"])
SEEDS = (["0", "1", "12345", "9223372036854775807"], ["-1", "9223372036854775808", "x", ""])
FLOATS = (["0", "0.5", "0.9", "1", "1.5"], ["-1", "nan", "inf", "-inf", "x", "1e309", ""])
PROBS = (["1", "0.9", "0.5"], ["0", "1.5", "-0.1", "nan", "x"])
DATA_FILES = (["@val_small"], ["@empty_txt", "@binary_txt", "@eot_only", "/dev/zero", "no/such/file.txt", "@empty_dir",
                               ""])
TOKENIZERS = (["@tok"], ["@text_file", "no/such/tok.model", "@empty_dir"])
OUT_DIRS = (["@out/ck", "@out/taken"], ["@out/afile", "@out/missing/ck", "@out", "", "@out/.."])
OUT_FILES = (["@out/r.json"], ["@out/afile", "@out/missing/r.json", "@out", "@out/taken", ""])
SCALE_DTYPES = (["float16", "bfloat16", "float32"], ["int8", ""])
MODES = (["speculative", "spec-cascade", "defer", "large", "small"], ["medium", ""])
PLAN_MODES = (["speculative", "large", "small"], ["medium", "", "defer"])
BUDGETS = (["1GiB", "512MB", "100", "1.5GB", "1e12"], ["0", "-5", "lots", ""])
MM_SPECS = (["int8", "int4-g16", "int8,int4-g32-asym", "int3-g16", "int8,w8a8"], ["int9", "", ",", "int4-g0", "bf16",
                                                                               "w8a8-static"])
ERR_SPECS = (["int8", "int4-g16", "int8,int4-g32-asym", "int3-g16"], ["int9", "", ",", "bf16", "w8a8", "int4-mse"])
PPL_SPECS = (["source", "int8", "source,int4-g32", "source,source"], ["int9", "", ",", "none"])
DECODE_SPECS = (["source", "fp32", "int8", "source,int4-g32"], ["int9", "", ",", "none", "fp64"])
KV_LISTS = (["fp32,int8", "int4", "fp16,int4-s4"], ["", "fp32,bogus", "int4-s99999", ","])
BATCHES = (["1", "1,4", "2"], ["0", "a", "", "1,,2", "-1", "99999999999"])
SMALL_DIMS = (["8", "16", "40", "3"], ["0", "-1", "x"])
# the commands that train or quantize with calibration: only the one-layer models (every new setting compiles)
TINY_MODELS = (["@tiny_hf", "@tiny_ckpt"], MODELS[1])
CALIB_FILES = (["@calib_txt"], DATA_FILES[1])
PROMPT_FILES = (["@prompts_txt", "@prompts_blank_lines", "@prompts_crlf"],
                ["@empty_txt", "@blank_only", "@binary_txt", "@nul_txt", "/dev/zero", "no/such/prompts.txt",
                 "@empty_dir", ""])
# `bench plot` inputs: results the fixture writes, well formed (a ptq result carries the parameter count) and not
RESULT_FILES = (["@result_ptq", "@result_ptq", "@result_workflow", "@result_qat"],
                ["@result_array", "@result_string", "@result_nan", "@result_rows_object", "@result_row_no_ppl",
                 "@result_kv_cache", "@result_empty_rows", "@text_file", "@binary_txt", "no/such.json", "@empty_dir"])
BENCH_METHODS = (["rtn", "hqq", "rtn,gptq", "awq"], ["nope", "", ",", "qwix-magic"])
PTQ_SPECS = (["int8", "int4-g32", "int8,int4-g16-asym"], ["int9", "", ",", "bf16x"])
CALIB_SAMPLES = (["32"], ["31", "0", "2000", "x"])
CALIB_LENS = (["8", "16"], ["1", "0", "x", "100000"])
FLAG = None


@dataclasses.dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # the subcommand words
    positional: tuple[tuple[list, bool], ...] = ()  # (pool, required)
    options: dict = dataclasses.field(default_factory=dict)  # flag -> pool (None: a flag without value)
    always: tuple[str, ...] = ()  # options every example passes (keeps defaults that take minutes out)


COMMON = {"--json": FLAG}
SAMPLING = {"--max-tokens": INTS, "--temperature": FLOATS, "--top-k": INTS, "--top-p": PROBS, "--seed": SEEDS}
COMMANDS = {
    "generate": Command(("generate",), ((MODELS, True), (PROMPTS, True)),
                        {"--quant": RULES, **SAMPLING, "--chat": FLAG, "--bos": FLAG, "--no-bos": FLAG, "--kv": KVS,
                         "--tokenizer": TOKENIZERS, "--scale-dtype": SCALE_DTYPES, **COMMON}, ("--max-tokens",)),
    "run": Command(("run",), ((PROMPTS, False),),
                   {"--small": PAIR_RULES, "--large": PAIR_RULES, "--small-model": MODELS, "--large-model": MODELS,
                    "--mode": MODES, "--draft-len": INTS, **SAMPLING, "--kv": KVS, "--small-kv": KVS,
                    "--large-kv": KVS, "--scale-dtype": SCALE_DTYPES, "--rule": (["chow", "diff", "opt"], ["", "best"]),
                    "--alpha": (["0", "0.3", "1"], ["1.5", "-0.1", "nan", ""]),
                    "--defer-score": (["mean-logprob", "min-logprob", "quantile", "entropy"], ["", "vibes"]),
                    "--threshold": (["-1", "0", "-2.5"], ["nan", "inf", "x", ""]), "--prompts": DATA_FILES, **COMMON},
                   ("--max-tokens", "--small-model", "--large-model")),
    "eval": Command(("eval",), ((MODELS, True),),
                    {"--data": DATA_FILES, "--quant": RULES, "--ctx": (INTS[0], INTS[1] + ["4096"]), "--stride": INTS,
                     "--truncate": FLAG, "--limit": INTS, "--max-tokens": INTS, "--kv": KVS,
                     "--tokenizer": TOKENIZERS, "--scale-dtype": SCALE_DTYPES, **COMMON}, ("--data",)),
    "quantize": Command(("quantize",), (((MODELS[0] + WEIGHT_FILES[0], MODELS[1] + WEIGHT_FILES[1]), True),),
                        {"--quant": RULES, "-o": OUT_DIRS, "--overwrite": FLAG, "--tokenizer": TOKENIZERS,
                         "--axis": (["0", "1"], ["2", "-1", "x"]), "--scale-dtype": SCALE_DTYPES, **COMMON}, ("--quant",)),
    "inspect": Command(("inspect",), (((MODELS[0] + WEIGHT_FILES[0], MODELS[1] + WEIGHT_FILES[1]), True),),
                       {"--kv": KVS, "--ctx": INTS, "--tokenizer": TOKENIZERS, **COMMON}),
    "plan": Command(("plan",), (),
                    {"--small": PAIR_RULES, "--large": PAIR_RULES, "--small-model": MODELS, "--large-model": MODELS,
                     "--mode": PLAN_MODES, "--kv": KVS, "--small-kv": KVS, "--large-kv": KVS, "--ctx": INTS,
                     "--batch": INTS, "--draft-len": INTS, "--budget": BUDGETS, "--scale-dtype": SCALE_DTYPES,
                     "--mesh": (["tp=1", "tp=2"], ["tp=0", "tp=3", "tp=64", "x"]),
                     "--small-devices": (["1", "2"], ["0", "x"]), **COMMON}),
    "bench-matmul": Command(("bench", "matmul"), (),
                            {"--k": SMALL_DIMS, "--n": SMALL_DIMS, "--batch": BATCHES, "--spec": MM_SPECS,
                             "--repeats": (["1", "2"], ["0", "-1"]), "--warmup": (["0", "1"], ["-1"]),
                             "--backend": (["xla"], ["nope", ""]), "--out": OUT_FILES, **COMMON},
                            ("--k", "--n", "--repeats")),
    "bench-decode": Command(("bench", "decode"), ((MODELS, True),),
                            {"--spec": DECODE_SPECS, "--prompt": PROMPTS, "--tokens": (["3", "4"], ["2", "0", "x", ""]),
                             "--repeats": (["1"], ["0", "x"]), "--warmup": (["0"], ["-1"]), "--threads": INTS,
                             "--tokenizer": TOKENIZERS,
                             "--out": OUT_FILES, **COMMON},
                            ("--tokens", "--repeats", "--warmup", "--spec")),
    "bench-error": Command(("bench", "error"), (),
                           {"--spec": ERR_SPECS, "--k": SMALL_DIMS, "--n": SMALL_DIMS, "--out": OUT_FILES, **COMMON},
                           ("--k", "--n", "--spec")),
    "bench-ppl": Command(("bench", "ppl"), ((MODELS, True),),
                         {"--data": DATA_FILES, "--spec": PPL_SPECS, "--limit": INTS, "--ctx": INTS, "--stride": INTS,
                          "--no-truncate": FLAG, "--tokenizer": TOKENIZERS, "--out": OUT_FILES, **COMMON},
                         ("--data", "--spec")),
    "bench-kv": Command(("bench", "kv"), ((MODELS, True),),
                        {"--data": DATA_FILES, "--kv": KV_LISTS, "--ctx": INTS, "--stride": INTS,
                         "--min-context": INTS, "--concat": FLAG, "--max-tokens": INTS, "--limit": INTS,
                         "--gen-prompt": INTS, "--gen-tokens": INTS, "--tokenizer": TOKENIZERS, "--out": OUT_FILES,
                         **COMMON}, ("--data", "--kv")),
}
COMMANDS.update({
    "run-prompts": Command(("run",), (),
                           {"--prompts": PROMPT_FILES, "--small-model": MODELS, "--large-model": MODELS,
                            "--max-tokens": INTS, "--mode": MODES, "--temperature": FLOATS, **COMMON},
                           ("--prompts", "--max-tokens", "--small-model", "--large-model")),
    "compare": Command(("compare",), ((MODELS, True), (MODELS, True)),
                       {"--prompts": PROMPT_FILES, "--max-tokens": INTS, "--tokenizer": TOKENIZERS, **COMMON},
                       ("--prompts", "--max-tokens")),
    "bench-plot": Command(("bench", "plot"), ((RESULT_FILES, True), (RESULT_FILES, False), (RESULT_FILES, False)),
                          {"--out-dir": (["@out/plots", "@out"], ["@out/afile", "@out/afile/plots", ""]), **COMMON},
                          ("--out-dir",)),
    "bench-ptq": Command(("bench", "ptq"), ((TINY_MODELS, True),),
                         {"--calib": CALIB_FILES, "--data": DATA_FILES, "--spec": PTQ_SPECS, "--method": BENCH_METHODS,
                          "--calib-samples": CALIB_SAMPLES, "--calib-len": CALIB_LENS, "--limit": INTS,
                          "--ctx": (["16", "32"], ["1", "x"]), "--max-tokens": INTS, "--act-order": FLAG,
                          "--alpha": (["0.5", "auto", "0,1"], ["1.5", "x", "", "nan"]), "--tokenizer": TOKENIZERS,
                          "--out": OUT_FILES, **COMMON},
                         ("--calib", "--data", "--spec", "--method", "--calib-samples", "--calib-len", "--limit", "--ctx")),
    "bench-workflow": Command(("bench", "workflow"), ((TINY_MODELS, True),),
                              {"--calib": CALIB_FILES, "--data": (["@val_small", "@calib_txt"], DATA_FILES[1]),
                               "--target": (["int8", "int4-g32"], ["int9", "", ","]),
                               "--candidates": (["int8,int4-g32", "bf16,int8,int4-g16"], ["", "int9", "int8,int8"]),
                               "--method": (["rtn", "rtn,hqq"], ["nope", "", ","]),
                               "--granularity": (["layer", "block"], ["", "row"]), "--calib-samples": CALIB_SAMPLES,
                               "--calib-len": CALIB_LENS, "--limit": INTS, "--ctx": (["16", "32"], ["1", "x"]),
                               "--max-tokens": INTS, "--kv": (["none", "int8", "int4"], ["int5", "", "int4-g7"]),
                               "--long-ctx": (["16", "32"], ["4", "x"]), "--long-tokens": (["32"], ["0", "x"]),
                               "--sens-samples": (["1", "2"], ["0", "x"]),
                               "--sensitivity": (["@val_small"], ["no/such.json", "@empty_dir"]),
                               "--out": OUT_FILES, **COMMON},
                              ("--calib", "--data", "--target", "--candidates", "--method", "--calib-samples",
                               "--calib-len", "--limit", "--ctx", "--sens-samples", "--kv")),
    "qat": Command(("qat",), (((["@tiny_ckpt", "@tiny_ckpt", "@tiny_hf"], TINY_MODELS[1]), True),),
                   {"--quant": RULES, "--data": DATA_FILES, "--val": DATA_FILES, "--steps": (["1", "2"], ["0", "x"]),
                    "--lr": (["1e-4", "1e-3"], ["0", "-1", "nan", "x"]), "--warmup": (["0", "1"], ["-1", "x"]),
                    "--batch-size": (["1", "2"], ["0", "x"]), "--seq-len": (["8", "16"], ["1", "x", "4096"]),
                    "--eval-every": (["1", "2"], ["0"]), "--seed": SEEDS, "--learn-clip": FLAG,
                    "--clip-rate": (["2"], ["0", "-1", "nan"]), "--distill": FLAG,
                    "--teacher": (["@tiny_hf"], ["@ckpt_damaged", "no/such/model", "@text_file"]), "-o": OUT_DIRS,
                    "--run-dir": (["@out/run"], ["@out/afile", "@out/afile/run", ""]), "--overwrite": FLAG,
                    "--tokenizer": TOKENIZERS, "--scale-dtype": SCALE_DTYPES, **COMMON},
                   ("--data", "--steps", "--seq-len", "--batch-size", "-o")),
})
NOISE = ["--nope", "extra-arg", "-x", "--json=1", "--"]


def values(pool: tuple[list, list]) -> st.SearchStrategy:
    """A valid value of the pool 6 times in 7, an invalid one otherwise."""
    valid, invalid = pool
    # (hypothesis starts from the simplest choices, integers at 0: make 0 the valid side)
    return st.integers(0, 6).flatmap(lambda i: st.sampled_from(invalid if i == 6 else valid))


@st.composite
def argv_for(draw, name: str) -> list[str]:
    cmd = COMMANDS[name]
    args = list(cmd.path)
    for pool, required in cmd.positional:
        if required or draw(st.booleans()):
            if draw(st.integers(0, 19)) == 19:  # sometimes a required argument is missing
                break
            args.append(draw(values(pool)))
    chosen = [flag for flag in cmd.options if flag in cmd.always or draw(st.integers(0, 4)) == 4]
    pairs = []
    for flag in draw(st.permutations(chosen)):
        pool = cmd.options[flag]
        pairs.append([flag] if pool is None else [flag, draw(values(pool))])
    if draw(st.integers(0, 9)) == 9:
        pairs.insert(draw(st.integers(0, len(pairs))), [draw(st.sampled_from(NOISE))])
    return args + [a for p in pairs for a in p]


# ---------------------------------------------------------------------------------- files on disk

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Small models, damaged ones, rules and text files, made once for the module."""
    import jax

    from cascade.models import load_model, quantize_model, save_checkpoint
    from cascade.models.config import ModelConfig
    from cascade.models.defaults import default_model_dir
    from cascade.models.export import save_hf
    from cascade.models.llama import init_params
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("fuzz")
    f = {}
    small_dir = default_model_dir("default-small")
    tiny = ModelConfig(vocab_size=2048, dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                       max_seq_len=128, bos_token_id=1, eos_token_ids=(2,))
    f["tiny_hf"] = save_hf(init_params(tiny, jax.random.key(0)), tiny, d / "tiny_hf", tokenizer_dir=small_dir)
    save_checkpoint(d / "tiny_ckpt", quantize_model(load_model(f["tiny_hf"]), "int4-g32", progress=False)[0])
    f["tiny_ckpt"] = str(d / "tiny_ckpt")
    shutil.copytree(d / "tiny_ckpt", d / "ckpt_damaged")
    biggest = max((p for p in (d / "ckpt_damaged").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    f["ckpt_damaged"] = str(d / "ckpt_damaged")
    shutil.copytree(small_dir, d / "hf_truncated")
    st_file = d / "hf_truncated" / "model.safetensors"
    st_file.write_bytes(st_file.read_bytes()[: st_file.stat().st_size // 2])
    f["hf_truncated"] = str(d / "hf_truncated")
    shutil.copytree(small_dir, d / "hf_bad_config")
    cfg = json.loads((d / "hf_bad_config" / "config.json").read_text())
    (d / "hf_bad_config" / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    f["hf_bad_config"] = str(d / "hf_bad_config")
    rng = np.random.default_rng(0)
    (d / "garbage.gguf").write_bytes(b"GGUF" + rng.bytes(300))
    (d / "garbage.bin").write_bytes(rng.bytes(200))
    f["garbage_gguf"], f["garbage_bin"] = str(d / "garbage.gguf"), str(d / "garbage.bin")
    (d / "empty_dir").mkdir()
    f["empty_dir"] = str(d / "empty_dir")
    (d / "notes.txt").write_text("not a model\n")
    f["text_file"] = str(d / "notes.txt")
    f["stories_bin"] = os.path.join(DATA, "stories260K", "stories260K.bin")
    f["tok"] = os.path.join(DATA, "stories260K", "tok512.model")
    w = {"layers.0.mlp.up.weight": rng.standard_normal((16, 24)).astype(np.float32),
         "layers.0.input_layernorm.weight": np.ones(24, np.float32)}
    save_file(w, str(d / "w.safetensors"))
    np.savez(d / "w.npz", **w)
    (d / "trunc.npz").write_bytes((d / "w.npz").read_bytes()[:100])
    f["weights_st"], f["weights_npz"], f["weights_truncated"] = str(d / "w.safetensors"), str(d / "w.npz"), str(
        d / "trunc.npz")
    (d / "rules.json").write_text(json.dumps({"__default__": "int4-g32", "rules": [["attn", "int8"]]}))
    (d / "bad_rules.json").write_text("{not json")
    f["rules_json"], f["rules_bad_json"] = str(d / "rules.json"), str(d / "bad_rules.json")
    (d / "val.txt").write_text("Once upon a time, there was a dog.\n<|endoftext|>\nThe cat sat on the mat.\n"
                               "<|endoftext|>\nLily liked to play in the park with her ball.\n")
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00bad bytes \xc3\x28")
    (d / "eot.txt").write_text("<|endoftext|>\n<|endoftext|>\n")
    f["val_small"], f["empty_txt"], f["binary_txt"], f["eot_only"] = (str(d / n) for n in (
        "val.txt", "empty.txt", "binary.txt", "eot.txt"))
    with open(os.path.join(DATA, "text", "tinystories_val.txt"), encoding="utf-8") as src:
        (d / "calib.txt").write_text(src.read(20000))  # enough documents for 32 calibration windows
    (d / "prompts.txt").write_text("Once upon a time\nThe dog\n")
    (d / "prompts_blank.txt").write_text("\n  \nOnce upon a time\n\t\n\nhéllo ✓\n   \n")
    (d / "prompts_crlf.txt").write_bytes(b"Once upon a time\r\nThe cat\r\n")
    (d / "blank_only.txt").write_text("\n \n\t\n")
    (d / "nul.txt").write_bytes(b"Once\x00upon\n")
    for key, name in (("calib_txt", "calib.txt"), ("prompts_txt", "prompts.txt"), ("prompts_blank_lines", "prompts_blank.txt"),
                      ("prompts_crlf", "prompts_crlf.txt"), ("blank_only", "blank_only.txt"), ("nul_txt", "nul.txt")):
        f[key] = str(d / name)
    ptq = {"benchmark": "ptq", "model": "tiny.bin", "float_ppl": 3.5, "float_weight_bytes": 4000, "data": "/d/val.txt",
           "rows": [{"spec": "int4", "method": "rtn", "ppl": 4.0, "weight_bytes": 500},
                    {"spec": "int3", "method": "gptq", "ppl": 5.0, "weight_bytes": 400}]}
    results = {
        "result_ptq": ptq,
        "result_workflow": {"benchmark": "workflow", "model": "tiny.bin", "float_ppl": 3.5, "data": "/d/val.txt",
                            "rows": [{"target": "int3", "config": "auto", "method": "rtn", "ppl": 4.5, "weight_bytes": 400}]},
        "result_qat": {"benchmark": "qat", "model": "tiny.bin", "float_ppl": 3.5, "float_weight_bytes": 4000,
                       "data": "/d/val.txt", "spec": "int3", "rows": [{"stage": "qat", "ppl": 4.2, "weight_bytes": 400}]},
        "result_array": [1, 2], "result_string": "results",
        "result_nan": {**ptq, "float_ppl": float("nan")}, "result_rows_object": {**ptq, "rows": {}},
        "result_row_no_ppl": {**ptq, "rows": [{"spec": "int4", "method": "rtn", "weight_bytes": 500}]},
        "result_kv_cache": {"benchmark": "kv_cache", "rows": []}, "result_empty_rows": {**ptq, "rows": []}}
    for key, value in results.items():
        (d / f"{key}.json").write_text(json.dumps(value))  # NaN is written as NaN, as Python's json reads it
        f[key] = str(d / f"{key}.json")
    return f


def _resolve(argv: list[str], files: dict, out: str) -> list[str]:
    def one(a: str) -> str:
        if a.startswith("@out"):
            return out + a[4:]
        return files[a[1:]] if a.startswith("@") else a

    return [one(a) for a in argv]


def _prepare_out(out: str, files: dict) -> None:
    os.makedirs(out)
    shutil.copytree(files["tiny_ckpt"], os.path.join(out, "taken"))  # an existing checkpoint to refuse or replace
    with open(os.path.join(out, "afile"), "w") as f:
        f.write("user data\n")


def _tree(root: str) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` (hidden ones too) with its size and mtime."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            snap[os.path.relpath(p, root)] = (s.st_size if name in filenames else 0, s.st_mtime_ns)
    return snap


def invoke(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _strict_json(text: str) -> dict:
    def bad_constant(name):
        raise ValueError(f"non-strict JSON constant {name}")

    obj = json.loads(text, parse_constant=bad_constant)
    assert isinstance(obj, dict)
    return obj


def check_invariants(argv: list[str], code: int, out: str, err: str, before: dict, after: dict) -> None:
    shown = " ".join(repr(a) if not a or " " in a else a for a in argv)
    assert code in (0, 1, 2), f"exit {code}: cascade {shown}\n{err}"
    assert "Traceback" not in err and "internal error" not in err, f"cascade {shown}\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    # `run --prompts` reports each prompt on its own (README): with --json one object per line, and a prompt
    # that failed is its own error line (or, with --json, an object with "error") while the others complete
    batch = argv[:1] == ["run"] and "--prompts" in argv
    rows = [_strict_json(line) for line in out.splitlines()] if batch and "--json" in argv else []
    if code == 0:
        assert not errors, f"exit 0 with an error line: cascade {shown}\n{err}"
        if "--json" in argv and not batch:
            assert out.count("\n") == 1, f"--json printed {out.count(chr(10))} lines: cascade {shown}"
            _strict_json(out)
        assert not any("error" in r for r in rows), f"exit 0 with a failed row: cascade {shown}\n{out}"
    else:
        some_rows_failed = batch and code == 1 and (len(errors) > 1 or any("error" in r for r in rows))
        assert some_rows_failed or len(errors) == 1, f"exit {code} with {len(errors)} error lines: cascade {shown}\n{err}"
        assert after == before, f"exit {code} changed the output directory: cascade {shown}\n" \
                                f"added {sorted(set(after) - set(before))}, removed {sorted(set(before) - set(after))}"
        if out and "--json" in argv and not batch:  # e.g. `plan --budget` prints its plan, then says it does not fit
            _strict_json(out)


@pytest.mark.parametrize("name", list(COMMANDS))
@settings(max_examples=EXAMPLES, derandomize=not EXPLORE, database=None, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_cli_fuzz(files, tmp_path_factory, name, data):
    argv = data.draw(argv_for(name), label="argv")
    out = os.path.join(str(tmp_path_factory.mktemp("out")), "out")
    _prepare_out(out, files)
    argv = _resolve(argv, files, out)
    before = _tree(out)
    code, stdout, stderr = invoke(argv)
    event(f"exit {code}")  # --hypothesis-show-statistics shows how often each outcome was reached
    check_invariants(argv, code, stdout, stderr, before, _tree(out))
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)


def test_the_fuzzer_reaches_success_and_both_error_codes(files, tmp_path):
    """The invariants are checked on all three outcomes (a fuzzer that only ever hits usage errors
    would check little): one hand-picked argument list of each kind through the same checks."""
    cases = {0: ["generate", "default-small", "hi", "--max-tokens", "2", "--json"],
             1: ["eval", "@ckpt_damaged", "--data", "@val_small"],
             2: ["generate", "default-small", "hi", "--kv", "int4-s99999"]}
    out = str(tmp_path / "out")
    _prepare_out(out, files)
    for want, argv in cases.items():
        argv = _resolve(argv, files, out)
        before = _tree(out)
        code, stdout, stderr = invoke(argv)
        assert code == want, (argv, stderr)
        check_invariants(argv, code, stdout, stderr, before, _tree(out))
    with pytest.raises(AssertionError, match="error lines"):  # and the checks can fail
        check_invariants(["x"], 1, "", "error: a\nerror: b\n", {}, {})
    with pytest.raises(AssertionError, match="changed the output directory"):
        check_invariants(["x"], 1, "", "error: a\n", {}, {"half.json": (3, 0)})
    with pytest.raises(ValueError, match="non-strict"):
        check_invariants(["x", "--json"], 0, '{"a": NaN}\n', "", {}, {})
