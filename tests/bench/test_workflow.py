"""`cascade bench workflow`: auto mixed precision against the uniform spec at the same bytes."""

import json
import os

from cascade import cli
from cascade.memory import planned_weight_bytes
from cascade.models import load_model

from tests.shared_data import DATA

BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
TRAIN = os.path.join(DATA, "text", "tinystories_train_00.txt")
VAL = os.path.join(DATA, "text", "tinystories_val.txt")


def test_bench_workflow_rows(capsys, tmp_path):
    out_file = tmp_path / "wf.json"
    code = cli.main(["bench", "workflow", BIN, "--calib", TRAIN, "--data", VAL, "--target", "int3-g32",
                     "--candidates", "int8,int4-g32,int3-g32", "--method", "rtn", "--granularity", "block",
                     "--calib-samples", "32", "--calib-len", "32", "--limit", "10", "--ctx", "128",
                     "--max-tokens", "2048", "--long-ctx", "128", "--long-tokens", "256", "--sens-samples", "8",
                     "--json", "--out", str(out_file)])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d == json.loads(out_file.read_text()) and d["benchmark"] == "workflow" and "partial" not in d
    assert d["sensitivity"]["tokens"] == 8 * 31  # --sens-samples sequences of 32 tokens: 31 predictions each
    rows = {(r["target"], r["config"], r["method"]): r for r in d["rows"]}
    assert set(rows) == {("int3-g32", c, "rtn") for c in ("uniform", "auto")}
    uniform, auto = rows[("int3-g32", "uniform", "rtn")], rows[("int3-g32", "auto", "rtn")]
    assert uniform["tokens"] == auto["tokens"]
    # the same bytes: the auto model fits in what the uniform spec takes, and spends most of it
    cfg = load_model(BIN).config
    assert auto["weight_bytes"] <= uniform["weight_bytes"] == planned_weight_bytes(cfg, "int3-g32")
    assert auto["weight_bytes"] > 0.9 * uniform["weight_bytes"]
    alloc = d["allocations"]["int3-g32"]
    assert set(alloc["units"]) == {"embed/embedding"} | {f"layers_{i}" for i in range(5)}
    assert alloc["model_bytes"] == auto["weight_bytes"]
    assert sum(sum(v.values()) for v in alloc["mix"].values()) == len(alloc["units"])
    assert alloc["measured_kl"] > 0 and alloc["predicted_kl"] > 0
    # bits a weight of the matrices: the whole model's bytes less the bf16 norms
    import jax

    leaves = jax.tree.leaves(load_model(BIN).params)
    norms = sum(2 * a.size for a in leaves if a.ndim == 1)
    n = sum(a.size for a in leaves if a.ndim == 2)
    assert abs(uniform["avg_bits"] - 8 * (uniform["weight_bytes"] - norms) / n) < 1e-9
    assert abs(auto["avg_bits"] - 8 * (auto["weight_bytes"] - norms) / n) < 1e-9
    assert "auto at the bytes of int3-g32: predicted KL" in bench_table(d)
    # the long-context check: the best auto model through an int8 cache, every scored token with >= 96 before it
    (lc,) = d["long_context"]
    assert (lc["target"], lc["config"], lc["method"], lc["kv"], lc["ctx"], lc["stride"]) == \
        ("int3-g32", "auto", "rtn", "int8", 128, 32)
    from cascade.models import split_documents, tokenize_documents
    from cascade.models.evaluation import perplexity

    model = load_model(BIN)
    with open(VAL) as f:
        docs = tokenize_documents(model.tokenizer, split_documents(f.read())[:10])
    ref = perplexity(model.params, cfg, [[t for doc in docs for t in doc]], ctx=128, stride=32, min_context=96,
                     max_tokens=256)
    assert abs(lc["float_ppl"] - ref.ppl) < 1e-4 * ref.ppl and lc["tokens"] == ref.tokens >= 256
    assert abs(lc["kv_change_pct"]) < 2 and lc["ppl_fp32_cache"] > lc["float_ppl"]
    assert abs(lc["vs_float_pct"] - 100 * (lc["ppl_kv"] / lc["float_ppl"] - 1)) < 1e-9
    assert "long context (int3-g32 auto, rtn): ctx 128" in bench_table(d)
    assert cli.main(["bench", "workflow", BIN, "--calib", TRAIN, "--data", VAL, "--method", "nope"]) == 2

    # the result's sensitivity reused: no sweep, the same allocation and rows (RTN is deterministic)
    same = ["bench", "workflow", BIN, "--calib", TRAIN, "--data", VAL, "--target", "int3-g32", "--method", "rtn",
            "--calib-samples", "32", "--calib-len", "32", "--limit", "10", "--ctx", "128", "--max-tokens", "2048",
            "--kv", "none", "--sensitivity", str(out_file)]
    capsys.readouterr()
    code = cli.main([*same, "--sens-samples", "8", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    again = json.loads(out)
    assert again["sensitivity"]["reused_from"] == str(out_file) and again["granularity"] == "block"
    assert again["sensitivity"]["rows"] == d["sensitivity"]["rows"] and again["long_context"] == []
    assert again["allocations"] == d["allocations"]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in d["rows"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again["rows"]] == strip
    assert f"(reused from {out_file})" in bench_table(again)
    # reused with other scoring tokens, or with its own candidates overridden: one-line errors
    assert cli.main([*same, "--sens-samples", "4"]) == 1
    assert "scored 248 tokens and these settings score 124" in capsys.readouterr().err
    assert cli.main([*same, "--candidates", "int8"]) == 2
    assert "--candidates come from the --sensitivity file" in capsys.readouterr().err


def bench_table(d):
    from cascade.bench import workflow

    return workflow.table(d)
