"""Benchmarks produce well-formed rows (their timings are reported, never asserted)."""

import json

import pytest

from cascade.bench import matmul, quant_error


def test_matmul_rows_pair_every_spec_with_f32_of_the_same_batch():
    result = matmul.run(batches=(1, 3), shapes=((40, 8), (16, 24)), specs=("int8", "int4-g16-asym"), backend="xla",
                        repeats=2, warmup=1, progress=False, copy_bytes=1 << 20)
    rows = result["rows"]
    assert [(r["k"], r["n"], r["spec"], r["batch"]) for r in rows] == [
        (k, n, s, b) for k, n in ((40, 8), (16, 24)) for b in (1, 3) for s in ("fp32", "int8", "int4-g16-asym")]
    for r in rows:
        f32 = next(x for x in rows if x["spec"] == "fp32" and (x["batch"], x["k"]) == (r["batch"], r["k"]))
        # the ratio is rounded to 3 decimals: a small one (a slow spec) is off by up to 0.0005 absolute
        assert r["speedup_vs_f32"] == pytest.approx(f32["ms"] / r["ms"], rel=0.01, abs=6e-4)
        assert r["backend"] == "xla"
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gb_s"] / result["copy_gb_s"], rel=0.02, abs=0.02)
    assert rows[2]["weight_bytes"] == 40 * 8 // 2 + 3 * 8 * 2 * 2  # int4 codes + fp16 scale and zero per group
    assert "int4-g16-asym" in matmul.format_table(result)


def test_matmul_a8_rows_on_the_kernel_and_its_reference_with_the_cost_against_one_row():
    result = matmul.run(batches=(1, 2, 5), shapes=((64, 64),), specs=("int4-g32-a8",), repeats=2, warmup=1,
                        progress=False, copy_bytes=1 << 20)
    a8 = [r for r in result["rows"] if r["spec"] == "int4-g32-a8"]
    assert sorted({r["backend"] for r in a8}) == ["cpu-a8", "xla-a8"]
    assert [r["selected"] for r in a8 if r["backend"] == "cpu-a8"] == [True] * 3
    for r in result["rows"]:
        one = next(x for x in result["rows"] if (x["spec"], x["backend"], x["batch"]) == (r["spec"], r["backend"], 1))
        assert r["vs_one_row"] == pytest.approx(r["ms"] / one["ms"], rel=0.01, abs=6e-4)
    assert "vs 1 row" in matmul.format_table(result)


def test_perplexity_max_tokens_scores_a_prefix(stories260k):
    from cascade.bench import perplexity
    from tests.shared_data import DATA

    data = f"{DATA}/text/tinystories_val.txt"
    result = perplexity.run(stories260k, data, specs=("source", "int8-a8"), limit=50, ctx=64, truncate=False,
                            max_tokens=300, progress=False)
    assert [r["tokens"] for r in result["rows"]] == [result["rows"][0]["tokens"]] * 2
    assert result["rows"][0]["tokens"] <= 300 and result["max_tokens"] == 300
    with pytest.raises(ValueError, match="max_tokens"):
        perplexity.run(stories260k, data, specs=("source",), max_tokens=1, progress=False)


@pytest.mark.parametrize("kwargs,match", [({"k": 0}, "positive"), ({"batches": (0,)}, "positive"),
                                          ({"repeats": 0}, "repeats"), ({"specs": ("int9",)}, "unknown precision"),
                                          ({"backend": "nope"}, "unknown matmul backend")])
def test_matmul_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        matmul.run(**{"k": 8, "n": 8, "batches": (1,), "repeats": 1, "progress": False, "copy_bytes": 1 << 20, **kwargs})


def test_copy_bandwidth_is_bytes_over_time(monkeypatch):
    clock = iter(range(0, 100, 2))  # every copy takes 2 "seconds"
    monkeypatch.setattr(matmul.time, "perf_counter", lambda: next(clock))
    assert matmul.copy_bandwidth(4 << 20, repeats=3) == pytest.approx((4 << 20) / 2 / 1e9)


def test_quant_error_rows_are_consistent():
    result = quant_error.run(specs=("int4-g16",), k=64, n=8, progress=False)
    by = {(r["spec"], r["weights"]): r["rel_error"] for r in result["rows"]}
    assert set(by) == {(s, d) for s in ("int4-g16", "int4-g16-mse", "int4-g16-p99.9") for d in ("gaussian", "student-t3")}
    for d in ("gaussian", "student-t3"):
        assert by[("int4-g16-mse", d)] <= by[("int4-g16", d)]  # the MSE search includes min-max


def test_cascade_bench_rows(tmp_path):
    """bench/cascade.py: every mode over the same prompts; the exact modes agree with the large model
    everywhere, the large model alone makes one call per token, and the PNG is written."""
    from cascade.bench import cascade as bench_cascade

    r = bench_cascade.run("default-small", "default-large", tokens=6, repeats=1, alphas=(0.3,), thresholds=(-1.0,),
                          batches=(1, 2))
    rows = {(x["mode"], x.get("alpha"), x.get("threshold")): x for x in r["rows"] if x.get("draft_len") != "auto"}
    assert set(rows) == {("large", None, None), ("speculative", None, None), ("spec-cascade", 0.3, None),
                         ("defer", None, -1.0)}
    (auto,) = [x for x in r["rows"] if x.get("draft_len") == "auto"]
    assert auto["mode"] == "speculative" and auto["agreement"] == 1.0  # adaptive drafting is exact too
    assert rows[("large", None, None)]["large_calls_per_token"] == 1.0 and rows[("large", None, None)]["vs_large"] == 1.0
    assert rows[("speculative", None, None)]["agreement"] == 1.0  # exact
    assert rows[("speculative", None, None)]["ppl_under_large"] == rows[("large", None, None)]["ppl_under_large"]
    assert 0 < rows[("speculative", None, None)]["large_calls_per_token"] <= 1
    assert {(x["mode"], x["batch"]) for x in r["batch_rows"]} == {(m, b) for m in ("large", "speculative") for b in (1, 2)}
    assert "spec-cascade" in bench_cascade.table(r)
    bench_cascade.plot(r, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_drafting_bench_rows():
    """bench/drafting.py: every drafting setting over the same prompts, each exact against the large model."""
    from cascade.bench import drafting

    r = drafting.run("default-small", "default-large", tokens=6, prompts=2, repeats=1)
    spec = [row for row in r["rows"] if row["mode"] == "speculative"]
    assert [row["mode"] for row in r["rows"][:2]] == ["large", "small"] and len(spec) == 7
    assert all(row["exact"] and 0 <= row["acceptance"] <= 1 for row in spec)
    assert all(1 <= row["drafted_per_round"] <= row["draft_len"] for row in spec)
    assert r["rows"][0]["vs_large"] == 1.0 and "adaptive, up to 8, confidence 0.5" in drafting.table(r)


def test_drafting_bench_through_the_cli_sampled_with_chosen_lengths(capsys):
    """`cascade bench drafting`: --draft-lens picks the rows (the large model alone first), and a
    sampled run reports acceptance but no token-for-token check."""
    import json

    from cascade import cli

    code = cli.main(["bench", "drafting", "--pair", "default", "--tokens", "6", "--prompts", "1", "--repeats", "1",
                     "--draft-lens", "2", "--temperature", "0.8", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert [(x["mode"], x.get("draft_len")) for x in r["rows"]] == [("large", None), ("speculative", 2)]
    assert r["rows"][1]["exact"] is None and 0 <= r["rows"][1]["acceptance"] <= 1 and r["temperature"] == 0.8
    assert (r["pair"], r["small_quant"], r["large_quant"], r["chat_template"]) == ("default", "int4", "int8", False)


def test_the_defaults_table_joins_results_and_computes_what_the_default_closes(tmp_path):
    """bench/tables.py's ptq-defaults kind: rows from several ptq results (the newest source wins),
    the default read from method on the spec's -mse range, and the share of RTN's gap it closes."""
    from cascade.bench import tables

    def ptq(name, rows):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"benchmark": "ptq", "data": "/x/val.txt", "float_ppl": 2.0, "rows": rows}))

    ptq("old", [{"spec": "int3-g32", "method": "rtn", "ppl": 99.0}, {"spec": "int3-g32", "method": "gptq", "ppl": 5.0}])
    ptq("new", [{"spec": "int3-g32", "method": "rtn", "ppl": 6.0}, {"spec": "int3-g32-narrow", "method": "rtn", "ppl": 7.0},
                {"spec": "int3-g32-mse", "method": "awq-gptq", "ppl": 3.0}])
    common = {"benchmark": "ptq-defaults", "sources": [{"label": "m", "file": "old"}, {"label": "m", "file": "new"}],
              "default": {"method": "awq-gptq", "clip": "mse"}, "cells": [["m", "val.txt", "int3-g32"]]}
    (tmp_path / "d.json").write_text(json.dumps({**common, "methods": ["rtn", "gptq"]}))
    (tmp_path / "g.json").write_text(json.dumps({**common, "view": "grid", "methods": ["rtn"]}))
    lines = tables.table("d", tmp_path).splitlines()
    assert lines[0] == "| model | data | spec | float | rtn | gptq | default (awq-gptq, -mse) | default closes |"
    assert lines[2] == "| m | val.txt | `int3-g32` | 2.000 | 6.000 | 5.000 | 3.000 | 75% |"  # (6 - 3) / (6 - 2)
    assert tables.table("g", tmp_path).splitlines()[2] == "| m | val.txt | `int3-g32` | 2.000 | 7.000 | 6.000 |"
    (tmp_path / "d.json").write_text(json.dumps({**common, "methods": ["rtn"], "cells": [["other", "val.txt", "int3-g32"]]}))
    with pytest.raises(ValueError, match="no rows for other"):
        tables.table("d", tmp_path)


def test_serve_bench_through_the_cli(capsys, tmp_path):
    """`cascade bench serve`: a row per (streaming, clients), every answer checked against its prompt
    alone (none lost, duplicated or garbled), the table generated from the JSON; --repeats is refused."""
    import json

    from cascade import cli
    from cascade.bench import tables

    out = tmp_path / "serve.json"
    code = cli.main(["bench", "serve", "--clients", "1,3", "--requests", "2", "--tokens", "5", "--prompts", "3",
                     "--max-batch", "2", "--ctx", "64", "--out", str(out), "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert [(row["stream"], row["clients"]) for row in r["rows"]] == [(False, 1), (False, 3), (True, 1), (True, 3)]
    for row in r["rows"]:
        assert row["requests"] == 2 * row["clients"] and (row["lost"], row["duplicated"], row["garbled"]) == (0, 0, 0)
        assert 0 < row["tokens"] <= 5 * row["requests"] and row["ttft_p50_s"] <= row["ttft_p95_s"]
    assert r["rows"][0]["vs_one_client"] == 1.0
    assert "| yes | 3 | 6 |" in tables.table("serve", tmp_path)
    assert cli.main(["bench", "serve", "--repeats", "2"]) == 2
