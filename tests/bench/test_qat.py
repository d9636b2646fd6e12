"""`cascade bench qat`: PTQ, then QAT from it, scored on the same windows."""

import json
import os

from cascade import cli
from cascade.bench.qat import table

from tests.shared_data import DATA

BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
TRAIN = os.path.join(DATA, "text", "tinystories_train_00.txt")
TRAIN_QAT = os.path.join(DATA, "text", "tinystories_train_01.txt")
VAL = os.path.join(DATA, "text", "tinystories_val.txt")


def test_bench_qat_rows(capsys, tmp_path):
    out_file, run_dir = tmp_path / "qat.json", tmp_path / "run"
    code = cli.main(["bench", "qat", BIN, "--calib", TRAIN, "--train", TRAIN_QAT, "--data", VAL, "--spec", "int2-g16-narrow",
                     "--method", "gptq", "--steps", "30", "--lr", "1e-3", "--batch-size", "4", "--seq-len", "64",
                     "--calib-samples", "32", "--calib-len", "64", "--limit", "10", "--ctx", "128", "--max-tokens", "1024",
                     "--run-dir", str(run_dir), "--learn-clip", "--distill", "--json", "--out", str(out_file)])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d == json.loads(out_file.read_text()) and d["benchmark"] == "qat" and "partial" not in d
    rtn, ptq, qat = d["rows"]
    assert [r["stage"] for r in d["rows"]] == ["rtn", "ptq", "qat"]
    assert (rtn["method"], ptq["method"], qat["method"]) == ("rtn", "gptq", "qat")
    assert rtn["tokens"] == ptq["tokens"] == qat["tokens"] and rtn["weight_bytes"] == qat["weight_bytes"]
    f = d["float_ppl"]
    assert abs(qat["gap_closed"] - (ptq["ppl"] - qat["ppl"]) / (ptq["ppl"] - f)) < 1e-12
    assert abs(ptq["gap_closed"] - (rtn["ppl"] - ptq["ppl"]) / (rtn["ppl"] - f)) < 1e-12
    assert qat["steps"] == 30 and qat["train_tokens"] == 30 * 4 * 64
    assert qat["ppl"] < ptq["ppl"]  # 30 steps at int2 (three levels: far from float) already recover some of the loss
    assert (run_dir / "loss.csv").exists() and d["train"]["learn_clip"] is True
    assert d["train"]["distill"] is True and "distilled from the float model" in table(d).splitlines()[0]
    run_json = json.loads((run_dir / "run.json").read_text())["qat"]
    assert run_json["learn_clip"] is True and run_json["teacher"] == BIN
    assert f"{qat['gap_closed']:.0%}" in table(d).splitlines()[-1]
    assert cli.main(["bench", "qat", BIN, "--calib", TRAIN, "--train", TRAIN, "--data", VAL, "--spec", "int9"]) == 2
