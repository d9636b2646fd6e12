"""PTQ methods on whole models: the sequential calibration loop, GPTQ/AWQ/HQQ against RTN on a
real model, recorded recipes, and the `cascade quantize --method` command line."""

import json
import os

import jax
import numpy as np
import pytest

from cascade import cli, quant
from cascade.models import calibration, load_model
from cascade.models.config import ModelConfig
from cascade.models.evaluation import perplexity, split_documents, tokenize_documents
from cascade.models.llama import init_params
from cascade.models.model import Model
from cascade.models.quantize import (
    BLOCK_LINEARS, _autoround_step, _get, _gptq_retrying, calibrated_blocks, micro_batch, quantize_model,
)
from cascade.quant.gptq import gptq_quantize
from cascade.quant.qtensor import QuantizedTensor

from tests.shared_data import DATA

BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
TRAIN = os.path.join(DATA, "text", "tinystories_train_00.txt")
VAL = os.path.join(DATA, "text", "tinystories_val.txt")
CFG = ModelConfig(vocab_size=64, dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  max_seq_len=64, tie_embeddings=True)


@pytest.mark.parametrize("within_block", [False, True], ids=["block", "input-by-input"])
def test_each_block_is_calibrated_on_the_quantized_outputs_of_the_blocks_before_it(within_block):
    params = init_params(CFG, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 8), 0, 64), np.int32)
    calib = calibration.CalibrationSet(tokens=tokens, recipe={})
    seen, calls = {}, []

    def rtn_block(name, block, specs, stats):
        seen.setdefault(name, {}).update(stats)
        calls.append((name, tuple(specs), tuple(stats)))
        return block, {layer: quant.quantize(block[layer.split("/")[0]][layer.split("/")[1]]["kernel"], spec)
                       for layer, spec in specs.items()}

    _, done = calibrated_blocks(params, CFG, quant.PrecisionRules.parse("int3-g16"), calib, rtn_block, desc="t",
                                within_block=within_block, progress=False)
    assert len(done) == 14 and all(isinstance(q, QuantizedTensor) for q in done.values())
    if within_block:  # one call per input, in forward order, with the layers reading it
        assert calls[:4] == [("layers_0", calibration.INPUTS[g], (g,)) for g in ("attn", "o", "mlp", "down")]
    else:
        assert calls[0][:2] == ("layers_0", BLOCK_LINEARS) and set(calls[0][2]) == set(calibration.INPUTS)
    h0 = calibration.embed_tokens(params, tokens)
    deq0 = jax.tree.map(lambda a: a, params["layers_0"])
    for path, q in done.items():
        if path.startswith("layers_0/"):
            _, mod, lin, _ = path.split("/")
            deq0 = {**deq0, mod: {**deq0[mod], lin: {"kernel": quant.dequantize(q, "float32")}}}
    want = calibration.block_statistics(params["layers_1"], CFG, calibration.block_outputs(deq0, CFG, h0))
    float_path = calibration.block_statistics(params["layers_1"], CFG, calibration.block_outputs(params["layers_0"], CFG, h0))
    np.testing.assert_allclose(seen["layers_1"]["attn"].hessian, want["attn"].hessian, rtol=1e-5)
    assert not np.allclose(seen["layers_1"]["attn"].hessian, float_path["attn"].hessian, rtol=1e-3)


def test_a_hessian_that_is_not_positive_definite_is_retried_then_named():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    x = rng.normal(size=(4, 16))  # rank 4 < 16: singular without dampening
    q = _gptq_retrying(gptq_quantize, w, x.T @ x, "int4", "layers_0/attn/q_proj/kernel", damp=0.0)
    assert isinstance(q, QuantizedTensor)  # the retry with more dampening succeeded
    with pytest.raises(ValueError, match=r"layers_3/mlp/up_proj/kernel: the Hessian is not positive definite.*tried"):
        _gptq_retrying(gptq_quantize, w, -np.eye(16), "int4", "layers_3/mlp/up_proj/kernel", damp=0.01)


@pytest.fixture(scope="module")
def stories(stories260k):
    model = stories260k
    calib = calibration.calibration_tokens(model.tokenizer, TRAIN, samples=64, length=256, seed=0)
    with open(VAL) as f:
        docs = tokenize_documents(model.tokenizer, split_documents(f.read())[:60])
    return model, calib, docs


def _ppl(model, docs):
    return perplexity(model.params, model.config, docs, ctx=256, progress=False).ppl


def test_gptq_awq_hqq_and_awq_gptq_beat_rtn_on_stories260K_at_3_bits(stories):
    """The README's PTQ table, in small: every method lowers RTN's perplexity at int3-g32."""
    model, calib, docs = stories
    calibrated = ("gptq", "awq", "awq-gptq")
    ppl = {m: _ppl(quantize_model(model, "int3-g32", method=m, calib=calib if m in calibrated else None,
                                  progress=False)[0], docs) for m in ("rtn", "gptq", "awq", "hqq", "awq-gptq")}
    base = _ppl(model, docs)
    assert base < min(ppl.values())
    for m in ("gptq", "awq", "hqq", "awq-gptq"):
        assert ppl[m] < ppl["rtn"], ppl
    for m in calibrated:  # calibrated: a large share of the gap
        assert ppl[m] < ppl["rtn"] - 0.3 * (ppl["rtn"] - base), ppl


def test_autoround_trains_each_block_on_quantized_inputs_toward_the_float_outputs():
    """``targets``: block i gets (the hidden states of the model quantized so far, the float block's
    outputs on the float model's hidden states)."""
    params = init_params(CFG, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 8), 0, 64), np.int32)
    calib = calibration.CalibrationSet(tokens=tokens, recipe={})
    seen = {}

    def rtn_block(name, block, specs, data):
        seen[name] = data
        return block, {layer: quant.quantize(block[layer.split("/")[0]][layer.split("/")[1]]["kernel"], spec)
                       for layer, spec in specs.items()}

    _, done = calibrated_blocks(params, CFG, quant.PrecisionRules.parse("int3-g16"), calib, rtn_block, desc="t",
                                targets=True, progress=False)
    h0 = calibration.embed_tokens(params, tokens)
    np.testing.assert_array_equal(seen["layers_0"][0], h0)
    y0 = calibration.block_outputs(params["layers_0"], CFG, h0)
    np.testing.assert_allclose(seen["layers_0"][1], y0, rtol=1e-6)
    deq0 = dict(params["layers_0"])
    for path, q in done.items():
        if path.startswith("layers_0/"):
            _, mod, lin, _ = path.split("/")
            deq0 = {**deq0, mod: {**deq0[mod], lin: {"kernel": quant.dequantize(q, "float32")}}}
    np.testing.assert_allclose(seen["layers_1"][0], calibration.block_outputs(deq0, CFG, h0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["layers_1"][1], calibration.block_outputs(params["layers_1"], CFG, y0), rtol=1e-5)
    assert not np.allclose(seen["layers_1"][0], y0, rtol=1e-3)


def test_an_autoround_step_in_micro_batches_is_the_step_on_the_whole_batch():
    """Gradient accumulation over micro-batches changes the speed, not the step: the same loss and
    the same signed update as one forward/backward over all the sequences."""
    from cascade.quant import autoround

    block = init_params(CFG, jax.random.key(0))["layers_0"]
    spec = quant.parse_spec("int3-g16")
    kernels = {layer: _get(block, f"{layer}/kernel") for layer in BLOCK_LINEARS}
    layers = tuple((layer, spec, tuple(k.shape)) for layer, k in kernels.items())
    consts, params = {}, {}
    for layer, k in kernels.items():
        consts[layer], p = autoround.init(k, spec)
        params[layer] = {**p, "v": jax.random.uniform(jax.random.key(len(params)), p["v"].shape, minval=-0.4, maxval=0.4)}
    x = jax.random.normal(jax.random.key(2), (6, 16, CFG.dim))
    y = jax.random.normal(jax.random.key(3), (6, 16, CFG.dim))
    lr = np.float32(0.01)
    whole_loss, whole = _autoround_step(params, consts, block, x, y, lr, CFG, layers, 6)
    for chunk in (1, 2, 3):
        loss, new = _autoround_step(params, consts, block, x, y, lr, CFG, layers, chunk)
        np.testing.assert_allclose(float(loss), float(whole_loss), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(whole)):
            assert np.mean(np.asarray(a) == np.asarray(b)) > 0.999  # a sign may flip on a ~0 gradient
    assert [micro_batch(n) for n in (1, 2, 3, 8, 9)] == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match="micro-batches"):
        _autoround_step(params, consts, block, x, y, lr, CFG, layers, 4)


def test_autoround_beats_rtn_on_stories260K_at_3_bits(stories):
    """A short AutoRound run (30 steps a block instead of 200) already closes most of RTN's gap."""
    model, calib, docs = stories
    rtn = _ppl(quantize_model(model, "int3-g32", progress=False)[0], docs)
    ar, _ = quantize_model(model, "int3-g32", method="autoround", calib=calib, iters=30, batch=4, progress=False)
    base = _ppl(model, docs)
    got = _ppl(ar, docs)
    assert base < got < rtn - 0.5 * (rtn - base), (base, got, rtn)
    assert ar.ptq["settings"] == {"iters": 30, "lr": None, "batch": 4, "seed": 0}
    with pytest.raises(ValueError, match="settings of autoround, not of gptq"):
        quantize_model(model, "int3-g32", method="gptq", calib=calib, iters=5)


def test_awq_gptq_runs_gptq_on_the_folded_kernels_with_the_scaled_inputs_hessian(monkeypatch):
    """awq-gptq: each kernel GPTQ sees is the AWQ-folded one, and its Hessian is that of the
    folded block's own inputs (diag(1/s) XᵀX diag(1/s), checked against statistics recomputed
    on the folded block)."""
    from cascade.models import quantize as quantize_mod

    params = init_params(CFG, jax.random.key(3))
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (4, 16), 0, 64), np.int32)
    calib = calibration.CalibrationSet(tokens=tokens, recipe={})
    seen = {}
    real = quantize_mod._gptq_retrying

    def spy(fn, w, h, spec, path, **kw):
        seen[path] = (np.asarray(w), np.asarray(h))
        return real(fn, w, h, spec, path, **kw)

    monkeypatch.setattr(quantize_mod, "_gptq_retrying", spy)
    block_fn = quantize_mod.awq_block_quantizer(CFG, grid=10, scale_dtype="float16",
                                                gptq={"damp": 0.01, "act_order": False, "block_size": 128})
    h0 = calibration.embed_tokens(params, tokens)
    stats = calibration.block_statistics(params["layers_0"], CFG, h0)
    specs = {layer: quant.parse_spec("int3-g16") for layer in BLOCK_LINEARS}
    folded, out = block_fn("layers_0", params["layers_0"], specs, stats)
    assert set(out) == set(BLOCK_LINEARS) and len(seen) == len(BLOCK_LINEARS)
    refolded = calibration.block_statistics(folded, CFG, h0)
    moved = 0
    for layer in BLOCK_LINEARS:
        w, h = seen[f"layers_0/{layer}/kernel"]
        mod, lin = layer.split("/")
        np.testing.assert_array_equal(w, np.asarray(folded[mod][lin]["kernel"]))
        want = refolded[calibration.INPUT_OF[layer]].hessian
        np.testing.assert_allclose(h, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
        moved += not np.allclose(h, stats[calibration.INPUT_OF[layer]].hessian, rtol=1e-3)
    assert moved  # the scales are not all 1: the test can tell scaled from unscaled


def test_the_recipe_is_recorded_and_survives_a_checkpoint(stories, tmp_path):
    from cascade.models import load_checkpoint, save_checkpoint

    model, calib, _ = stories
    q, _ = quantize_model(model, "attn=int8,*=int4-g32", method="gptq", calib=calib, act_order=True, progress=False)
    assert str(q.params["layers_2"]["attn"]["o_proj"]["kernel"].spec) == "int8"
    assert str(q.params["layers_2"]["mlp"]["down_proj"]["kernel"].spec) == "int4-g32"
    assert q.ptq["method"] == "gptq" and q.ptq["settings"] == {"damp": 0.01, "act_order": True, "block_size": 128}
    assert q.ptq["calibration"] == calib.recipe
    save_checkpoint(tmp_path / "ck", q)
    back = load_checkpoint(tmp_path / "ck")
    assert back.ptq == q.ptq and back.quant == q.quant
    for a, b in zip(jax.tree.leaves(q.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_gptq_checkpoint_runs_in_the_cascade(capsys, tmp_path):
    """default-small quantized with GPTQ, saved, inspected, and used as the draft of `cascade run`."""
    out_dir = str(tmp_path / "small-gptq")
    code, out, err = run(capsys, "quantize", "default-small", "--quant", "int4-g32", "--method", "gptq", "--calib", TRAIN,
                         "--calib-samples", "32", "--calib-len", "128", "-o", out_dir, "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["ptq"]["method"] == "gptq" and payload["ptq"]["calibration"]["samples"] == 32
    code, out, err = run(capsys, "inspect", out_dir, "--json")
    assert code == 0 and json.loads(out)["ptq"] == payload["ptq"]
    code, _, err = run(capsys, "inspect", out_dir)
    assert "quantized with: gptq (damp 0.01, act_order False, block_size 128); calibrated on 32 x 128 tokens" in err
    args = ("run", "Once upon a time", "--max-tokens", "16", "--json")
    code, out, err = run(capsys, *args, "--small-model", out_dir, "--small", "source")
    assert code == 0, err
    spec = json.loads(out)
    large = json.loads(run(capsys, *args, "--mode", "large")[1])
    assert spec["token_ids"] == large["token_ids"]  # exact: the GPTQ draft only changes the speed
    assert spec["speculative"]["acceptance_rate"] > 0.3


@pytest.mark.parametrize("args, code, message", [
    (("--method", "gptq"), 2, "--method gptq needs calibration text: pass --calib FILE"),
    (("--method", "rtn", "--calib", TRAIN), 2,
     "--calib applies only to --method gptq, awq, awq-gptq, autoround, smoothquant or the default method (or to --quant auto or w8a8-static rules), not to --method rtn"),
    (("--method", "rtn", "--quant", "w8a8-static"), 2, "w8a8-static measures its activation scales on calibration text"),
    (("--method", "gptq", "--calib", TRAIN, "--alpha", "0.3"), 2, "--alpha applies only to --method smoothquant, not to --method gptq"),
    (("--method", "smoothquant", "--calib", TRAIN, "--alpha", "1.5"), 2, "1.5 is not in [0, 1] (or give 'auto')"),
    (("--method", "smoothquant", "--calib", TRAIN, "--alpha", "nan"), 2, "nan is not in [0, 1]"),
    (("--method", "smoothquant", "--calib", TRAIN, "--alpha", "best"), 2, "'best' is neither a number in [0, 1] nor 'auto'"),
    (("--method", "gptq", "--calib", TRAIN, "--iters", "5"), 2, "--iters applies only to --method autoround, not to --method gptq"),
    (("--method", "hqq", "--calib-samples", "64"), 2, "--calib-samples applies only to --method gptq, awq, awq-gptq"),
    (("--method", "awq", "--calib", TRAIN, "--damp", "0.1"), 2, "--damp applies only to --method gptq or awq-gptq, not to --method awq"),
    (("--method", "gptq", "--calib", "no/such.txt"), 2, "no/such.txt: no such file"),
    (("--method", "gptq", "--calib", TRAIN, "--calib-samples", "16"), 2, "16 is not in the range 32<=x<=1024"),
    (("--method", "gptq", "--calib", TRAIN, "--calib-len", "600"), 2, "600 exceeds the model context (512)"),
    (("--method", "nope"), 2, "'nope' is not one of"),
    (("--method", "gptq", "--calib", VAL, "--calib-samples", "1024"), 1, "1024 samples of 512 tokens need"),
    (("--method", "awq", "--calib", TRAIN, "--quant", "mlp=int8-tensor,*=int4"), 2,  # before any work (issue 38)
     "awq does not support per-tensor specs (int8-tensor, for layers_0/mlp/gate_proj/kernel)"),
    (("--method", "gptq", "--calib", TRAIN, "--calib-samples", "32", "--quant", "down_proj=w8a8-had,*=int8"), 2,
     "gptq cannot produce w8a8-had weights (stored Hadamard-rotated; layers_0/mlp/down_proj/kernel): use --method rtn"),
    (("--quant", "int8-had"), 2, "unknown token 'had' in precision spec 'int8-had'"),
])
def test_bad_ptq_flags_are_one_line_errors(capsys, tmp_path, args, code, message):
    got, out, err = run(capsys, "quantize", BIN, "--quant", "int4-g32", *args, "-o", str(tmp_path / "out"))
    assert got == code and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_an_empty_calibration_file_is_refused(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    got, _, err = run(capsys, "quantize", BIN, "--quant", "int4-g32", "--method", "awq", "--calib", str(empty))
    # a usage error found before the model loads (issue 38: validate before any work)
    assert got == 2 and "holds no documents" in err and "--calib" in err and len(err.strip().splitlines()) == 1


def test_hqq_on_a_model_records_its_method(stories):
    model, _, _ = stories
    q, report = quantize_model(model, "int4-g32-asym", method="hqq", progress=False)
    r, rtn_report = quantize_model(model, "int4-g32-asym", progress=False)
    assert q.ptq == {"method": "hqq", "source": BIN, "settings": {}, "calibration": None, "seconds": q.ptq["seconds"]}
    errs = {x.path: x.rel_error for x in rtn_report.layers if x.spec == "int4-g32-asym"}
    hqq_errs = {x.path: x.rel_error for x in report.layers if x.spec == "int4-g32-asym"}
    assert errs and all(hqq_errs[p] < errs[p] for p in errs)  # every kernel's weight error falls
    with pytest.raises(ValueError, match="hqq does not use calibration data"):
        quantize_model(model, "int4", method="hqq", calib=object())
    with pytest.raises(ValueError, match="gptq needs calibration data"):
        quantize_model(model, "int4", method="gptq")
    with pytest.raises(ValueError, match="unknown PTQ method 'x'"):
        quantize_model(model, "int4", method="x")


def test_the_command_line_offers_every_method_the_api_has():
    """cli.py keeps its own copy of the method names (parsing must not import jax): keep them equal."""
    from cascade.models import quantize as q

    assert cli.PTQ_METHODS == q.METHODS and cli.CALIBRATED_METHODS == q.CALIBRATED


# -- W8A8 and SmoothQuant ---------------------------------------------------------------------------

def _outlier_model():
    """A tiny random model whose norm outputs carry a few 40x outlier channels (the activation
    outliers of trained LLMs), made so by scaling norm entries up and the kernel rows reading them
    down: the float function is unchanged, per-token int8 activations are not."""
    from tests.quant.test_awq import CFG as SQ_CFG, _random_params

    params = jax.tree.map(lambda a: np.array(a, np.float32), _random_params(3))
    for norm, layers in (("attn_norm", ("q_proj", "k_proj", "v_proj")), ("mlp_norm", ("gate_proj", "up_proj"))):
        module = "attn" if norm == "attn_norm" else "mlp"
        for ch in (5, 40):
            params["layers_0"][norm]["scale"][ch] *= 40.0
            for layer in layers:
                params["layers_0"][module][layer]["kernel"][ch] /= 40.0
    tokens = np.random.default_rng(7).integers(0, SQ_CFG.vocab_size, (32, 16)).astype(np.int32)
    calib = calibration.CalibrationSet(tokens=tokens, recipe={"file": "random"})
    return Model(config=SQ_CFG, params=params, source="outliers"), calib


def _kl(model, reference, tokens):
    from cascade.models.decoder import logits_of

    p = jax.nn.log_softmax(logits_of(reference.params, reference.config, tokens))
    q = jax.nn.log_softmax(logits_of(model.params, model.config, tokens))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("spec", ["w8a8", "w8a8-static"])
def test_smoothquant_rescues_w8a8_from_activation_outliers(spec):
    model, calib = _outlier_model()
    held_out = np.random.default_rng(8).integers(0, model.config.vocab_size, (4, 16)).astype(np.int32)
    plain, _ = quantize_model(model, spec, method="rtn", calib=calib if spec == "w8a8-static" else None, progress=False)
    smooth, _ = quantize_model(model, spec, method="smoothquant", calib=calib, progress=False)
    weights_only, _ = quantize_model(model, "int8", progress=False)
    kl_plain, kl_smooth, kl_w8 = (_kl(m, model, held_out) for m in (plain, smooth, weights_only))
    assert kl_smooth < 0.5 * kl_plain, (kl_smooth, kl_plain)
    assert kl_w8 < kl_plain  # the loss of plain W8A8 is the activations', not the weights'
    assert smooth.ptq["method"] == "smoothquant" and smooth.ptq["settings"] == {"alpha": 0.5}
    q_proj = smooth.params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert str(q_proj.spec) == spec and (q_proj.act_scale is not None) == (spec == "w8a8-static")


@pytest.mark.parametrize("spec", ["w8a8-had", "w8a8-static-had"])
def test_a_hadamard_rotation_rescues_w8a8_from_activation_outliers(spec, tmp_path):
    """The rotation spreads the 40x channels: RTN with the rotated spec halves plain W8A8's KL at
    least; SmoothQuant runs with it too; the checkpoint saves and loads to the same logits."""
    from cascade.models import load_checkpoint, save_checkpoint
    from cascade.models.decoder import logits_of

    model, calib = _outlier_model()
    static = "static" in spec
    held_out = np.random.default_rng(8).integers(0, model.config.vocab_size, (4, 16)).astype(np.int32)
    plain, _ = quantize_model(model, spec.removesuffix("-had"), method="rtn", calib=calib if static else None,
                              progress=False)
    rotated, report = quantize_model(model, spec, method="rtn", calib=calib if static else None, progress=False)
    smooth, _ = quantize_model(model, spec, method="smoothquant", calib=calib, alpha="auto", progress=False)
    kl_plain, kl_rot, kl_smooth = (_kl(m, model, held_out) for m in (plain, rotated, smooth))
    assert kl_rot < 0.5 * kl_plain and kl_smooth < 0.5 * kl_plain, (kl_rot, kl_smooth, kl_plain)
    q_proj = rotated.params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert str(q_proj.spec) == spec and q_proj.nbytes == quant.storage_nbytes(q_proj.shape, spec)
    save_checkpoint(str(tmp_path / "ckpt"), rotated)
    back = load_checkpoint(str(tmp_path / "ckpt"))
    assert str(back.params["layers_0"]["mlp"]["down_proj"]["kernel"].spec) == spec
    np.testing.assert_array_equal(np.asarray(logits_of(back.params, back.config, held_out)),
                                  np.asarray(logits_of(rotated.params, rotated.config, held_out)))


def test_alpha_auto_picks_each_inputs_strength_on_the_calibration_rows():
    """``alpha="auto"`` records one searched strength per input of every block, each the argmin of
    the W8A8 error over the grid on that block's rows; on the outlier model it does no worse than
    the default alpha (it may pick 0.5 itself), and inputs read only by weight-only layers (here
    the down projections, kept int8) are not searched."""
    from cascade.quant.smoothquant import ALPHA_GRID

    model, calib = _outlier_model()
    held_out = np.random.default_rng(8).integers(0, model.config.vocab_size, (4, 16)).astype(np.int32)
    fixed, _ = quantize_model(model, "w8a8", method="smoothquant", calib=calib, progress=False)
    auto, _ = quantize_model(model, "w8a8", method="smoothquant", calib=calib, alpha="auto", progress=False)
    settings = auto.ptq["settings"]
    assert settings["alpha"] == "auto" and settings["grid"] == list(ALPHA_GRID)
    assert set(settings["alphas"]) == {f"layers_{i}" for i in range(model.config.n_layers)}
    assert all(set(a) == {"attn", "o", "mlp", "down"} and set(a.values()) <= set(ALPHA_GRID)
               for a in settings["alphas"].values())
    assert _kl(auto, model, held_out) <= 1.05 * _kl(fixed, model, held_out)
    mixed, _ = quantize_model(model, "down_proj=int8,*=w8a8", method="smoothquant", calib=calib, alpha="auto",
                              progress=False)
    assert all(set(a) == {"attn", "o", "mlp"} for a in mixed.ptq["settings"]["alphas"].values())
    with pytest.raises(ValueError, match="a number in \\[0, 1\\] or 'auto', got 'best'"):
        quantize_model(model, "w8a8", method="smoothquant", calib=calib, alpha="best", progress=False)


def test_static_activation_scales_are_the_calibration_maximum_of_each_input():
    """layers_0's q/k/v read RMSNorm(embedding rows): their scale is max|that| / 127 over the
    calibration tokens, computed here in numpy from the quantized model's own (bf16) parameters."""
    model, calib = _outlier_model()
    for method in ("rtn", "smoothquant"):
        q, report = quantize_model(model, "w8a8-static", method=method, calib=calib, progress=False)
        p = jax.tree.map(lambda a: a if isinstance(a, QuantizedTensor) else np.asarray(a, np.float32), q.params,
                         is_leaf=lambda a: isinstance(a, QuantizedTensor))
        x = p["embed"]["embedding"][calib.tokens]
        h = x / np.sqrt((x * x).mean(-1, keepdims=True) + model.config.norm_eps) * p["layers_0"]["attn_norm"]["scale"]
        want = np.abs(h).max() / 127
        for layer in ("q_proj", "k_proj", "v_proj"):
            np.testing.assert_allclose(float(p["layers_0"]["attn"][layer]["kernel"].act_scale), want, rtol=1e-5)
        scales = {path: float(_get(q.params, path).act_scale) for path in
                  (f"layers_{i}/{layer}/kernel" for i in range(model.config.n_layers) for layer in BLOCK_LINEARS)}
        assert all(np.isfinite(v) and v > 0 for v in scales.values()) and len(set(scales.values())) > 2
        row = next(r for r in report.layers if r.path == "layers_0/attn/q_proj/kernel")
        assert row.bytes_after == quant.storage_nbytes((64, 64), "w8a8-static")  # the 4-byte scale counts


def test_a_rotated_static_scale_is_the_calibration_maximum_of_the_rotated_input():
    """``w8a8-static-had``: layers_0's q/k/v scale is max|h R| / 127, ``R`` the dense numpy rotation;
    a rule mixing the two (q_proj rotated, k/v not) gives each its own maximum."""
    from tests.quant.test_hadamard import _matrix

    model, calib = _outlier_model()
    q, _ = quantize_model(model, "q_proj=w8a8-static-had,*=w8a8-static", method="rtn", calib=calib, progress=False)
    p = jax.tree.map(lambda a: a if isinstance(a, QuantizedTensor) else np.asarray(a, np.float64), q.params,
                     is_leaf=lambda a: isinstance(a, QuantizedTensor))
    x = p["embed"]["embedding"][calib.tokens]
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + model.config.norm_eps) * p["layers_0"]["attn_norm"]["scale"]
    attn = p["layers_0"]["attn"]
    np.testing.assert_allclose(float(attn["q_proj"]["kernel"].act_scale), np.abs(h @ _matrix(64)).max() / 127, rtol=1e-5)
    np.testing.assert_allclose(float(attn["k_proj"]["kernel"].act_scale), np.abs(h).max() / 127, rtol=1e-5)
    assert np.abs(h @ _matrix(64)).max() < 0.5 * np.abs(h).max()  # the outliers were spread


def test_w8a8_errors_are_clear():
    model, calib = _outlier_model()
    with pytest.raises(ValueError, match=r"w8a8-static: its activation scale\) needs calibration data"):
        quantize_model(model, "w8a8-static", method="rtn", progress=False)
    with pytest.raises(ValueError, match="rtn does not use calibration data"):
        quantize_model(model, "w8a8", method="rtn", calib=calib, progress=False)
    with pytest.raises(ValueError, match="alpha is a setting of smoothquant, not of gptq"):
        quantize_model(model, "w8a8", method="gptq", calib=calib, alpha=0.3, progress=False)
    for method in ("gptq", "awq", "awq-gptq", "hqq", "autoround"):
        with pytest.raises(ValueError, match=f"{method} cannot produce w8a8-had weights .*rtn or smoothquant"):
            quantize_model(model, "down_proj=w8a8-had,*=int8", method=method,
                           calib=None if method == "hqq" else calib, progress=False)
    tied = Model(config=CFG, params=init_params(CFG, jax.random.key(0)))
    with pytest.raises(ValueError, match="a lookup, and here the tied LM head, not a linear layer: w8a8-static"):
        quantize_model(tied, "embed=w8a8-static,*=int8", method="rtn", calib=calib, progress=False)
    with pytest.raises(ValueError, match="embed/embedding is a lookup not a linear layer"):
        quantize_model(model, "embed=w8a8-static,*=int8", method="rtn", calib=calib, progress=False)
    from cascade.models import save_checkpoint

    plain, _ = quantize_model(model, "w8a8-static", method="rtn", calib=calib, progress=False)
    k = plain.params["layers_0"]["attn"]["q_proj"]["kernel"]
    bare = QuantizedTensor(k.packed, k.scale, None, spec=k.spec, shape=k.shape, axis=k.axis)
    broken = {**plain.params, "layers_0": _set_kernel(plain.params["layers_0"], bare)}
    with pytest.raises(ValueError, match="without its activation scale"):
        save_checkpoint("/nonexistent-dir/never-written", Model(config=model.config, params=broken))


def _set_kernel(block, kernel):
    return {**block, "attn": {**block["attn"], "q_proj": {"kernel": kernel, **{k: v for k, v in
                                                                              block["attn"]["q_proj"].items() if k != "kernel"}}}}


def test_a_smoothquant_w8a8_static_checkpoint_saves_loads_and_generates(capsys, tmp_path):
    from cascade.models import load_checkpoint
    from cascade.models.decoder import logits_of

    out_dir = str(tmp_path / "w8a8")
    code, out, err = run(capsys, "quantize", BIN, "--quant", "w8a8-static", "--method", "smoothquant", "--alpha", "0.6",
                         "--calib", TRAIN, "--calib-samples", "32", "--calib-len", "64", "-o", out_dir, "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["ptq"]["settings"] == {"alpha": 0.6} and payload["quant"] == "w8a8-static"
    back = load_checkpoint(out_dir)
    kernel = back.params["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert str(kernel.spec) == "w8a8-static" and float(kernel.act_scale) > 0
    # the checkpoint is the model quantized in this process, activation scales included
    model = load_model(BIN)
    calib = calibration.calibration_tokens(model.tokenizer, TRAIN, samples=32, length=64, seed=0)
    here, _ = quantize_model(model, "w8a8-static", method="smoothquant", calib=calib, alpha=0.6, progress=False)
    tokens = calib.tokens[:2]
    np.testing.assert_array_equal(np.asarray(logits_of(back.params, back.config, tokens)),
                                  np.asarray(logits_of(here.params, here.config, tokens)))
    code, out, err = run(capsys, "generate", out_dir, "Once upon a time", "--max-tokens", "12", "--json")
    assert code == 0 and len(json.loads(out)["token_ids"]) == 12, err
    code, out, err = run(capsys, "inspect", out_dir, "--json")
    assert code == 0 and json.loads(out)["matmul_backends"] == {"int8-dot": 35}, err  # not a weight-only kernel
