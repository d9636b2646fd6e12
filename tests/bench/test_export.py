"""bench export: the rows it builds from cascade's side and llama.cpp's (a stand-in here: the real
llama.cpp check is the benchmark itself, bench/results/export-*.json)."""

import json
import math
import stat
import sys

import pytest

from cascade.bench import export
from cascade.models import load_model
from tests.shared_data import DATA

VAL = str(DATA / "text" / "tinystories_val.txt")

FAKE = '''
import json, math, sys
job = json.load(open(sys.argv[sys.argv.index("--job") + 1]))
ctx = job["ctx"]
count = sum(len(d[:ctx]) - 1 for d in job["docs"])
quantized = None
if job.get("quantize"):
    quantized = job["quantize"]["out"]
    open(quantized, "wb").write(b"GGUF-stand-in")
json.dump({"nll": count * math.log(5.0), "count": count, "version": "0.0-test", "quantized": quantized,
           "continuations": [p[-1:] * job["tokens"] for p in job["prompts"]],
           "tokenized": [[1, 2] for _ in job["texts"]]}, sys.stdout)
'''


def _fake_llamacpp(tmp_path):
    """An executable standing in for llama.cpp's venv Python (bench/llamacpp_eval.py's output)."""
    script = tmp_path / "fake_eval.py"
    script.write_text(FAKE)
    exe = tmp_path / "python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_rows_compare_both_sides_on_the_same_tokens(tmp_path):
    model = load_model("default-small")
    result = export.run(model, VAL, llamacpp=_fake_llamacpp(tmp_path), methods=("rtn",), quant="embed=int8-g32,*=int4-g32", limit=3, prompts=2,
                        tokens=4, llamacpp_q4_0=True, keep=str(tmp_path / "files"), progress=False)
    rtn, peer = result["rows"]
    assert result["tokens"] == sum(len(d) - 1 for d in export.tokenize_documents(
        model.tokenizer, export.split_documents(open(VAL, encoding="utf-8").read())[:3]))
    assert rtn["ppl_cascade"] == rtn["ppl_roundtrip"]  # Q4_0 round trip: the same model
    assert rtn["ppl_llamacpp"] == pytest.approx(5.0)
    assert rtn["ppl_gap_pct"] == pytest.approx(100 * (5.0 / rtn["ppl_cascade"] - 1))
    assert rtn["file_type"] == "MOSTLY_Q4_0" and rtn["requantized"] == [] and rtn["prompts"] == 2
    assert rtn["same_continuations"] == 0 and rtn["tokenizer_equal"] is False  # the stand-in answers otherwise
    assert peer["method"] == "llama.cpp quantize" and peer["ppl_llamacpp"] == pytest.approx(5.0)
    assert (tmp_path / "files" / "float-f32.gguf").exists()
    table = export.format_table(result)
    assert "llama.cpp quantize" in table and "DIFFERS" in table
    json.dumps(result, allow_nan=False)


def test_agreement_counts_whole_continuations():
    assert export._agreement([[1, 2, 3], [1, 2, 3], [4]], [[1, 2, 3], [1, 9, 3], [5]], 3) == (1, (3 + 1 + 0) / 3)


def test_the_export_tables_join_results_with_llamacpps_own_q4_0_beside_them(tmp_path):
    from cascade.bench import tables

    def row(asked, method, ppl, theirs, same):
        return {"asked": asked, "method": method, "spec": "int4-g32", "file_type": "MOSTLY_Q4_0", "ppl_cascade": ppl,
                "ppl_llamacpp": theirs, "ppl_gap_pct": None if ppl is None else 100 * (theirs / ppl - 1),
                "same_continuations": same, "prompts": 8, "tokenizer_equal": True, "file_bytes": 2_500_000,
                "first_difference": None if same is None else 30.5}

    (tmp_path / "a.json").write_text(json.dumps({"benchmark": "export", "rows": [
        row("rtn", "rtn", 2.0, 2.002, 7), row("default", "awq-gptq", 1.9, 1.9, 8),
        row("llamacpp-q4_0", "llama.cpp quantize", None, 1.95, None)]}))
    summary = {"benchmark": "export-summary", "sources": [{"file": "a", "label": "m"}]}
    (tmp_path / "s.json").write_text(json.dumps(summary))
    (tmp_path / "r.json").write_text(json.dumps({**summary, "view": "readme"}))
    lines = tables.table("s", tmp_path).splitlines()
    assert len(lines) == 4 and lines[2] == ("| m | rtn | `int4-g32` | 2.0000 | 2.0020 | +0.100% | 7/8 | 30.5 | 2.50 "
                                            "| 1.9500 | 2.50 |")
    assert tables.table("r", tmp_path).splitlines()[2:] == ["| m | awq-gptq | 1.9000 | 1.9000 | +0.000% | 8/8 | 2.50 | 1.9500 | 2.50 |"]
    assert "llama.cpp quantize" in tables.table("a", tmp_path)
