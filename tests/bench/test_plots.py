"""`cascade bench plot`: the points of each curve, the Pareto front, and the files written."""

import glob
import json
import math
import os

import pytest

from cascade import cli
from cascade.bench.plots import check_result, pareto, points


def _results():
    ptq = {"benchmark": "ptq", "model": "/x/stories260K.bin", "float_ppl": 3.5, "float_weight_bytes": 4000,
           "data": "/d/val.txt", "rows": [
               {"spec": "int4", "method": "rtn", "data": "/d/val.txt", "ppl": 4.0, "weight_bytes": 500},
               {"spec": "int3", "method": "rtn", "data": "/d/val.txt", "ppl": 6.0, "weight_bytes": 400},
               {"spec": "int2", "method": "rtn", "data": "/d/val.txt", "ppl": 9.0, "weight_bytes": 450},
               {"spec": "int4", "method": "rtn", "data": "/d/wiki.txt", "ppl": 40.0, "weight_bytes": 500}]}
    workflow = {"benchmark": "workflow", "model": "../x/stories260K.bin", "float_ppl": 3.5, "data": "/d/val.txt",
                "rows": [{"target": "int3", "config": "auto", "method": "gptq", "ppl": 3.9, "weight_bytes": 400},
                         {"target": "int3", "config": "uniform", "method": "gptq", "ppl": 5.0, "weight_bytes": 400}]}
    qat = {"benchmark": "qat", "model": "stories260K.bin", "float_ppl": 3.5, "float_weight_bytes": 4000,
           "data": "/d/val.txt", "spec": "int3", "rows": [
               {"stage": "ptq", "ppl": 5.0, "weight_bytes": 400}, {"stage": "qat", "ppl": 4.2, "weight_bytes": 400}]}
    return [ptq, workflow, qat]


def test_points_per_curve_in_bits_a_weight_of_the_whole_model():
    (key, plot), = points(_results()).items()  # one model, one scored file: the wiki row is another evaluation
    assert key == ("stories260K", "val.txt", 3.5) and plot["float_ppl"] == 3.5
    # 1000 parameters (4000 float32 bytes): 400 bytes are 3.2 bits a weight
    assert plot["curves"]["rtn"] == [(3.2, 6.0, "int3"), (3.6, 9.0, "int2"), (4.0, 4.0, "int4")]
    assert plot["curves"]["auto (gptq)"] == [(3.2, 3.9, "auto@int3")]  # borrowed the ptq result's parameter count
    assert plot["curves"]["qat"] == [(3.2, 4.2, "int3")]
    assert pareto(plot["curves"]["rtn"]) == [(3.2, 6.0, "int3"), (4.0, 4.0, "int4")]  # int2 is larger and worse


def test_bench_plot_writes_one_png_per_model(capsys, tmp_path):
    files = []
    for i, r in enumerate(_results()):
        files.append(str(tmp_path / f"r{i}.json"))
        with open(files[-1], "w") as f:
            json.dump(r, f)
    code = cli.main(["bench", "plot", *files, "--out-dir", str(tmp_path / "plots"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d["plots"] == [str(tmp_path / "plots" / "ppl-vs-bits-stories260K.png")]
    assert (tmp_path / "plots" / "ppl-vs-bits-stories260K.png").read_bytes()[:4] == b"\x89PNG"
    assert d["points"][0]["curves"]["qat"] == [[3.2, 4.2, "int3"]]
    bad = tmp_path / "bad.json"
    bad.write_text('{"benchmark": "kv_cache", "rows": []}')
    code = cli.main(["bench", "plot", str(bad), "--out-dir", str(tmp_path / "p2")])
    err = capsys.readouterr().err
    assert code == 2 and "not a bench ptq, workflow or qat result" in err and len(err.strip().splitlines()) == 1
    code = cli.main(["bench", "plot", files[1], "--out-dir", str(tmp_path / "p3")])  # a workflow alone: no parameter count
    err = capsys.readouterr().err
    assert code == 2 and "no parameter count" in err


RESULTS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "results")


def test_every_committed_result_passes_the_check():
    """The check refuses malformed files, not real ones: every committed ptq/workflow/qat result passes."""
    checked = 0
    for path in sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json"))):
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        if isinstance(r, dict) and r.get("benchmark") in ("ptq", "workflow", "qat"):
            check_result(r)
            checked += 1
    assert checked >= 10


def _damaged(change):
    r = _results()[0]
    change(r)
    return r


@pytest.mark.parametrize("result, message", [
    ([1, 2], "a JSON array, not an object"),
    ("ptq", "a JSON string, not an object"),
    (None, "a JSON null, not an object"),
    ({"rows": []}, "benchmark None"),
    (_damaged(lambda r: r.pop("model")), "no 'model' key"),
    (_damaged(lambda r: r.update(data=["/d/val.txt"])), "'data' is a JSON array; expected a non-empty string"),
    (_damaged(lambda r: r.update(float_ppl=math.nan)), "'float_ppl' is nan"),
    (_damaged(lambda r: r.update(float_ppl=math.inf)), "'float_ppl' is inf"),
    (_damaged(lambda r: r.update(float_weight_bytes=-4)), "'float_weight_bytes' is -4"),
    (_damaged(lambda r: r.update(rows="none")), "'rows' is 'none'; expected a list of rows"),
    (_damaged(lambda r: r["rows"].append([1])), "rows[4] is a JSON array; expected a JSON object"),
    (_damaged(lambda r: r["rows"][1].pop("method")), "rows[1] has no 'method' key"),
    (_damaged(lambda r: r["rows"][2].update(ppl="4.0")), "rows[2].ppl is '4.0'; expected a finite positive number"),
    (_damaged(lambda r: r["rows"][0].update(ppl=True)), "rows[0].ppl is True"),
    (_damaged(lambda r: r["rows"][0].update(weight_bytes=0)), "rows[0].weight_bytes is 0"),
])
def test_check_result_names_what_is_wrong(result, message):
    with pytest.raises(ValueError) as e:
        check_result(result)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="result 2: "):  # points() says which of several results
        points([_results()[0], result])
