"""`cascade bench plot`: the points of each curve, the Pareto front, and the files written."""

import json

from cascade import cli
from cascade.bench.plots import pareto, points


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
    assert code == 1 and "not a bench ptq, workflow or qat result" in err and len(err.strip().splitlines()) == 1
    code = cli.main(["bench", "plot", files[1], "--out-dir", str(tmp_path / "p3")])  # a workflow alone: no parameter count
    err = capsys.readouterr().err
    assert code == 1 and "no parameter count" in err
