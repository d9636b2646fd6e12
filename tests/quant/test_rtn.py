import jax.numpy as jnp
import numpy as np
import pytest

from cascade import quant


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "embed_tokens": {"embedding": f(512, 64)},
        "layers_0": {
            "attn_norm": {"scale": np.ones(64, np.float32)},
            "attn": {"q": {"kernel": f(64, 64)}},
            "mlp": {"up": {"kernel": f(64, 172)}, "down": {"kernel": f(172, 64), "bias": f(64)}},
        },
        "lm_head": {"kernel": f(64, 512)},
        "step": np.int32(7),
    }


def test_rules_applied_and_reported(params):
    qp, report = quant.quantize_params(params, "attn=int8,*=int4-g32", progress=False)
    rows = {r.path: r for r in report.layers}
    assert isinstance(qp["layers_0"]["attn"]["q"]["kernel"], quant.QuantizedTensor)
    assert qp["layers_0"]["attn"]["q"]["kernel"].spec == quant.parse_spec("int8")
    assert qp["layers_0"]["mlp"]["down"]["kernel"].spec == quant.parse_spec("int4-g32")
    # inline rules keep the 16-bit defaults for what they do not name: embedding and norms in bf16
    assert rows["embed_tokens/embedding"].spec == "bf16"
    assert rows["layers_0/attn_norm/scale"].spec == "bf16"  # the int8 'attn' rule skips vectors: the keep rule applies
    assert qp["step"] == 7 and "step" not in rows  # non-float leaves pass through
    for path, r in rows.items():
        if r.spec.startswith("int"):
            leaf = qp
            for key in path.split("/"):
                leaf = leaf[key]
            w = params
            for key in path.split("/"):
                w = w[key]
            expected = np.linalg.norm(np.asarray(quant.dequantize(leaf), np.float64) - w) / np.linalg.norm(w.astype(np.float64))
            assert r.rel_error == pytest.approx(expected, rel=1e-6)
            assert r.bytes_after == leaf.nbytes and r.bytes_before == w.nbytes
    assert report.bytes_before == sum(r.bytes_before for r in report.layers)
    assert rows["layers_0/attn/q/kernel"].rel_error < rows["layers_0/mlp/up/kernel"].rel_error  # int8 beats int4


def test_default_rules_keep_16bit(params):
    qp, report = quant.quantize_params(params, "int4-g128", progress=False)
    assert qp["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    assert qp["lm_head"]["kernel"].dtype == jnp.bfloat16
    assert qp["layers_0"]["attn_norm"]["scale"].dtype == jnp.bfloat16
    assert isinstance(qp["layers_0"]["mlp"]["up"]["kernel"], quant.QuantizedTensor)
    js = report.to_json()
    assert js["bytes_after"] < js["bytes_before"] and len(js["layers"]) == 7
    assert "total:" in report.table()


def test_error_names_the_parameter(params):
    bad = dict(params, layers_0=dict(params["layers_0"], attn={"q": {"kernel": np.full((4, 4), np.nan, np.float32)}}))
    with pytest.raises(ValueError, match="layers_0/attn/q/kernel.*NaN"):
        quant.quantize_params(bad, "int8", progress=False)


def test_float_cast_overflow_and_nan_are_errors():
    with pytest.raises(ValueError, match="w/kernel: casting to fp16 overflows"):
        quant.quantize_params({"w": {"kernel": np.full((4, 4), 1e6, np.float32)}}, "fp16", progress=False)
    with pytest.raises(ValueError, match="w/kernel.*NaN"):
        quant.quantize_params({"w": {"kernel": np.full((4, 4), np.nan, np.float32)}}, "bf16", progress=False)
