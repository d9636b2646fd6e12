"""Quantized models: RTN under precision rules, quantized embeddings/tied heads, perplexity cost."""

import os

import jax
import numpy as np
import pytest

from cascade import quant
from cascade.models.config import ModelConfig
from cascade.models.generation import generate
from cascade.models.decoder import logits_of
from cascade.models.llama import embed_lookup, init_params
from cascade.models.model import Model
from cascade.models.evaluation import perplexity, split_documents, tokenize_documents
from cascade.models.quantize import quantize_model, weight_bytes
from cascade.quant.qtensor import QuantizedTensor

from tests.shared_data import DATA  # noqa: E402
CFG = ModelConfig(vocab_size=64, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  max_seq_len=64, tie_embeddings=True)


@pytest.fixture(scope="module")
def tiny():
    return Model(config=CFG, params=init_params(CFG, jax.random.key(0)), source="random")


def test_default_rules_quantize_linears_and_keep_the_rest_16bit(tiny):
    qm, report = quantize_model(tiny, "int8")
    p = qm.params
    assert isinstance(p["layers_0"]["attn"]["q_proj"]["kernel"], QuantizedTensor)
    assert str(p["layers_0"]["attn"]["q_proj"]["kernel"].spec) == "int8"
    assert str(p["embed"]["embedding"].dtype) == "bfloat16"
    assert str(p["final_norm"]["scale"].dtype) == "bfloat16"
    assert report.bytes_after == weight_bytes(p) < weight_bytes(tiny.params)
    assert qm.quant == "int8"


def test_quantized_logits_equal_dequantized_float_model(tiny):
    """The quantized model computes exactly what a float model holding the dequantized weights does."""
    qm, _ = quantize_model(tiny, ".*=int4-g32-asym")  # everything, embedding (tied head) included
    emb = qm.params["embed"]["embedding"]
    assert isinstance(emb, QuantizedTensor) and emb.axis == 1
    deq = jax.tree.map(lambda a: quant.dequantize(a, "float32") if isinstance(a, QuantizedTensor) else a,
                       qm.params, is_leaf=lambda a: isinstance(a, QuantizedTensor))
    tokens = np.arange(20)[None] % 64
    np.testing.assert_allclose(np.asarray(logits_of(qm.params, CFG, tokens)),
                               np.asarray(logits_of(deq, CFG, tokens)), rtol=1e-5, atol=1e-5)


def test_packed_embedding_rows_equal_dequantized_rows():
    table = jax.random.normal(jax.random.key(1), (40, 64))
    q = quant.quantize(table, "int4-g16", axis=1)
    ids = np.array([[3, 0, 39], [7, 7, 1]])
    np.testing.assert_array_equal(np.asarray(embed_lookup(q, ids, np.float32)),
                                  np.asarray(quant.dequantize(q))[ids])


def test_requantizing_a_quantized_model_starts_from_its_values(tiny):
    q4, r4 = quantize_model(tiny, "int4-g32")
    with pytest.warns(UserWarning, match="re-quantizing 14 already-quantized tensors"):
        q8, r8 = quantize_model(q4, "int8")
    w4 = q4.params["layers_1"]["mlp"]["up_proj"]["kernel"]
    w8 = q8.params["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert str(w8.spec) == "int8"
    expected = quant.quantize(quant.dequantize(w4, "float32"), "int8")
    np.testing.assert_array_equal(np.asarray(w8.packed), np.asarray(expected.packed))
    np.testing.assert_array_equal(np.asarray(w8.scale), np.asarray(expected.scale))
    assert r8.bytes_before == r4.bytes_after  # the stored size, not the dequantized float size
    out = generate(q8.params, CFG, [[1, 2, 3]], max_new_tokens=4)
    assert len(out.tokens[0]) == 4


def test_rules_from_a_file_are_stored_as_rules_not_as_a_path(tiny, tmp_path):
    import json

    from cascade.quant.rules import PrecisionRules

    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"__default__": "int8", "rules": [["mlp", "int4-g32"]], "spec_version": 2}))
    qm, _ = quantize_model(tiny, str(path))
    assert qm.quant == "mlp=int4-g32-full,*=int8" and str(path) not in qm.quant  # the rules, every grid explicit
    path.write_text(json.dumps({"__default__": "int8", "rules": [["mlp", "int4-g32"]], "keep_16bit": False}))
    with pytest.warns(UserWarning, match="spec_version"):  # written before version 2: the narrow grid then
        qm, _ = quantize_model(tiny, str(path))
    assert json.loads(qm.quant) == {"__default__": "int8", "rules": [["mlp", "int4-g32-narrow"]], "keep_16bit": False,
                                    "spec_version": 2}
    assert PrecisionRules.parse(qm.quant).default == PrecisionRules.parse("int8").default


@pytest.mark.slow
def test_stories260k_int8_costs_under_one_percent_and_int4_stays_finite():
    from cascade.models.loaders.llama2c import load_llama2c

    model = load_llama2c(os.path.join(DATA, "stories260K", "stories260K.bin"))
    docs = split_documents(open(os.path.join(DATA, "text", "tinystories_val.txt"), encoding="utf-8").read())[:60]
    ids = tokenize_documents(model.tokenizer, docs)
    ppl = {}
    for name in ("fp32", "int8", "int4-g32"):
        m = model if name == "fp32" else quantize_model(model, name)[0]
        ppl[name] = perplexity(m.params, m.config, ids, ctx=512, truncate=True).ppl
    assert ppl["int8"] / ppl["fp32"] - 1 < 0.01
    assert np.isfinite(ppl["int4-g32"]) and ppl["int4-g32"] > ppl["int8"]


def _calib(n=8, t=16, seed=1):
    from cascade.models.calibration import CalibrationSet

    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (n, t), 0, CFG.vocab_size), np.int32)
    return CalibrationSet(tokens=tokens, recipe={"seed": 0})


@pytest.mark.parametrize("method", ["gptq", "awq-gptq"])
def test_gptq_produces_w8a8_weights_as_it_produces_int8(tiny, method):
    """Issue 38: GPTQ refused w8a8 after calibrating ("int8 activations (w8a8) go with int8 per-channel
    symmetric min-max weights only"); w8a8's weights are int8 per channel, so GPTQ's codes and scales
    for w8a8 are its codes and scales for int8, with int8 activations."""
    calib = _calib()
    w8a8, _ = quantize_model(tiny, "w8a8", method=method, calib=calib, progress=False)
    int8, _ = quantize_model(tiny, "int8", method=method, calib=calib, progress=False)
    a, b = w8a8.params["layers_1"]["mlp"]["down_proj"]["kernel"], int8.params["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert str(a.spec) == "w8a8" and a.spec.act == "dynamic" and str(b.spec) == "int8"
    np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


@pytest.mark.parametrize("rules,method,message", [
    ("atn=int8,*=int4", "rtn", "precision rule 'atn=int8' does nothing"),
    ("attn=int8,attn/q_proj=int4-g16,*=int4", "gptq", "precision rule 'attn/q_proj=int4-g16' does nothing"),
    ("int8-tensor", "awq", "awq does not support per-tensor specs (int8-tensor, for layers_0/attn/q_proj/kernel)"),
    ("q_proj=w8a8-had,*=int8", "autoround", "autoround cannot produce w8a8-had weights"),
    ("embed=w8a8-static,*=int8", "rtn", "embed/embedding is a lookup, and here the tied LM head,"),
])
def test_quantize_checks_come_before_any_work(tiny, monkeypatch, rules, method, message):
    """Issue 38: every method/spec check runs before calibration (:func:`check_quantize`, which
    `cascade quantize` also runs from the config before loading)."""
    import cascade.models.quantize as mq
    from cascade.models.llama import param_shapes

    def forbidden(*a, **k):
        pytest.fail("calibration started before the request was refused")

    monkeypatch.setattr(mq, "calibrated_blocks", forbidden)
    monkeypatch.setattr(mq, "calibrate_act_scales", forbidden)
    monkeypatch.setattr(mq, "quantize_params", forbidden)
    with pytest.raises(ValueError) as e:
        quantize_model(tiny, rules, method=method, calib=_calib(), progress=False)
    assert message in str(e.value)
    with pytest.raises(ValueError) as e2:  # the same from the config alone
        mq.check_quantize(rules, param_shapes(CFG), method=method, tied=CFG.tie_embeddings, where="random")
    assert str(e2.value) == str(e.value)


def test_choose_method_picks_the_measured_default_for_the_rules():
    """With calibration: awq-gptq with every weight-only integer spec's range searched (-mse),
    smoothquant for w8a8 rules, rtn (with the reason) where awq-gptq cannot go; without: rtn."""
    from cascade.models.llama import param_shapes
    from cascade.models.quantize import choose_method
    from cascade.quant.rules import PrecisionRules

    shapes = param_shapes(CFG)
    method, rules, why = choose_method("attn=int8,*=int3-g32", shapes, calibrated=True)
    assert method == "awq-gptq" and rules == PrecisionRules.parse("attn=int8-mse,*=int3-g32-mse") and "default" in why
    assert choose_method("int3-g32-p99", shapes, calibrated=True)[1] == PrecisionRules.parse("int3-g32-p99")  # given range kept
    assert choose_method("int3-g32", shapes, calibrated=False)[:2] == ("rtn", PrecisionRules.parse("int3-g32"))
    assert choose_method("w8a8", shapes, calibrated=True)[0] == "smoothquant"
    method, rules, why = choose_method("int4-tensor", shapes, calibrated=True)
    assert (method, rules) == ("rtn", PrecisionRules.parse("int4-tensor")) and "per-tensor" in why
    assert choose_method("bf16", shapes, calibrated=True)[0] == "rtn"
