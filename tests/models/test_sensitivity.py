"""Layer sensitivity against a direct float64 computation, the proxy against its definition, and
the automatic rules under a budget."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from cascade import quant
from cascade.memory import planned_weight_bytes
from cascade.models.config import ModelConfig
from cascade.models.decoder import logits_of
from cascade.models.llama import init_params
from cascade.models.model import Model
from cascade.models.quantize import quantize_model
from cascade.models.sensitivity import (
    auto_rules, budget_from_avg_bits, layer_sensitivity, measured_kl, report_from_json, restrict, spearman, units_of,
)
from cascade.quant.allocate import InfeasibleBudget

CFG = ModelConfig(vocab_size=64, dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  max_seq_len=64, tie_embeddings=True)
CANDIDATES = ("int8", "int4-g16", "int2-g16-asym")


@pytest.fixture(scope="module")
def tiny():
    params = init_params(CFG, jax.random.key(0))
    # a little structure so that precision matters unevenly: scale one block's MLP up
    params["layers_1"]["mlp"]["down_proj"]["kernel"] = params["layers_1"]["mlp"]["down_proj"]["kernel"] * 8.0
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (6, 16), 0, 64), np.int32)
    report = layer_sensitivity(params, CFG, tokens, CANDIDATES, progress=False)
    return params, tokens, report


def _logp64(params, tokens, cfg=CFG):
    z = np.asarray(logits_of(params, cfg, tokens), np.float64)[:, :-1]
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl64(params, ref_params, tokens):
    def logp(p):
        z = np.asarray(logits_of(p, CFG, tokens), np.float64)[:, :-1]
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    q, r = logp(params), logp(ref_params)
    return float((np.exp(r) * (r - q)).sum(-1).mean())


def test_units_are_every_matrix_or_every_block(tiny):
    params, _, _ = tiny
    layers = units_of(params, "layer")
    assert set(layers) == {"embed/embedding"} | {f"layers_{i}/{m}/kernel" for i in range(2) for m in
                                                 ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
                                                  "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
    blocks = units_of(params, "block")
    assert set(blocks) == {"embed/embedding", "layers_0", "layers_1"} and len(blocks["layers_0"]) == 7
    with pytest.raises(ValueError, match="granularity"):
        units_of(params, "row")


def test_each_row_is_the_kl_of_the_model_with_that_unit_alone_quantized(tiny):
    params, tokens, report = tiny
    assert len(report.rows) == len(units_of(params)) * len(CANDIDATES)
    for r in report.rows:
        if r.unit not in ("layers_1/mlp/down_proj/kernel", "embed/embedding", "layers_0/attn/k_proj/kernel"):
            continue
        flat = traverse_util.flatten_dict(params, sep="/")
        axis = 1 if r.unit.startswith("embed/") else 0
        flat[r.unit] = quant.dequantize(quant.quantize(flat[r.unit], r.spec, axis=axis), "float32")
        want = _kl64(traverse_util.unflatten_dict(flat, sep="/"), params, tokens)
        assert r.kl == pytest.approx(want, rel=2e-3, abs=1e-7), r
        assert r.nbytes == quant.quantize(params_at(params, r.unit), r.spec, axis=axis).nbytes


def test_an_untied_head_and_every_starting_block_score_like_the_whole_model():
    """Each run starts at the first block whose input changes (the float hidden states before it are
    kept): the rows of the embedding, of each block and of a separate LM head equal the KL and loss
    change of the whole quantized model, computed in float64."""
    cfg = dataclasses.replace(CFG, tie_embeddings=False, n_layers=3)
    params = jax.tree.map(lambda a: a * 6.0 if a.ndim == 2 else a, init_params(cfg, jax.random.key(2)))  # attention that matters
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (5, 12), 0, 64), np.int32)
    report = layer_sensitivity(params, cfg, tokens, ["int2-g16-asym"], proxy=False, progress=False)
    ref = _logp64(params, tokens, cfg)
    nll = lambda lp: -np.take_along_axis(lp, tokens[:, 1:, None], -1).mean()  # noqa: E731
    checked = set()
    for r in report.rows:
        if r.unit not in ("embed/embedding", "lm_head/kernel", "layers_0/attn/q_proj/kernel",
                          "layers_1/mlp/up_proj/kernel", "layers_2/attn/o_proj/kernel"):
            continue
        flat = traverse_util.flatten_dict(params, sep="/")
        axis = 1 if r.unit.startswith("embed/") else 0
        flat[r.unit] = quant.dequantize(quant.quantize(flat[r.unit], r.spec, axis=axis), "float32")
        got = _logp64(traverse_util.unflatten_dict(flat, sep="/"), tokens, cfg)
        assert r.kl == pytest.approx(float((np.exp(ref) * (ref - got)).sum(-1).mean()), rel=2e-3, abs=1e-7), r
        assert r.delta_loss == pytest.approx(nll(got) - nll(ref), rel=2e-3, abs=1e-6), r
        assert r.kl > 1e-5
        checked.add(r.unit)
    assert len(checked) == 5
    assert report.base_loss == pytest.approx(nll(ref), rel=1e-5)


def params_at(params, path):
    return traverse_util.flatten_dict(params, sep="/")[path]


def test_the_proxy_is_the_hessian_weighted_error_of_the_layer_input(tiny):
    """Block 0's q_proj reads RMSNorm(embedding rows): mean over tokens of ||x dW||^2, in float64."""
    params, tokens, report = tiny
    emb = np.asarray(params["embed"]["embedding"], np.float64)[tokens].reshape(-1, CFG.dim)
    x = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + CFG.norm_eps)
    x = x * np.asarray(params["layers_0"]["attn_norm"]["scale"], np.float64)
    w = np.asarray(params["layers_0"]["attn"]["q_proj"]["kernel"], np.float64)
    for r in report.rows:
        if r.unit == "layers_0/attn/q_proj/kernel":
            dw = np.asarray(quant.dequantize(quant.quantize(w.astype(np.float32), r.spec), "float32"), np.float64) - w
            assert r.proxy == pytest.approx(((x @ dw) ** 2).sum(-1).mean(), rel=1e-4)
    assert all((r.proxy is None) == (r.unit == "embed/embedding") for r in report.rows)


def test_fewer_bits_move_the_model_more(tiny):
    _, _, report = tiny
    by_spec = {s: sum(r.kl for r in report.rows if r.spec == s) for s in CANDIDATES}
    assert by_spec["int8"] < by_spec["int4-g16"] < by_spec["int2-g16-asym"]
    rows = [r for r in report.rows if r.proxy is not None]
    assert report.rank_correlation == spearman([r.proxy for r in rows], [r.kl for r in rows])


def test_block_granularity_quantizes_the_whole_block(tiny):
    params, tokens, _ = tiny
    report = layer_sensitivity(params, CFG, tokens, ["int4-g16"], granularity="block", proxy=False, progress=False)
    row = next(r for r in report.rows if r.unit == "layers_1")
    model = Model(params=params, config=CFG, tokenizer=None)
    q, _ = quantize_model(model, "layers_1=int4-g16,embed=bf16,*=bf16", progress=False)
    # the other parameters in bf16 move the model a little: the block's KL dominates
    assert row.kl == pytest.approx(measured_kl(q.params, CFG, params, tokens), rel=0.05)


def test_auto_rules_spend_the_budget_where_the_kl_is(tiny):
    params, tokens, report = tiny
    budget = budget_from_avg_bits(report, 4.5)
    rules, summary = auto_rules(report, budget)
    assert summary["bytes"] <= budget and summary["avg_bits"] <= 4.5
    model = Model(params=params, config=CFG, tokenizer=None)
    q, _ = quantize_model(model, rules, progress=False)
    flat = traverse_util.flatten_dict(q.params, sep="/", is_leaf=lambda k, v: isinstance(v, quant.QuantizedTensor))
    for unit, pick in summary["units"].items():
        got = flat[unit]
        assert isinstance(got, quant.QuantizedTensor) and str(got.spec) == str(quant.parse_spec(pick["spec"]))
    norms = planned_weight_bytes(CFG, rules) - summary["bytes"]
    assert norms == sum(a.size * 2 for p, a in traverse_util.flatten_dict(params, sep="/").items() if a.ndim == 1)
    # the sensitive, scaled-up down_proj is kept at more bits than the average
    assert summary["units"]["layers_1/mlp/down_proj/kernel"]["spec"] != "int2-g16-asym"
    low = min(r.nbytes for r in report.rows if r.unit == "layers_0/mlp/up_proj/kernel")
    with pytest.raises(InfeasibleBudget, match="at least"):
        auto_rules(report, low)
    # and the allocation is no worse than the uniform spec of about the same size, as predicted
    uniform = sum(r.kl for r in report.rows if r.spec == "int4-g16")
    uniform_bytes = sum(r.nbytes for r in report.rows if r.spec == "int4-g16")
    _, same_bytes = auto_rules(report, uniform_bytes)
    assert same_bytes["predicted_kl"] <= uniform + 1e-12


def test_a_saved_report_reloads_to_the_same_allocation(tiny):
    params, _, report = tiny
    data = json.loads(json.dumps(report.to_json()))  # as `cascade sensitivity --out` writes it
    again = report_from_json(data, params)
    assert sorted(again.rows, key=lambda r: (r.unit, r.spec)) == sorted(report.rows, key=lambda r: (r.unit, r.spec))
    assert (again.units, again.params, again.granularity, again.tokens) == (report.units, report.params, "layer", report.tokens)
    budget = budget_from_avg_bits(report, 4.5)

    def plan(r):  # the choice per unit and its totals (the rules' order follows the rows')
        rules, summary = auto_rules(r, budget)
        return dict(rules.rules), summary["units"], summary["bytes"], pytest.approx(summary["predicted_kl"], rel=1e-12)

    assert plan(again) == plan(report)
    # a bench workflow result keeps the rows under "sensitivity" and the granularity beside it
    wrapped = {"granularity": "layer", "spec_version": 2, "sensitivity": {"tokens": report.tokens, "rows": data["rows"]}}
    assert plan(report_from_json(wrapped, params)) == plan(report)
    # a report written before spec grammar version 2 (no spec_version): its int4-g16 was the narrow grid
    old = report_from_json({k: v for k, v in wrapped.items() if k != "spec_version"}, params)
    assert {r.spec for r in old.rows} == {r.spec for r in report.rows} - {"int4-g16"} | {"int4-g16-narrow"}
    fewer = restrict(again, ["int8", "int4-g16"])
    assert {r.spec for r in fewer.rows} == {"int8", "int4-g16"} and len(fewer.rows) == 2 * len(report.units)
    with pytest.raises(ValueError, match="no candidate left"):
        restrict(again, ["int3-g32"])


def test_a_report_of_another_model_is_refused(tiny):
    params, _, report = tiny
    data = json.loads(json.dumps(report.to_json()))
    wider = init_params(dataclasses.replace(CFG, hidden_dim=64), jax.random.key(0))
    with pytest.raises(ValueError, match="does not match this model: layers_./mlp/.* bytes there and .* here"):
        report_from_json(data, wider)
    deeper = init_params(dataclasses.replace(CFG, n_layers=3), jax.random.key(0))
    with pytest.raises(ValueError, match="no row for layers_2"):
        report_from_json(data, deeper)
    with pytest.raises(ValueError, match="has unit 'layers_1/.*', which the model has no layer of"):
        report_from_json(data, init_params(dataclasses.replace(CFG, n_layers=1), jax.random.key(0)))
    with pytest.raises(ValueError, match="another --scale-dtype"):
        report_from_json(data, params, scale_dtype="float32")
    with pytest.raises(ValueError, match="not a sensitivity report"):
        report_from_json({"rows": []}, params)
    bad = json.loads(json.dumps(data))
    bad["rows"][0]["kl"] = float("nan")
    with pytest.raises(ValueError, match="non-finite KL"):
        report_from_json(bad, params)


def test_spearman_on_hand_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr
    with pytest.raises(ValueError):
        spearman([1], [1])


def test_a_quantized_model_is_refused():
    params = init_params(CFG, jax.random.key(0))
    params["layers_0"]["attn"]["q_proj"]["kernel"] = quant.quantize(params["layers_0"]["attn"]["q_proj"]["kernel"], "int8")
    with pytest.raises(ValueError, match="float model"):
        layer_sensitivity(params, CFG, np.zeros((2, 8), np.int32), ["int4"], progress=False)


# -- the command line --------------------------------------------------------------------------

import os  # noqa: E402

from cascade import cli  # noqa: E402
from cascade.models import load_checkpoint  # noqa: E402

from tests.shared_data import DATA  # noqa: E402

BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
TRAIN = os.path.join(DATA, "text", "tinystories_train_00.txt")
SMALL = ("--calib", TRAIN, "--calib-len", "32", "--granularity", "block")


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_sensitivity_command_writes_a_table_json_and_a_chart(capsys, tmp_path):
    out_json, png = tmp_path / "sens.json", tmp_path / "sens.png"
    code, out, err = run(capsys, "sensitivity", BIN, *SMALL, "--quant", "int8,int3-g32", "--json",
                         "--out", str(out_json), "--plot", str(png))
    assert code == 0, err
    got = json.loads(out)
    assert got == json.loads(out_json.read_text()) and got["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    units = {r["unit"] for r in got["rows"]}
    assert units == {"embed/embedding"} | {f"layers_{i}" for i in range(5)}
    kl = {(r["unit"], r["spec"]): r["kl"] for r in got["rows"]}
    assert all(kl[(u, "int8")] < kl[(u, "int3-g32")] for u in units)
    assert [r["kl"] for r in got["rows"]] == sorted((r["kl"] for r in got["rows"]), reverse=True)
    assert -1 <= got["rank_correlation"] <= 1 and got["calibration"]["length"] == 32
    code, _, err = run(capsys, "sensitivity", BIN, *SMALL, "--quant", "int8,int3-g32")
    assert code == 0 and "| block | weights | KL int8 | KL int3-g32 |" in err and "rank correlation" in err


def test_quantize_auto_chooses_precisions_under_the_average_bits(capsys, tmp_path):
    out_dir, rules_file = str(tmp_path / "auto"), str(tmp_path / "rules.json")
    code, out, err = run(capsys, "quantize", BIN, "--quant", "auto", "--avg-bits", "5", "--candidates", "int8,int3-g32",
                         *SMALL, "--rules-out", rules_file, "-o", out_dir, "--json")
    assert code == 0, err
    auto = json.loads(out)["auto"]
    assert auto["avg_bits"] <= 5 and set(u["spec"] for u in auto["units"].values()) == {"int8", "int3-g32"}
    assert auto["measured_kl"] > 0 and auto["predicted_kl"] > 0
    assert json.loads(open(rules_file).read()) == auto["rules"]
    # --calib without --method: the default calibrated method, on each chosen spec's -mse ranges
    assert json.loads(out)["method"] == "awq-gptq" and json.loads(out)["method_default"]
    model = load_checkpoint(out_dir)
    flat = traverse_util.flatten_dict(model.params, sep="/", is_leaf=lambda k, v: isinstance(v, quant.QuantizedTensor))
    for path, leaf in flat.items():
        if path.startswith("layers_") and path.endswith("/kernel"):
            want = auto["units"][path.split("/")[0]]["spec"]
            assert str(leaf.spec) == str(quant.parse_spec(want + "-mse")), path
    # the rules file is a --quant FILE like any other, and gives the same model
    code, out, err = run(capsys, "quantize", BIN, "--quant", rules_file, "--json")
    assert code == 0 and json.loads(out)["bytes_after"] == auto["model_bytes"]


def test_quantize_auto_reuses_a_saved_sensitivity(capsys, tmp_path):
    report = str(tmp_path / "sens.json")
    code, _, err = run(capsys, "sensitivity", BIN, *SMALL, "--quant", "int8,int3-g32", "--out", report)
    assert code == 0, err
    from cascade.models import load_model
    from cascade.models.sensitivity import plan_rules

    loaded = load_model(BIN)
    rules, expected = plan_rules(report_from_json(json.load(open(report)), loaded.params), loaded.config, avg_bits=5)
    # the measurement read back: its choice, and no sensitivity runs (and no --calib needed for RTN)
    code, out, err = run(capsys, "quantize", BIN, "--quant", "auto", "--avg-bits", "5", "--sensitivity", report, "--json")
    assert code == 0, err
    reused = json.loads(out)["auto"]
    assert f"reusing the sensitivity measured in {report}" in err and "measured_kl" not in reused
    assert {u: v["spec"] for u, v in reused["units"].items()} == {u: v["spec"] for u, v in expected["units"].items()}
    assert sorted(map(tuple, reused["rules"]["rules"])) == sorted(map(tuple, rules.to_json()["rules"]))
    assert len({v["spec"] for v in reused["units"].values()}) == 2
    # with --calib the additivity check runs as without reuse
    code, out, err = run(capsys, "quantize", BIN, "--quant", "auto", "--avg-bits", "5", "--sensitivity", report,
                         "--calib", TRAIN, "--calib-len", "32", "--json")
    assert code == 0 and json.loads(out)["auto"]["measured_kl"] > 0, err
    code, _, err = run(capsys, "quantize", BIN, "--quant", "auto", "--avg-bits", "5", "--sensitivity", report,
                       "--granularity", "layer")
    assert code == 2 and "--granularity come from the --sensitivity file" in err
    code, _, err = run(capsys, "quantize", BIN, "--quant", "int4", "--sensitivity", report)
    assert code == 2 and "--sensitivity applies only to --quant auto" in err
    (tmp_path / "junk.json").write_text("{not json")
    code, _, err = run(capsys, "quantize", BIN, "--quant", "auto", "--avg-bits", "5", "--sensitivity",
                       str(tmp_path / "junk.json"))
    assert code == 2 and "not a JSON file" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "quantize", "default-small", "--quant", "auto", "--avg-bits", "5", "--sensitivity", report)
    assert code == 1 and "does not match this model" in err and len(err.strip().splitlines()) == 1, err


def test_per_tensor_candidates_are_skipped_for_a_calibrated_method(capsys, tmp_path):
    code, out, err = run(capsys, "quantize", BIN, "--quant", "auto", "--avg-bits", "9", "--candidates",
                         "int8-tensor,int8", "--method", "gptq", *SMALL, "--calib-samples", "32", "--json")
    assert code == 0, err
    assert "note: skipping candidate int8-tensor: --method gptq does not support per-tensor specs" in err
    assert {u["spec"] for u in json.loads(out)["auto"]["units"].values()} == {"int8"}
    code, out, err = run(capsys, "quantize", BIN, "--quant", "auto", "--avg-bits", "8", "--candidates", "int8-tensor",
                         "--method", "awq", *SMALL)
    assert code == 2 and "no candidate precision that --method awq supports" in err


@pytest.mark.parametrize("args, code, message", [
    (("--quant", "int4", "--avg-bits", "4"), 2, "--avg-bits applies only to --quant auto"),
    (("--quant", "auto", "--calib", TRAIN), 2, "--quant auto needs exactly one of --avg-bits or --budget"),
    (("--quant", "auto", "--avg-bits", "4", "--budget", "1MB", "--calib", TRAIN), 2, "exactly one of"),
    (("--quant", "auto", "--avg-bits", "4"), 2, "--quant auto measures each layer's sensitivity on calibration text"),
    (("--quant", "auto", "--avg-bits", "4", "--candidates", "int4,int9", "--calib", TRAIN), 2, "int9"),
    (("--quant", "auto", "--budget", "lots", "--calib", TRAIN), 2, "cannot read 'lots' as a size"),
    (("--quant", "auto", "--budget", "20KB", "--candidates", "int8,int3-g32", *SMALL), 1,
     "budget of 20,000 bytes is below the smallest candidates of all layers together: at least"),
    (("--quant", "auto", "--avg-bits", "1", "--candidates", "int8,int3-g32", *SMALL), 1,
     "1 bits a weight is below the smallest candidates of all layers together: at least 3."),
])
def test_bad_auto_flags_are_one_line_errors(capsys, tmp_path, args, code, message):
    got, out, err = run(capsys, "quantize", BIN, *args, "-o", str(tmp_path / "out"))
    assert got == code and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")
