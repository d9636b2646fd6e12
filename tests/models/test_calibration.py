"""Calibration: sampled sequences, and per-layer input statistics against a direct computation."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade.models import calibration
from cascade.models.config import ModelConfig
from cascade.models.attention import attention
from cascade.models.llama import Block, RMSNorm, apply_rope, init_params
from cascade.models.config import rope_inv_freq

CFG = ModelConfig(vocab_size=64, dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  max_seq_len=64, tie_embeddings=True)


class CharTokenizer:
    """One token per character (BOS = 1 first): enough to check how text becomes sequences."""

    def encode(self, text, add_bos=None):
        return [1] + [2 + ord(c) % 60 for c in text]


def _direct_inputs(bp, x):
    """The four linear inputs of a block, computed step by step in float64 (no interception)."""
    b, t, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    norm = RMSNorm(CFG.norm_eps)
    xa = norm.apply({"params": bp["attn_norm"]}, x)
    a = bp["attn"]
    q = (xa @ a["q_proj"]["kernel"]).reshape(b, t, CFG.n_heads, CFG.head_dim)
    k = (xa @ a["k_proj"]["kernel"]).reshape(b, t, CFG.n_kv_heads, CFG.head_dim)
    v = (xa @ a["v_proj"]["kernel"]).reshape(b, t, CFG.n_kv_heads, CFG.head_dim)
    inv = jnp.asarray(rope_inv_freq(CFG), jnp.float32)
    xo = attention(apply_rope(q, pos, inv), apply_rope(k, pos, inv), v, pos, pos, None)
    h = x + xo @ a["o_proj"]["kernel"]
    xm = norm.apply({"params": bp["mlp_norm"]}, h)
    m = bp["mlp"]
    xd = jax.nn.silu(xm @ m["gate_proj"]["kernel"]) * (xm @ m["up_proj"]["kernel"])
    out = h + xd @ m["down_proj"]["kernel"]
    flat = {name: np.asarray(v, np.float64).reshape(-1, v.shape[-1]) for name, v in
            (("attn", xa), ("o", xo), ("mlp", xm), ("down", xd))}
    return flat, np.asarray(out)


def test_block_statistics_equal_a_direct_computation_over_batches(monkeypatch):
    params = init_params(CFG, jax.random.key(0))
    bp = params["layers_0"]
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, 12, CFG.dim)), np.float32)
    monkeypatch.setattr(calibration, "batch_size", lambda cfg, length: 2)  # 3 batches: 2 + 2 + 1
    stats = calibration.block_statistics(bp, CFG, x, keep_tokens=30)
    direct, out = _direct_inputs(bp, jnp.asarray(x))
    assert set(stats) == {"attn", "o", "mlp", "down"}
    for name, xs in direct.items():
        st = stats[name]
        assert st.tokens == 60
        np.testing.assert_allclose(st.hessian, xs.T @ xs, rtol=2e-4, atol=2e-4 * np.abs(xs.T @ xs).max())
        np.testing.assert_allclose(st.mean_abs, np.abs(xs).mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(st.abs_max, np.abs(xs).max(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(st.sample, xs[:30], rtol=1e-4, atol=1e-5)  # the first rows, across batches
    np.testing.assert_allclose(calibration.block_outputs(bp, CFG, x), out, rtol=1e-4, atol=1e-5)
    maxima = calibration.block_statistics(bp, CFG, x, keep_tokens=0, hessian=False)  # SmoothQuant's pass
    for name, st in maxima.items():
        np.testing.assert_array_equal(st.abs_max, stats[name].abs_max)
        assert not st.hessian.any() and st.sample.shape[0] == 0


def test_block_output_is_the_model_block():
    params = init_params(CFG, jax.random.key(2))
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 7, CFG.dim)), np.float32)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    want, _ = Block(CFG).apply({"params": params["layers_1"]}, jnp.asarray(x), pos, None)
    np.testing.assert_allclose(calibration.block_outputs(params["layers_1"], CFG, x), np.asarray(want), rtol=1e-5, atol=1e-6)


def _rtn_kernels(bp, group):
    """``bp`` with the kernels that read ``group`` replaced by their int3 RTN values."""
    from cascade import quant

    for layer in calibration.INPUTS[group]:
        mod, lin = layer.split("/")
        w = quant.dequantize(quant.quantize(bp[mod][lin]["kernel"], "int3-g16"), "float32")
        bp = {**bp, mod: {**bp[mod], lin: {**bp[mod][lin], "kernel": w}}}
    return bp


@pytest.mark.parametrize("quantize", [False, True], ids=["unchanged", "quantized-input-by-input"])
def test_staged_block_sees_each_input_after_the_layers_before_it_are_replaced(monkeypatch, quantize):
    """One forward pass, input by input: each input's statistics are those of the block whose
    earlier layers are already replaced (checked against the step-by-step float64 computation),
    and the outputs are the final block's (the model's Block)."""
    params = init_params(CFG, jax.random.key(4))
    bp = params["layers_1"]
    x = np.asarray(jax.random.normal(jax.random.key(5), (5, 12, CFG.dim)), np.float32)
    monkeypatch.setattr(calibration, "batch_size", lambda cfg, length: 2)
    seen, blocks = {}, {}

    def on_input(name, stats, block):
        seen[name], blocks[name] = stats, block
        return _rtn_kernels(block, name) if quantize else block

    final, out = calibration.staged_block(bp, CFG, x, on_input, keep_tokens=30)
    assert list(seen) == ["attn", "o", "mlp", "down"]  # forward order
    for name, st in seen.items():
        direct, _ = _direct_inputs(blocks[name], jnp.asarray(x))  # the block as it stood at that input
        xs = direct[name]
        assert st.tokens == 60
        np.testing.assert_allclose(st.hessian, xs.T @ xs, rtol=2e-4, atol=2e-4 * np.abs(xs.T @ xs).max())
        np.testing.assert_allclose(st.mean_abs, np.abs(xs).mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(st.abs_max, np.abs(xs).max(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(st.sample, xs[:30], rtol=1e-4, atol=1e-5)
    pos = jnp.broadcast_to(jnp.arange(12), (5, 12))
    want, _ = Block(CFG).apply({"params": final}, jnp.asarray(x), pos, None)
    np.testing.assert_allclose(out, np.asarray(want), rtol=1e-4, atol=1e-5)
    if quantize:  # the statistics really moved: o's input is the quantized q/k/v's attention
        float_stats = calibration.block_statistics(bp, CFG, x)
        assert not np.allclose(seen["o"].hessian, float_stats["o"].hessian, rtol=1e-3)
        np.testing.assert_allclose(seen["attn"].hessian, float_stats["attn"].hessian, rtol=1e-5)
    else:
        np.testing.assert_allclose(out, calibration.block_outputs(bp, CFG, x), rtol=1e-5, atol=1e-6)


def _text_file(tmp_path, docs):
    path = tmp_path / "calib.txt"
    path.write_text("\n<|endoftext|>\n".join(docs) + "\n")
    return path


def test_sampled_sequences_are_the_shuffled_documents_concatenated(tmp_path):
    docs = [f"story number {i} " + "abc" * (i % 7 + 3) for i in range(60)]
    path = _text_file(tmp_path, docs)
    tok = CharTokenizer()
    a = calibration.calibration_tokens(tok, str(path), samples=32, length=16, seed=3)
    order = np.random.default_rng(3).permutation(len(docs))
    stream = [t for i in order for t in tok.encode(docs[i])]
    np.testing.assert_array_equal(a.tokens, np.asarray(stream[:32 * 16]).reshape(32, 16))
    assert a.recipe == {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "samples": 32,
                        "length": 16, "seed": 3, "documents": a.recipe["documents"]}
    assert a.recipe["documents"] < len(docs)  # stops tokenizing once it has enough
    b = calibration.calibration_tokens(tok, str(path), samples=32, length=16, seed=4)
    assert not np.array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("case, message", [
    ("missing", "calibration file not found"),
    ("empty", "is empty"),
    ("short", "holds 1"),
    ("samples", "samples must be in [32, 1024]"),
    ("length", "exceeds the model context (64)"),
    ("binary", "not UTF-8"),
])
def test_bad_calibration_input_is_a_clear_error(tmp_path, case, message):
    tok, path, kw = CharTokenizer(), tmp_path / "c.txt", {"samples": 32, "length": 16, "max_len": 64}
    if case == "empty":
        path.write_text("\n<|endoftext|>\n  \n")
    elif case == "short":
        path.write_text("only a few words")
    elif case == "samples":
        path.write_text("x" * 10000)
        kw["samples"] = 16
    elif case == "length":
        path.write_text("x" * 10000)
        kw["length"] = 65
    elif case == "binary":
        path.write_bytes(b"\xff\xfe" * 100)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        calibration.calibration_tokens(tok, str(path), **kw)
