"""`cascade bench ptq`: rows for every spec x method against the float model, on the same tokens."""

import json
import os

from cascade import cli

from tests.shared_data import DATA

BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
TRAIN = os.path.join(DATA, "text", "tinystories_train_00.txt")
VAL = os.path.join(DATA, "text", "tinystories_val.txt")


def test_bench_ptq_rows(capsys, tmp_path):
    out_file = tmp_path / "ptq.json"
    code = cli.main(["bench", "ptq", BIN, "--calib", TRAIN, "--data", VAL, "--spec", "int3-g32,int4-g32-asym",
                     "--method", "rtn,hqq", "--calib-samples", "32", "--calib-len", "64", "--limit", "10",
                     "--ctx", "128", "--json", "--out", str(out_file)])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d == json.loads(out_file.read_text()) and d["benchmark"] == "ptq" and d["cores"] >= 1
    assert d["calibration"]["samples"] == 32 and d["ctx"] == 128 and d["documents"] == 10
    rows = {(r["spec"], r["method"]): r for r in d["rows"]}
    assert set(rows) == {(s, m) for s in ("int3-g32", "int4-g32-asym") for m in ("rtn", "hqq")}
    tokens = {r["tokens"] for r in d["rows"]}
    assert len(tokens) == 1  # every row scores the same tokens
    for (spec, method), r in rows.items():
        assert abs(r["delta_ppl"] - (r["ppl"] - d["float_ppl"])) < 1e-9
        assert 0 < r["kld_mean"] <= r["kld_p99"] and 0 < r["top1_agreement"] < 1 and r["weight_bytes"] > 0
    assert rows[("int3-g32", "rtn")]["gap_closed"] == 0.0
    hqq = rows[("int3-g32", "hqq")]
    assert hqq["ppl"] < rows[("int3-g32", "rtn")]["ppl"] and 0 < hqq["gap_closed"] < 1
    assert cli.main(["bench", "ptq", BIN, "--calib", TRAIN, "--data", VAL, "--method", "rtn,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
