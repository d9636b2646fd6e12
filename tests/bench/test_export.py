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
    result = export.run(model, VAL, llamacpp=_fake_llamacpp(tmp_path), methods=("rtn",), limit=3, prompts=2,
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
