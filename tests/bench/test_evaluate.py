"""`scripts/evaluate.py --quick`: every section runs on this backend and the report is complete and
consistent with its sections; bad input is one line and exit 2."""

import json
import os
import subprocess
import sys

import pytest

from cascade.bench import evaluate
from cascade.bench.cascade import acceptance_at
from cascade.speculative import SpeculativeStats

from tests.shared_data import DATA

VAL = os.path.join(DATA, "text", "tinystories_val.txt")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_acceptance_at_pools_generations_by_position():
    a = SpeculativeStats(accepted_at=[3, 1, 0], offered_at=[4, 4, 2])
    b = SpeculativeStats(accepted_at=[1, 1], offered_at=[2, 2])
    c = SpeculativeStats(accepted_at=[0, 0, 0, 0], offered_at=[1, 1, 1, 0])  # position 4 never offered
    assert acceptance_at([a, b, c]) == [round(4 / 7, 4), round(2 / 7, 4), 0.0, None]
    assert acceptance_at([]) == []


def test_evaluate_quick_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(["--out", str(out), "--quick", "--data", VAL]) == 0
    assert "report:" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["benchmark"] == "evaluate" and report["quick"] is True and report["device"].startswith("cpu")
    assert list(report["sections"]) == list(evaluate.SECTIONS)
    sec = report["sections"]
    quick = evaluate.SETTINGS[True]
    # each section is its benchmark's own result, at the quick settings
    assert {r["spec"] for r in sec["matmul"]["rows"]} == {"fp32", *quick["matmul"]["specs"]}
    assert all(r["speedup_vs_f32"] > 0 for r in sec["matmul"]["rows"])
    assert [r["spec"] for r in sec["decode"]["rows"]] == list(quick["decode"]["specs"])
    assert all(r["tokens_per_s"] > 0 for r in sec["decode"]["rows"])
    ptq = {(r["spec"], r["method"]): r for r in sec["ptq"]["rows"]}
    assert set(ptq) == {(s, m) for s in quick["ptq"]["specs"] for m in quick["ptq"]["methods"]}
    assert ptq[("int3-g32", "rtn")]["ppl"] > ptq[("int8", "rtn")]["ppl"] > 0  # fewer bits, worse
    assert [r["kv"] for r in sec["kv"]["rows"]] == list(quick["kv"]["kvs"])
    modes = [r["mode"] for r in sec["cascade"]["rows"]]
    assert modes[0] == "large" and "speculative" in modes and sec["cascade"]["prompts"] == 4
    for r in sec["cascade"]["rows"]:
        if r["mode"] == "speculative":
            assert r["agreement"] == 1.0  # exact speculation: the large model's own output
            offered = [x for x in r["acceptance_at"] if x is not None]
            assert offered and all(0 <= x <= 1 for x in offered)
    # the markdown has every section's table and links every plot, and the plots are PNG files
    md = (out / "report.md").read_text()
    for title in ("Dequant-matmul", "Decode speed", "Perplexity per method", "KV-cache", "The cascade"):
        assert f"## {title}" in md
    names = sorted(os.path.basename(p) for p in report["plots"])
    assert names == ["acceptance-per-position.png", "cost-quality.png", "ppl-vs-bits-default-small.png",
                     "tokens-per-s.png"]
    for name in names:
        assert f"]({name})" in md
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.system  # another process
@pytest.mark.parametrize("args, message", [
    (["--sections", "matmul,nope"], "unknown section 'nope'"),
    (["--data", "/nonexistent/text.txt"], "no such text file"),
])
def test_evaluate_bad_input_is_one_line(tmp_path, args, message):
    """Through the script itself, as a user runs it: exit 2, one line, no report written."""
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--out", str(out), "--quick",
                           "--data", VAL, *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "report.json").exists()


def test_evaluate_quick_runs_on_the_packaged_sample_from_any_directory(tmp_path, monkeypatch, capsys):
    """An installed (non-editable) package has no ../shared/data beside it: --quick used to fail with
    "no such text file"; it scores the validation sample shipped with the default pair instead."""
    from cascade.models import defaults

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate, "DEFAULT_DATA", str(tmp_path / "no-checkout" / "tinystories_val.txt"))
    assert evaluate.main(["--out", "eval", "--quick", "--sections", "kv"]) == 0
    out, err = capsys.readouterr()
    assert "report: eval/report.md" in out, err
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    sample = os.path.join(os.path.dirname(defaults.__file__), "tinystories-val-sample.txt")
    assert report["data"] == sample and os.path.isfile(sample)
    assert [r["kv"] for r in report["sections"]["kv"]["rows"]] == list(evaluate.SETTINGS[True]["kv"]["kvs"])
    assert all(r["tokens"] > 0 and r["ppl"] > 1 for r in report["sections"]["kv"]["rows"])
    # the full suite needs more text than the sample: without the shared data, one line and exit 2, before any work
    assert evaluate.main(["--out", "full"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and "pass --data FILE" in err
    assert not (tmp_path / "full").exists()


@pytest.mark.system  # another process
def test_evaluate_help_works_from_any_directory(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--help"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "--quick" in proc.stdout and proc.stderr == ""
    assert "validation sample shipped with the default pair" in " ".join(proc.stdout.split())
