"""bench decode: rows per spec, the step breakdown and the llama.cpp row (timings are reported, never asserted)."""

import json
import os
import stat

import pytest

from cascade.bench import decode
from cascade.models import load_model
from tests.shared_data import DATA

GGUF = os.path.join(DATA, "stories260K", "stories260K.gguf")


@pytest.fixture(scope="module")
def model():
    return load_model(GGUF)


def _fake_llamacpp(tmp_path, rates):
    """An executable standing in for llama.cpp's venv Python: prints what bench/llamacpp_decode.py prints."""
    exe = tmp_path / "python"
    exe.write_text("#!/bin/sh\n" f"echo '{json.dumps({'tokens_per_s': rates, 'version': '0.0-test', 'threads': 2, 'tokens': 6, 'prompt_tokens': 5})}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_rows_per_spec_with_breakdown_and_llamacpp(model, tmp_path):
    result = decode.run(model, specs=("fp32", "int8", "source"), tokens=6, repeats=1, warmup=0,
                        llamacpp=_fake_llamacpp(tmp_path, [100.0, 300.0, 200.0]), progress=False)
    rows = result["rows"]
    assert [(r["engine"], r["spec"]) for r in rows] == [("cascade", "fp32"), ("cascade", "int8"), ("cascade", "source"),
                                                       ("llama.cpp", "source")]
    lcp = rows[-1]
    assert lcp["tokens_per_s"] == 200.0 and lcp["vs_llamacpp"] == 1.0 and lcp["weight_bytes"] == os.path.getsize(GGUF)
    for r in rows[:-1]:
        assert r["tokens_per_s"] > 0 and r["vs_llamacpp"] == pytest.approx(r["tokens_per_s"] / 200.0, rel=0.01)
        assert r["step_ms"] == pytest.approx(1e3 / r["tokens_per_s"], rel=0.01)
        assert r["other_ms"] == pytest.approx(r["step_ms"] - r["matmul_ms"] - r["call_ms"], abs=0.002)
    assert rows[0]["matmul_backends"] == {} and rows[1]["matmul_backends"] == {"cpu": 35}
    assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"]
    assert "llama.cpp" in decode.format_table(result)


def test_linear_weights_cover_every_matmul_of_a_step(model):
    weights = decode._linear_weights(model)
    assert len(weights) == 7 * model.config.n_layers + 1  # + the tied head (stories260K ties its embedding)
    assert [t for _, t in weights].count(True) == int(model.config.tie_embeddings)


@pytest.mark.parametrize("kwargs, match", [({"tokens": 2}, "tokens"), ({"repeats": 0}, "repeats"),
                                           ({"tokens": 10_000}, "context")])
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode.run(model, **{"specs": ("source",), "progress": False, **kwargs})


def test_llamacpp_needs_a_gguf_and_a_working_python(model, tmp_path):
    bin_model = load_model(os.path.join(DATA, "stories260K", "stories260K.bin"))
    with pytest.raises(ValueError, match="GGUF"):
        decode.run(bin_model, specs=("source",), tokens=4, repeats=1, llamacpp="python", progress=False)
    bad = tmp_path / "python"
    bad.write_text("#!/bin/sh\necho 'no llama_cpp here' >&2\nexit 3\n")
    bad.chmod(0o755)
    with pytest.raises(ValueError, match="exit 3.*no llama_cpp here"):
        decode.run(model, specs=("source",), tokens=4, repeats=1, warmup=0, llamacpp=str(bad), progress=False)


def test_rows_per_kv_and_attention_backend_after_a_long_context(model):
    result = decode.run(model, specs=("source",), kv=("fp32", "int4"), attention=("cpu", "xla"), context=200,
                        tokens=4, repeats=1, warmup=0, progress=False)
    assert result["prompt_tokens"] == 200
    rows = result["rows"]
    assert [(r["kv"], r["attention"]) for r in rows] == [("fp32", "cpu"), ("fp32", "xla"), ("int4", "cpu"),
                                                         ("int4", "xla")]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    table = decode.format_table(result)
    assert "int4" in table and "xla" in table


@pytest.mark.parametrize("kwargs, match", [({"kv": ("int5",)}, "int5"), ({"attention": ("gpu",)}, "attention"),
                                           ({"context": 0}, "context")])
def test_bad_kv_attention_and_context(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode.run(model, **{"specs": ("source",), "tokens": 4, "progress": False, **kwargs})


def test_a8_and_the_cost_of_k_rows(model):
    """An -a8 spec runs on the integer kernel; --rows times a step's matmuls at k rows and divides by
    the one-row time (the table shows the ratios).  (source-a8 needs a quantized file: SmolLM2,
    tests/models/test_native_backend.py; this GGUF is float.)"""
    from cascade.bench import tables

    result = decode.run(model, specs=("int8", "int8-a8"), tokens=4, repeats=1, warmup=0, rows=(3, 2),
                        progress=False)
    source, a8 = result["rows"]
    assert set(a8["matmul_backends"]) == {"cpu-a8"} and set(source["matmul_backends"]) == {"cpu"}
    assert source["matmul_calls"] == a8["matmul_calls"] == 4 * 5 + 1  # q/k/v and gate/up fused, both kernels
    for r in (source, a8):
        assert list(r["matmul_ms_by_rows"]) == ["1", "2", "3"] and r["vs_one_row"]["1"] == 1.0
        for k in ("2", "3"):
            assert r["vs_one_row"][k] == pytest.approx(r["matmul_ms_by_rows"][k] / r["matmul_ms_by_rows"]["1"], rel=0.01)
    text = decode.format_table(result)
    assert "k=3" in text and "int8-a8" in text
    md = tables._decode(result)
    assert "3 rows vs 1" in md.splitlines()[0] and f"{a8['vs_one_row']['3']:.2f}" in md
    with pytest.raises(ValueError, match="rows"):
        decode.run(model, specs=("source",), rows=(0,), progress=False)
