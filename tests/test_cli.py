"""The command line: exit codes, one-line errors, --json on stdout, no half-written files."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from cascade import cli


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def weights(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"layers.0.mlp.up.weight": rng.standard_normal((64, 40)).astype(np.float32),
               "layers.0.input_layernorm.weight": np.ones(64, np.float32),
               "embed_tokens.weight": rng.standard_normal((100, 64)).astype(np.float32)}
    st, npz = tmp_path / "w.safetensors", tmp_path / "w.npz"
    save_file(tensors, str(st))
    np.savez(npz, **tensors)
    return st, npz, tensors


def test_version_and_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("cascade, version ")
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for sub in ("run", "quantize", "eval", "plan", "bench", "inspect"):
        assert sub in out


@pytest.mark.parametrize("args", [(), ("bench",)])
def test_group_alone_prints_help(capsys, args):
    code, out, _ = run(capsys, *args)
    assert code == 0 and out.startswith("Usage: cascade")


@pytest.mark.system  # another process
def test_console_script_installed():
    exe = shutil.which("cascade", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the `cascade` console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "version" in proc.stdout


@pytest.mark.parametrize("args", [("bogus",), ("bench", "matmul", "--batch", "0"), ("bench", "matmul", "--k", "x"),
                                  ("bench", "matmul", "--shape", "4096"), ("bench", "matmul", "--backend", "nope"),
                                  ("quantize",), ("inspect", "a", "b"), ("--nope",)])
def test_usage_errors_are_one_line_exit_2(capsys, args):
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_inspect_json_and_table(capsys, weights):
    st, npz, tensors = weights
    for path in (st, npz):
        code, out, err = run(capsys, "inspect", str(path), "--json")
        assert code == 0
        data = json.loads(out)
        assert {t["name"]: t["shape"] for t in data["tensors"]} == {k: list(v.shape) for k, v in tensors.items()}
        assert data["bytes"] == sum(v.nbytes for v in tensors.values())
    code, out, err = run(capsys, "inspect", str(st))
    assert code == 0 and out == "" and "3 tensors" in err


def test_quantize_report(capsys, weights):
    st, _, tensors = weights
    code, out, _ = run(capsys, "quantize", str(st), "--quant", "int4-g32", "--json")
    assert code == 0
    data = json.loads(out)
    # safetensors hold PyTorch (out, in) weights: groups run along axis 1, the input features
    assert data["axis"] == 1
    up = next(r for r in data["layers"] if r["path"] == "layers.0.mlp.up.weight")
    assert up["bytes_after"] == 64 * 20 + 64 * 2 * 2
    specs = {r["path"]: r["spec"] for r in data["layers"]}
    assert specs == {"layers.0.mlp.up.weight": "int4-g32", "layers.0.input_layernorm.weight": "bf16",
                     "embed_tokens.weight": "bf16"}
    assert data["bytes_before"] == sum(v.nbytes for v in tensors.values()) > data["bytes_after"]
    assert data["rules"]["__default__"] == "int4-g32-full" and data["rules"]["spec_version"] == 2  # saved: grid explicit


@pytest.mark.parametrize("content,match", [(b"", "cannot read"), (b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":", "cannot read")])
def test_corrupt_file_is_one_line_error(capsys, tmp_path, content, match):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    code, out, err = run(capsys, "inspect", str(bad))
    assert code == 1 and out == "" and err.count("\n") == 1 and match in err


def test_truncated_npz_and_missing_and_unknown(capsys, weights, tmp_path):
    _, npz, _ = weights
    trunc = tmp_path / "t.npz"
    trunc.write_bytes(npz.read_bytes()[:200])
    for path, match, want in [(trunc, "cannot read", 1), (tmp_path / "nope.npz", "no such file", 2),
                              (tmp_path, "directory", 1)]:
        code, _, err = run(capsys, "inspect", str(path))
        assert code == want and match in err and err.count("\n") == 1
    code, _, err = run(capsys, "quantize", str(npz), "--quant", "int5")
    assert code == 2 and "unknown precision spec" in err


def test_nan_weights_rejected_naming_tensor(capsys, tmp_path):
    path = tmp_path / "nan.npz"
    np.savez(path, **{"mlp.w": np.full((4, 4), np.nan, np.float32)})
    code, _, err = run(capsys, "quantize", str(path), "--quant", "int8")
    assert code == 1 and "mlp.w" in err and "NaN" in err


def test_debug_shows_traceback(capsys):
    with pytest.raises(ValueError):
        cli.main(["--debug", "bench", "matmul", "--k", "1000000", "--n", "1000000", "--batch", "1"])  # too big: refused at run time


def test_bench_matmul_json_rows_and_out_file(capsys, tmp_path):
    out_file = tmp_path / "mm.json"
    code, out, err = run(capsys, "bench", "matmul", "--k", "72", "--n", "16", "--batch", "1,4", "--repeats", "2",
                         "--warmup", "1", "--spec", "int8,int4-g32", "--out", str(out_file), "--json")
    assert code == 0
    data = json.loads(out)
    assert json.loads(out_file.read_text()) == data
    rows = data["rows"]
    # every quantized spec on both backends (reference and native kernel), beside the f32 row of its batch
    assert [(r["spec"], r["backend"], r["batch"]) for r in rows] == [
        (s, be, b) for b in (1, 4) for s, be in [("fp32", "xla"), ("int8", "xla"), ("int8", "cpu"), ("int4-g32", "xla"),
                                                 ("int4-g32", "cpu")]]
    for r in rows:
        assert set(r) >= {"spec", "backend", "batch", "k", "n", "ms", "speedup_vs_f32", "gb_s", "pct_copy_bw", "selected"}
        assert r["ms"] > 0 and r["k"] == 72 and r["n"] == 16
        assert r["gb_s"] == pytest.approx(r["weight_bytes"] / r["ms"] / 1e6, rel=0.01, abs=1e-4)  # rounded to 4 decimals
        assert r["selected"] == (r["backend"] == ("xla" if r["spec"] == "fp32" else "cpu"))  # batches 1, 4: the kernel
    assert data["copy_gb_s"] > 0 and data["kernel_simd"] in ("avx2+fma", "scalar")
    assert [r["speedup_vs_f32"] for r in rows if r["spec"] == "fp32"] == [1.0, 1.0]
    assert rows[1]["weight_bytes"] == 72 * 16 + 16 * 2  # int8 codes + one fp16 scale per column


def test_bench_bad_out_path_leaves_nothing(capsys, tmp_path):
    target = tmp_path / "missing_dir" / "mm.json"
    code, _, err = run(capsys, "bench", "matmul", "--k", "8", "--n", "8", "--batch", "1", "--repeats", "1",
                       "--out", str(target))
    assert code == 2 and err.startswith("error: ") and not target.exists()  # a usage error, before any timing


def test_bench_error_rows(capsys):
    code, out, _ = run(capsys, "bench", "error", "--spec", "int8,int4-g16", "--k", "64", "--n", "8", "--json")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert len(rows) == 2 * 2 * 3  # distributions x specs x clip methods
    by_spec = {(r["spec"], r["weights"]): r for r in rows}
    # more bits, less error, on the same weights
    assert by_spec[("int8", "gaussian")]["rel_error"] < by_spec[("int4-g16", "gaussian")]["rel_error"]
    assert by_spec[("int4-g16", "gaussian")]["bits_per_weight"] == pytest.approx(4 + 16 / 16)


def test_inspect_bf16_safetensors(capsys, tmp_path):
    import ml_dtypes

    path = tmp_path / "bf16.safetensors"
    save_file({"w": np.ones((3, 2), ml_dtypes.bfloat16)}, str(path))
    code, out, err = run(capsys, "inspect", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["tensors"] == [{"name": "w", "shape": [3, 2], "dtype": "bfloat16", "bytes": 12}]


def test_json_output_is_strict_json(capsys, tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, w=np.full((4, 4), 1e6, np.float32))
    code, out, err = run(capsys, "quantize", str(path), "--quant", "fp16", "--json")
    assert code == 1 and out == "" and "overflows" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, match", [
    (("--spec", ""), "at least one spec"), (("--spec", "int9"), "int9"), (("--llamacpp", "/no/such/python"), "no such file"),
    (("--tokens", "2"), "tokens"), (("--kv", "int5"), "int5"), (("--kv", ","), "at least one KV spec"),
    (("--attention", "gpu"), "--attention"), (("--context", "0"), "context"),
    (("--context", "64", "--llamacpp", "/bin/sh"), "does not combine"),
    (("--rows", "0"), "--rows"), (("--rows", "2,x"), "--rows"), (("--rows", "65"), "--rows"),
])
def test_bench_decode_usage_errors(capsys, args, match):
    code, out, err = run(capsys, "bench", "decode", "default-small", *args)
    assert code == 2 and out == "" and match in err


def test_bench_decode_json(capsys, tmp_path):
    out_file = tmp_path / "dec.json"
    code, out, _ = run(capsys, "bench", "decode", "default-small", "--spec", "int4-g32", "--tokens", "4",
                       "--repeats", "1", "--warmup", "0", "--json", "--out", str(out_file))
    assert code == 0
    data = json.loads(out)
    assert json.loads(out_file.read_text()) == data and data["benchmark"] == "decode"
    [row] = data["rows"]
    assert row["engine"] == "cascade" and row["spec"] == "int4-g32" and row["tokens_per_s"] > 0
    assert row["matmul_backends"] == {"cpu": 7 * 3} and row["vs_llamacpp"] is None  # default-small: 3 layers
    code, out, _ = run(capsys, "bench", "decode", "default-small", "--spec", "int4-a8", "--tokens", "4",
                       "--repeats", "1", "--warmup", "0", "--rows", "3", "--json")
    [row] = json.loads(out)["rows"]
    assert code == 0 and row["matmul_backends"] == {"cpu-a8": 7 * 3} and row["matmul_calls"] == 4 * 3 + 1  # + the head
    assert list(row["vs_one_row"]) == ["1", "3"]
