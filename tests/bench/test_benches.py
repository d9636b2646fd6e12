"""Benchmarks produce well-formed rows (their timings are reported, never asserted)."""

import pytest

from cascade.bench import matmul, quant_error


def test_matmul_rows_pair_every_spec_with_f32_of_the_same_batch():
    result = matmul.run(batches=(1, 3), k=40, n=8, specs=("int8", "int4-g16-asym"), repeats=2, warmup=1, progress=False)
    rows = result["rows"]
    assert [(r["spec"], r["batch"]) for r in rows] == [(s, b) for b in (1, 3) for s in ("fp32", "int8", "int4-g16-asym")]
    for r in rows:
        f32 = next(x for x in rows if x["spec"] == "fp32" and x["batch"] == r["batch"])
        assert r["speedup_vs_f32"] == pytest.approx(f32["ms"] / r["ms"], rel=0.01)
        assert r["backend"] == "xla"
    assert rows[2]["weight_bytes"] == 40 * 8 // 2 + 3 * 8 * 2 * 2  # int4 codes + fp16 scale and zero per group
    assert "int4-g16-asym" in matmul.format_table(result)


@pytest.mark.parametrize("kwargs,match", [({"k": 0}, "positive"), ({"batches": (0,)}, "positive"),
                                          ({"repeats": 0}, "repeats"), ({"specs": ("int9",)}, "unknown precision")])
def test_matmul_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        matmul.run(**{"k": 8, "n": 8, "batches": (1,), "repeats": 1, "progress": False, **kwargs})


def test_quant_error_rows_are_consistent():
    result = quant_error.run(specs=("int4-g16",), k=64, n=8, progress=False)
    by = {(r["spec"], r["weights"]): r["rel_error"] for r in result["rows"]}
    assert set(by) == {(s, d) for s in ("int4-g16", "int4-g16-mse", "int4-g16-p99.9") for d in ("gaussian", "student-t3")}
    for d in ("gaussian", "student-t3"):
        assert by[("int4-g16-mse", d)] <= by[("int4-g16", d)]  # the MSE search includes min-max
