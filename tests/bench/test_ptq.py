"""`cascade bench ptq`: rows for every spec x method against the float model, on the same tokens."""

import json
import os

from cascade import cli

from tests.shared_data import DATA

BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
TRAIN = os.path.join(DATA, "text", "tinystories_train_00.txt")
VAL = os.path.join(DATA, "text", "tinystories_val.txt")
SHAKESPEARE = os.path.join(DATA, "text", "tinyshakespeare.txt")


def test_bench_ptq_saves_each_row_as_it_goes():
    """``on_row`` sees the result grow one row at a time, marked partial; the last call has every row."""
    from cascade.bench import ptq

    seen = []
    d = ptq.run(BIN, TRAIN, VAL, specs=("int4-g32",), methods=("rtn", "hqq"), samples=32, length=64, limit=5,
                ctx=128, on_row=lambda r: seen.append((r["partial"], len(r["rows"]), json.dumps(r))))
    assert [(p, n) for p, n, _ in seen] == [(True, 1), (True, 2)] and "partial" not in d
    assert json.loads(seen[-1][2])["rows"] == d["rows"]


def test_bench_ptq_rows(capsys, tmp_path):
    out_file = tmp_path / "ptq.json"
    code = cli.main(["bench", "ptq", BIN, "--calib", TRAIN, "--data", VAL, "--data", SHAKESPEARE,
                     "--spec", "int3-g32,int4-g32-asym", "--method", "rtn,hqq", "--calib-samples", "32",
                     "--calib-len", "64", "--limit", "10", "--ctx", "128", "--max-tokens", "2048", "--json",
                     "--out", str(out_file)])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d == json.loads(out_file.read_text()) and d["benchmark"] == "ptq" and d["cores"] >= 1
    assert "partial" not in d and err.count("ppl ") == 8  # one progress line per finished row
    assert d["calibration"]["samples"] == 32 and d["ctx"] == 128 and d["documents"] == 10 and d["data"] == VAL
    floats = {e["data"]: e["float_ppl"] for e in d["evaluations"]}
    assert list(floats) == [VAL, SHAKESPEARE] and floats[VAL] == d["float_ppl"] and floats[SHAKESPEARE] > floats[VAL]
    rows = {(r["spec"], r["method"], r["data"]): r for r in d["rows"]}
    assert set(rows) == {(s, m, f) for s in ("int3-g32", "int4-g32-asym") for m in ("rtn", "hqq") for f in floats}
    for f in floats:
        tokens = {r["tokens"] for r in d["rows"] if r["data"] == f}
        assert len(tokens) == 1  # every row scores the same tokens of one file
        rtn, hqq = rows[("int3-g32", "rtn", f)], rows[("int3-g32", "hqq", f)]
        assert rtn["gap_closed"] == 0.0
        assert hqq["ppl"] < rtn["ppl"]
        assert abs(hqq["gap_closed"] - (rtn["ppl"] - hqq["ppl"]) / (rtn["ppl"] - floats[f])) < 1e-12
    for (spec, method, f), r in rows.items():
        assert abs(r["delta_ppl"] - (r["ppl"] - floats[f])) < 1e-9
        assert 0 < r["kld_mean"] <= r["kld_p99"] and 0 < r["top1_agreement"] < 1 and r["weight_bytes"] > 0
        # one quantized model per spec and method, scored on both files
        assert r["weight_bytes"] == rows[(spec, method, VAL)]["weight_bytes"]
        assert r["seconds"] == rows[(spec, method, VAL)]["seconds"]
    assert cli.main(["bench", "ptq", BIN, "--calib", TRAIN, "--data", VAL, "--method", "rtn,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def _spy_on_quantize(monkeypatch, setting: str) -> list:
    """Record ``(method, kwargs[setting])`` of every quantize_model call bench ptq makes."""
    from cascade.models import quantize as ptq  # bench ptq quantizes through quantize_with_method

    calls = []
    real = ptq.quantize_model

    def spy(model, spec, **kw):
        calls.append((kw["method"], kw.get(setting)))
        return real(model, spec, **kw)

    monkeypatch.setattr(ptq, "quantize_model", spy)
    return calls


def test_bench_ptq_act_order_reaches_gptq(monkeypatch):
    """``act_order`` goes to the GPTQ-based methods only, and the result records it."""
    from cascade.bench import ptq

    calls = _spy_on_quantize(monkeypatch, "act_order")
    d = ptq.run(BIN, TRAIN, VAL, specs=("int4-g32",), methods=("rtn", "gptq"), samples=32, length=64, limit=3,
                ctx=128, max_tokens=512, act_order=True)
    assert calls == [("rtn", None), ("gptq", True)] and d["act_order"] is True


def test_bench_ptq_alphas_reach_smoothquant(monkeypatch, capsys):
    """``--alpha`` gives one set of smoothquant rows per migration strength (each passed to the
    quantizer and recorded); other methods run once, without it."""
    calls = _spy_on_quantize(monkeypatch, "alpha")
    code = cli.main(["bench", "ptq", BIN, "--calib", TRAIN, "--data", VAL, "--spec", "w8a8", "--method",
                     "rtn,smoothquant", "--alpha", "0.25,auto,0.75", "--calib-samples", "32", "--calib-len", "64",
                     "--limit", "3", "--ctx", "128", "--max-tokens", "512", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert calls == [("rtn", None), ("smoothquant", 0.25), ("smoothquant", "auto"), ("smoothquant", 0.75)]
    assert [(r["method"], r.get("alpha")) for r in d["rows"]] == calls
    a, b = d["rows"][1], d["rows"][3]
    assert a["ppl"] != b["ppl"]  # the strength changes the smoothing, so the model
    from cascade.bench import ptq

    assert "smoothquant α=auto" in ptq.table(d)
    for bad, msg in (("0.5,2", "not in [0, 1]"), ("x", "neither a number in [0, 1] nor 'auto'"), ("nan", "not in [0, 1]")):
        assert cli.main(["bench", "ptq", BIN, "--calib", TRAIN, "--data", VAL, "--method", "smoothquant",
                         "--alpha", bad]) == 2
        assert msg in capsys.readouterr().err
    assert cli.main(["bench", "ptq", BIN, "--calib", TRAIN, "--data", VAL, "--method", "rtn", "--alpha", "0.5"]) == 2
    assert "only to --method smoothquant" in capsys.readouterr().err
