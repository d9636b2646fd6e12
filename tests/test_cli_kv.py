"""--kv on the command line: eval, generate, run, inspect, plan."""

import json
import os

import pytest

from cascade import cli
from tests.shared_data import DATA

BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
VAL = os.path.join(DATA, "text", "tinystories_val.txt")


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_kv_json_reports_perplexity_and_cache_bytes(capsys):
    rows = {}
    for kv in ("fp32", "int8", "int4"):
        code, out, _ = run(capsys, "eval", BIN, "--data", VAL, "--limit", "20", "--ctx", "256", "--kv", kv, "--json")
        assert code == 0
        rows[kv] = json.loads(out)
    assert {r["tokens"] for r in rows.values()} == {rows["fp32"]["tokens"]}  # the same tokens
    assert rows["int8"]["ppl"] == pytest.approx(rows["fp32"]["ppl"], rel=0.002)
    assert rows["int4"]["ppl"] == pytest.approx(rows["fp32"]["ppl"], rel=0.03)
    assert rows["int4"]["kv"] == "int4" and rows["int4"]["kv_cache"]["kv"] == "int4"
    assert rows["int4"]["kv_bytes"] < rows["int8"]["kv_bytes"] < rows["fp32"]["kv_bytes"]
    assert rows["int4"]["kv_cache"]["vs_fp16_per_token"] < 0.30


@pytest.mark.slow  # compiles a program set per cache precision and mode (the fuzz suite covers --kv parsing)
def test_generate_and_run_with_quantized_caches(capsys):
    code, out, _ = run(capsys, "generate", BIN, "Once upon a time", "--max-tokens", "24", "--kv", "int8", "--json")
    q8 = json.loads(out)
    fp = json.loads(run(capsys, "generate", BIN, "Once upon a time", "--max-tokens", "24", "--json")[1])
    assert code == 0 and q8["kv"] == "int8" and q8["token_ids"] == fp["token_ids"]
    spec = json.loads(run(capsys, "run", "The dog", "--max-tokens", "20", "--kv", "int4", "--json")[1])
    large = json.loads(run(capsys, "run", "The dog", "--max-tokens", "20", "--large-kv", "int4", "--mode", "large",
                           "--json")[1])
    assert spec["small"]["kv"] == spec["large"]["kv"] == "int4" == large["large"]["kv"]
    assert spec["token_ids"] == large["token_ids"]  # exact: the large model's output with its int4 cache
    code, _, err = run(capsys, "run", "The dog", "--max-tokens", "8", "--small-kv", "int4")
    assert code == 0 and "kv int4/fp32" in err


def test_inspect_shows_kv_bytes(capsys):
    code, out, _ = run(capsys, "inspect", BIN, "--json", "--kv", "fp16", "--kv", "int4", "--ctx", "512")
    assert code == 0
    mem = {m["kv"]: m for m in json.loads(out)["kv_cache"]}
    assert set(mem) == {"fp16", "int4"}
    assert mem["fp16"]["bytes_per_sequence"] == 5 * 2 * 512 * 4 * 8 * 2  # 5 layers, 4 KV heads of 8, k and v
    code, _, err = run(capsys, "inspect", BIN)
    assert code == 0 and "KV cache, one sequence of 512 positions" in err and "int4" in err


def test_plan_json_and_budget(capsys):
    code, out, _ = run(capsys, "plan", "--kv", "int4", "--ctx", "512", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] is None and [m["kv"] for m in plan["models"]] == ["int4", "int4"]
    assert plan["total_bytes"] == sum(m["weight_bytes"] + m["kv_bytes"] for m in plan["models"]) + plan["workspace_bytes"]
    assert plan["workspace_bytes"] == max(m["workspace_bytes"] for m in plan["models"])
    code, _, err = run(capsys, "plan", "--kv", "int4", "--budget", str(plan["total_bytes"] - 1))
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: the plan needs")
    code, _, _ = run(capsys, "plan", "--kv", "int4", "--budget", str(plan["total_bytes"]))
    assert code == 0
    code, _, err = run(capsys, "plan", "--batch", "4", "--budget", "170MB")  # as run --budget words it
    assert code == 1 and "(4,892,096 over); would fit: --kv int4 (165,795,136 bytes)" in err


def test_plan_per_device_with_a_mesh(capsys):
    """--mesh/--small-devices: the plan per device group, and --budget is each device's."""
    code, out, _ = run(capsys, "plan", "--json")
    one = json.loads(out)
    code, out, _ = run(capsys, "plan", "--mesh", "tp=2", "--json")
    two = json.loads(out)
    assert code == 0 and two["total_bytes"] == one["total_bytes"] and two["devices"] == 2
    assert two["bytes_per_device"] < one["bytes_per_device"] == one["total_bytes"]
    assert list(two["device_groups"]) == ["all"] and [m["tp"] for m in two["models"]] == [1, 2]
    code, out, _ = run(capsys, "plan", "--mesh", "tp=2", "--small-devices", "1", "--json")
    own = json.loads(out)
    assert code == 0 and own["devices"] == 3 and own["bytes_per_device"] == own["device_groups"]["large"]["bytes"]
    # a budget one device's share fits, the whole pair does not
    code, _, err = run(capsys, "plan", "--budget", str(two["bytes_per_device"]))
    assert code == 1 and "would fit:" in err and "--mesh tp=2" in err
    code, _, err = run(capsys, "plan", "--mesh", "tp=2", "--budget", str(two["bytes_per_device"]))
    assert code == 0 and "per device: fits" in err  # the table goes to stderr
    code, _, err = run(capsys, "plan", "--mesh", "tp=4")
    assert code == 2 and "tp=4 does not divide n_kv_heads=2" in err and err.count("\n") == 1
    code, _, err = run(capsys, "plan", "--mode", "large", "--small-devices", "1")
    assert code == 2 and "--small-devices needs both models" in err


@pytest.mark.parametrize("args", [
    ("eval", BIN, "--data", VAL, "--kv", "int3"),
    ("generate", BIN, "hi", "--kv", "int4-r40"),
    ("run", "hi", "--kv", "fp8"),
    ("run", "hi", "--large-kv", "int4-asym"),
    ("inspect", BIN, "--kv", "bogus"),
    ("plan", "--small-kv", "int2"),
    ("plan", "--budget", "lots"),
])
def test_bad_kv_flags_are_usage_errors(capsys, args):
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
