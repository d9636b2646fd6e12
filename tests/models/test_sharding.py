"""Tensor parallelism on 8 CPU devices (a subprocess: the device count is fixed when JAX starts):
sharded logits equal single-device logits, greedy and speculative decoding give the same tokens,
every device holds the planned bytes, a quantized KV cache quantizes as on one device and scores
within the documented bound, and a tp that cannot split the model is one clear error."""

import json
import os
import re
import subprocess
import sys

import pytest

from cascade.models import sharding

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def result():
    env = {**os.environ, "XLA_FLAGS": " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                                                if not flag.startswith("--xla_force_host_platform_device_count"))}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py")], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_logits_and_tokens_equal_one_device(result):
    assert result["devices"] == 8
    runs = result["runs"]
    assert {(r["spec"], r["tp"]) for r in runs} == {(s, tp) for s in ("float", "int4-g16") for tp in (1, 2, 4)}
    for r in runs:
        assert r["max_logit_diff"] <= 1e-5, r
        assert r["generate_equal"] is True, r
        if r["tp"] == 4:
            assert r["speculative_equal"] is True, r
            for kv in ("fp32", "int8"):  # the cache split over the 4 devices, the same logits
                assert r[f"cache_{kv}_devices"] == 4 and r[f"cache_{kv}_max_diff"] <= 1e-5, r
    # the parameters really are split: q_proj lives on tp devices
    assert [r["split_q_proj"] for r in runs if r["spec"] == "float"] == [1, 2, 4]


def test_each_device_holds_the_planned_bytes(result):
    for r in result["runs"]:
        assert len(r["bytes"]) == r["tp"]
        for held in r["bytes"].values():
            assert abs(held - r["planned"]) <= 0.05 * r["planned"], r
    by = {(r["spec"], r["tp"]): r["planned"] for r in result["runs"]}
    assert by[("float", 4)] < 0.3 * by[("float", 1)]  # only norms replicate


def test_the_native_kernel_runs_per_shard(result):
    """Under a tp=4 mesh the CPU kernel multiplies each device's slice (jax.shard_map), equal to the
    XLA reference on the whole weight: a column split computes 128/4 = 32 outputs a device with no
    communication, a row split all 128 from its quarter of the inputs and adds them (all-reduce),
    a tied head 128/4 vocabulary rows; nothing is gathered.  A whole int4-g16 model's forward
    calls the kernel only at per-device widths (q 64/4, k/v 32/4, MLP 128/4, o/down 64 whole)."""
    per_shard = result["per_shard"]
    for name in ("int8 column", "int8 row", "int4-g16 column", "int4-g16 row", "int4-g16 tied head"):
        r = per_shard[name]
        assert r["max_diff"] <= 2e-5, (name, r)
        assert r["all_gather"] is False, (name, r)
        assert r["kernel_widths"] == ([128] if name.endswith("row") else [32]), (name, r)
        assert r["all_reduce"] is name.endswith("row"), (name, r)
    assert per_shard["model"]["kernel_widths"] == [8, 16, 32, 64]
    assert per_shard["model"]["all_gather"] is False
    for spec in ("int8", "int4-g32"):  # the Pallas kernel (interpret mode here) per shard as well
        for parallel in ("column", "row"):
            r = per_shard[f"pallas {spec} {parallel}"]
            assert r["rel_diff"] <= 1e-5 and r["all_gather"] is False and r["all_reduce"] is (parallel == "row"), r


def test_the_cache_attention_kernel_runs_per_shard(result):
    """A decode step's cache attention on 4 devices reads each device's 2 of the 8 query heads
    (and its 1 KV head) from its slice of the cache: float, int8 and int4 caches with one value
    group per head.  The default int8 value group here spans all 4 KV heads (32 values), so that
    cache cannot split by heads: the kernel then runs on all 8 heads, gathered.  Logits equal
    one device's either way."""
    att = result["per_shard"]["attention"]
    for kv in ("fp32", "int8-g8", "int4-g8"):
        assert att[kv]["max_diff"] <= 1e-5 and att[kv]["heads_per_call"] == [2] and att[kv]["all_gather"] is False, kv
    assert att["int8"]["max_diff"] <= 1e-5 and att["int8"]["heads_per_call"] == [8]


QUANTIZED_KV_BOUND = 1e-3  # docs/guides/scale-out.md, "Perplexity through a quantized KV cache under a mesh": 0.1%


def test_a_quantized_kv_cache_scores_within_the_documented_bound(result):
    """`eval --kv int4-g8 --mesh tp=N` (issue 38): the cache quantizes as on one device (the same
    keys and values in, the same codes, scales and float16 window out, split over 4 or not), so
    what moves a quantized cache's perplexity is the float32 rounding of the keys and values
    themselves, which an fp32 cache shows to be within 1e-5.  The quantized cache's perplexity
    stays within the documented bound, and the scale-out guide states that bound where it makes the promise."""
    qc = result["quantized_cache"]
    for kv, r in qc["cache"].items():
        assert r["stored_equal"] is True and r["max_diff"] <= 1e-6, (kv, r)
    assert qc["nll"]["fp32"]["tp4"] <= 1e-5, qc["nll"]
    for kv in ("int4-g8", "int4"):
        for tp, rel in qc["nll"][kv].items():
            assert rel <= QUANTIZED_KV_BOUND, (kv, tp, rel)
    readme = open(os.path.join(HERE, "..", "..", "docs", "guides", "scale-out.md"), encoding="utf-8").read()
    promise = re.search(r"\*\*Perplexity through a quantized KV cache under a mesh\*\*.*?within ([\d.]+)%", readme,
                        re.S)
    assert promise and float(promise.group(1)) / 100 == QUANTIZED_KV_BOUND


def test_a_small_model_on_devices_of_its_own_gives_the_same_tokens(result):
    """--small-devices: the rounds run in three calls over two device sets (split_round), and give
    the one-call rounds' tokens: greedy (= the large model's), sampled, and a speculative cascade."""
    pair = result["pair"]
    assert pair["own_devices"] == ["TFRT_CPU_2", "TFRT_CPU_3"] or pair["own_devices"][0].endswith("2")
    assert len(pair["bytes"]) == 4  # the large model on 2 devices, the small one on 2 others
    assert pair["greedy_equal_large"] is True
    assert pair["equal_shared"] == {"greedy": True, "sampled": True, "cascade": True}
    assert pair["equal_one_device"] == {"greedy": True, "sampled": True, "cascade": True}


def test_the_per_device_plan_matches_what_each_device_holds(result):
    pair = result["pair"]
    devices = sorted(pair["bytes"])
    large_dev, small_dev = devices[:2], devices[2:]
    for role, devs in (("large", large_dev), ("small", small_dev)):
        planned = pair["planned_weights"][role]
        for d in devs:
            assert abs(pair["bytes"][d] - planned) <= 0.05 * planned, (role, d, pair["bytes"][d], planned)
        kv = pair["kv"][role]
        assert len(kv["live"]) == 2
        for held in kv["live"].values():
            assert abs(held - kv["planned"]) <= 0.05 * kv["planned"], (role, kv)
    groups = pair["plan_groups"]
    assert set(groups) == {"large", "small"} and groups["large"]["devices"] == groups["small"]["devices"] == 2


def test_loading_straight_into_the_layout_equals_loading_whole_and_placing(result):
    loading = result["loading"]
    for name in ("hf32", "hf16", "ckpt"):
        got = loading[name]
        assert got["leaves"] > 10 and got["equal"] is True and got["same_sharding"] is True, (name, got)
    assert "bfloat16" in loading["hf16"]["dtypes"] and "uint8" in loading["ckpt"]["dtypes"]
    for name in ("hf32", "ckpt"):
        assert loading[f"{name} tp8"].endswith("tp=8 does not divide n_kv_heads=4: this model splits over tp in {1, 2, 4}")


def test_a_tp_that_cannot_split_the_model_is_one_clear_error(result):
    e = result["errors"]
    assert e["tp8"] == "tp=8 does not divide n_kv_heads=4: this model splits over tp in {1, 2, 4}"
    assert e["tp3"].startswith("tp=3 does not divide n_heads=8")
    assert "not a whole number of its 32-row groups" in e["int4-g32 tp4"] and "o_proj" in e["int4-g32 tp4"]
    assert e["tp16"] == "tp=16 needs 16 devices; JAX sees 8 (cpu)"


def test_parse_mesh():
    assert sharding.parse_mesh("tp=4") == 4 and sharding.parse_mesh(" tp = 2 ") == 2
    for bad in ("tp=0", "dp=2", "4", ""):
        with pytest.raises(ValueError, match="expected tp=N"):
            sharding.parse_mesh(bad)


def test_the_layout_by_path():
    P = sharding.P
    assert sharding.param_partition("layers_3/attn/q_proj/kernel", 2) == P(None, "tp")
    assert sharding.param_partition("layers_3/attn/q_proj/bias", 1) == P("tp")
    assert sharding.param_partition("layers_3/attn/o_proj/kernel", 2) == P("tp", None)
    assert sharding.param_partition("layers_3/attn/o_proj/bias", 1) == P()
    assert sharding.param_partition("layers_3/mlp/down_proj/kernel", 2) == P("tp", None)
    assert sharding.param_partition("embed/embedding", 2) == P("tp", None)
    assert sharding.param_partition("lm_head/kernel", 2) == P(None, "tp")
    assert sharding.param_partition("final_norm/scale", 1) == P()


def _cli(*args, devices=4):
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-m", "cascade.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_generate_with_a_mesh_gives_the_one_device_tokens(capsys):
    from cascade import cli

    args = ["generate", "default-small", "Once upon a time", "--max-tokens", "12", "--quant", "int8", "--json"]
    assert cli.main(args) == 0
    one = json.loads(capsys.readouterr().out)
    assert "mesh" not in one
    proc = _cli(*args, "--mesh", "tp=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads(proc.stdout)
    assert two["token_ids"] == one["token_ids"]
    assert two["mesh"]["tp"] == 2 and len(two["mesh"]["bytes_per_device"]) == 2
    proc = _cli(*args, "--mesh", "tp=4")  # default-small has 2 KV heads
    assert proc.returncode == 2 and "tp=4 does not divide n_kv_heads=2" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_eval_with_a_mesh_scores_as_one_device(capsys):
    from cascade import cli

    from tests.shared_data import DATA

    val = os.path.join(DATA, "text", "tinystories_val.txt")
    args = ["eval", "default-small", "--data", val, "--limit", "3", "--ctx", "128", "--quant", "int4-g16", "--json"]
    assert cli.main(args) == 0
    one = json.loads(capsys.readouterr().out)
    proc = _cli(*args, "--mesh", "tp=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads(proc.stdout)
    assert two["tokens"] == one["tokens"] and abs(two["ppl"] - one["ppl"]) <= 1e-5 * one["ppl"]
    assert two["mesh"]["tp"] == 2


def test_run_with_a_mesh_gives_the_large_models_tokens(capsys):
    """The cascade with the large model over 2 devices and the small one replicated: speculative
    decoding still gives exactly the one-device output."""
    from cascade import cli

    args = ["run", "Once upon a time", "--max-tokens", "16", "--json"]
    assert cli.main(args) == 0
    one = json.loads(capsys.readouterr().out)
    proc = _cli(*args, "--mesh", "tp=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads(proc.stdout)
    assert two["token_ids"] == one["token_ids"] and two["mesh"]["tp"] == 2
    assert len(two["mesh"]["bytes_per_device"]) == 2
    # the small model on 2 devices of its own, under a per-device budget
    proc = _cli(*args, "--mesh", "tp=2", "--small-devices", "2", "--budget", "64MB")
    assert proc.returncode == 0, proc.stderr[-2000:]
    own = json.loads(proc.stdout)
    assert own["token_ids"] == one["token_ids"] and own["mesh"]["small_devices"] == 2
    assert len(own["mesh"]["bytes_per_device"]) == 4
    proc = _cli(*args, "--mesh", "tp=2", "--small-devices", "3")
    assert proc.returncode == 2 and "need 5 devices; JAX sees 4" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
