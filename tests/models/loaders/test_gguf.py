"""The GGUF loader against independent references.

* synthetic files written with ``gguf.GGUFWriter`` from known Hugging Face-layout weights (Q/K rows
  permuted for ggml by a hand-written index table, quantized with ``gguf.quants.quantize``);
  imported QuantizedTensors must dequantize like ``gguf.quants.dequantize``;
* ``stories260K.gguf`` against the llama2.c ``stories260K.bin`` read here with numpy, and greedy
  decoding against the reference text in ``shared/data/README.md``;
* ``SmolLM2-135M-Instruct.Q4_1.gguf``: every Q4_1 tensor against gguf's dequantization, and the
  README's "The capital of France is" -> " Paris." check.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade.models.config import RopeScaling, UnsupportedModelError
from cascade.models.llama import Transformer
from cascade.models.loaders.gguf import config_from_gguf, load_gguf, read_gguf
from cascade.quant.qtensor import QuantizedTensor, dequantize

from tests.shared_data import DATA  # noqa: E402
STORIES_GGUF = DATA / "stories260K" / "stories260K.gguf"
STORIES_BIN = DATA / "stories260K" / "stories260K.bin"
STORIES_SPM = DATA / "stories260K" / "tok512.model"
SMOLLM = DATA / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"

Q = gguf.GGMLQuantizationType
EPS32 = 2.0 ** -24

# ----------------------------------------------------------------------------- references


def ggml_row_order(n_heads: int, head_dim: int) -> np.ndarray:
    """Hand-written llama.cpp Q/K permutation: GGUF row ``h*hd + 2i`` is HF row ``h*hd + i`` and
    GGUF row ``h*hd + 2i + 1`` is HF row ``h*hd + hd/2 + i`` (``gguf_rows = hf_rows[order]``)."""
    order = []
    for h in range(n_heads):
        for i in range(head_dim // 2):
            order += [h * head_dim + i, h * head_dim + head_dim // 2 + i]
    return np.array(order)


def to_hf_rows(gguf_rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo :func:`ggml_row_order` (HF rotate-half rows from interleaved ones)."""
    head_dim = gguf_rows.shape[0] // n_heads
    return gguf_rows[np.argsort(ggml_row_order(n_heads, head_dim))]


def block_fields(raw: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block d (and m for Q4_1) of a raw (rows, bytes) tensor, as float16, (rows, n_blocks)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, type_size)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if qtype == Q.Q4_1 else None
    return d, m


def check_import(qt: QuantizedTensor, raw: np.ndarray, qtype, n_heads: int | None = None,
                 embedding: bool = False) -> float:
    """A Q8_0/Q4_0/Q4_1 import against gguf's dequantization of ``raw`` (rows of blocks, (out, in)):
    kernels are (in, out) along axis 0, the embedding (vocab, dim) along axis 1.  Q8_0/Q4_0 must be
    bit-exact, Q4_1 within float32 rounding, with every block minimum m recoverable exactly.
    Returns the largest absolute difference."""
    spec = {Q.Q8_0: "int8-g32", Q.Q4_0: "int4-g32", Q.Q4_1: "int4-g32-asym"}[qtype]
    ref = gguf.quants.dequantize(np.asarray(raw), qtype)
    d, m = block_fields(raw, qtype)
    if n_heads is not None:
        ref, d = to_hf_rows(ref, n_heads), to_hf_rows(d, n_heads)
        m = None if m is None else to_hf_rows(m, n_heads)
    axis = 1 if embedding else 0
    if not embedding:  # everything to the kernel layout (in, out)
        ref, d, m = ref.T, d.T, None if m is None else m.T
    assert str(qt.spec) == spec and qt.axis == axis and qt.shape == ref.shape
    assert qt.scale.dtype == jnp.float16
    ours = np.asarray(dequantize(qt, jnp.float32))
    err = np.abs(ours.astype(np.float64) - ref)
    if m is None:
        np.testing.assert_array_equal(ours, ref)  # bit-exact
        np.testing.assert_array_equal(np.asarray(qt.scale), d)
        assert qt.zero is None
        return float(err.max())
    assert qt.zero.dtype == jnp.float32
    per_block = 4 * EPS32 * (np.abs(m.astype(np.float64)) + 15 * np.abs(d.astype(np.float64)))
    bound = np.repeat(per_block, 32, axis=axis)
    assert (err <= bound).all(), f"max excess {np.max(err - bound):.3g}"
    # the block minimum is recoverable exactly from the stored zero point and scale
    zero = np.asarray(qt.zero, np.float64)
    scale = np.asarray(qt.scale, np.float64)
    np.testing.assert_array_equal((-(zero * scale)).astype(np.float16), m)
    live = d != 0
    np.testing.assert_array_equal(np.asarray(qt.scale)[live], d[live])
    return float(err.max())


def greedy(params, cfg, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding with one compiled full forward over a fixed-length buffer (causal
    attention: right padding does not change earlier logits)."""
    model = Transformer(cfg)
    n = len(prompt) + steps
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, jnp.arange(n, dtype=jnp.int32)[None])[0])
    tokens = list(prompt)
    for _ in range(steps):
        buf = np.zeros((1, n), np.int32)
        buf[0, :len(tokens)] = tokens
        tokens.append(int(np.argmax(np.asarray(fwd(params, jnp.asarray(buf)))[0, len(tokens) - 1])))
    return tokens[len(prompt):]


# ----------------------------------------------------------------------------- synthetic files

DIM, HIDDEN, LAYERS, HEADS, KV, VOCAB = 64, 96, 2, 4, 2, 288
HEAD_DIM = DIM // HEADS


def spm_vocab():
    """A llama (SentencePiece, byte-fallback) vocabulary of VOCAB tokens."""
    words = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["the", "and", "of"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581" + w for w in words]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    assert len(tokens) == VOCAB
    return tokens, [0.0] * 259 + [-float(i) for i in range(len(words))], types


def hf_weights(seed=0, tied=True, bias=False) -> dict[str, np.ndarray]:
    """Random weights keyed by GGUF name, in Hugging Face layout ((out, in), rotate-half Q/K)."""
    rng = np.random.default_rng(seed)
    w = {"token_embd.weight": rng.normal(0, 0.5, (VOCAB, DIM)), "output_norm.weight": 1 + 0.1 * rng.normal(size=DIM)}
    if not tied:
        w["output.weight"] = rng.normal(0, 0.1, (VOCAB, DIM))
    for i in range(LAYERS):
        b = f"blk.{i}."
        w[b + "attn_norm.weight"] = 1 + 0.1 * rng.normal(size=DIM)
        w[b + "ffn_norm.weight"] = 1 + 0.1 * rng.normal(size=DIM)
        for name, shape in [("attn_q", (HEADS * HEAD_DIM, DIM)), ("attn_k", (KV * HEAD_DIM, DIM)),
                            ("attn_v", (KV * HEAD_DIM, DIM)), ("attn_output", (DIM, HEADS * HEAD_DIM)),
                            ("ffn_gate", (HIDDEN, DIM)), ("ffn_up", (HIDDEN, DIM)), ("ffn_down", (DIM, HIDDEN))]:
            w[b + name + ".weight"] = rng.normal(0, 0.2, shape)
            if bias and name in ("attn_q", "attn_k", "attn_v"):
                w[b + name + ".bias"] = rng.normal(0, 0.2, shape[0])
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_gguf(path, weights, *, arch="llama", wtype=Q.F32, meta=None, drop_meta=(), permute=True,
               raw=None, extra_tensors=None):
    """Write a GGUF file: ``weights`` in HF layout (Q/K rows permuted here when ``permute``), 2-D
    ones stored as ``wtype``; ``raw`` maps names to (already encoded array, type) written as is."""
    tokens, scores, types = spm_vocab()
    kv = {f"{arch}.context_length": 256, f"{arch}.embedding_length": DIM, f"{arch}.feed_forward_length": HIDDEN,
          f"{arch}.block_count": LAYERS, f"{arch}.attention.head_count": HEADS,
          f"{arch}.attention.head_count_kv": KV, f"{arch}.rope.dimension_count": HEAD_DIM,
          f"{arch}.attention.layer_norm_rms_epsilon": np.float32(1e-5), f"{arch}.rope.freq_base": np.float32(10000.0),
          "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0}
    kv.update(meta or {})
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in kv.items():
        if k in drop_meta:
            continue
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        elif isinstance(v, (float, np.floating)):
            w.add_float32(k, float(v))
        else:
            w.add_uint32(k, int(v))
    raw = dict(raw or {})
    for name, x in {**weights, **(extra_tensors or {})}.items():
        if name in raw:
            data, qtype = raw[name]
            w.add_tensor(name, data, raw_dtype=qtype)
            continue
        if permute and (".attn_q." in name or ".attn_k." in name):
            x = x[ggml_row_order(HEADS if ".attn_q." in name else KV, HEAD_DIM)]
        if x.ndim == 2 and wtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(x, wtype), raw_dtype=wtype)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def kernel_of(params, gguf_name):
    """Our parameter for a GGUF tensor name (kernel/embedding/scale/bias)."""
    if gguf_name == "token_embd.weight":
        return params["embed"]["embedding"]
    if gguf_name == "output.weight":
        return params["lm_head"]["kernel"]
    if gguf_name == "output_norm.weight":
        return params["final_norm"]["scale"]
    _, i, short, kind = gguf_name.split(".")
    module = {"attn_q": ("attn", "q_proj"), "attn_k": ("attn", "k_proj"), "attn_v": ("attn", "v_proj"),
              "attn_output": ("attn", "o_proj"), "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"),
              "ffn_down": ("mlp", "down_proj"), "attn_norm": ("attn_norm",), "ffn_norm": ("mlp_norm",)}[short]
    node = params[f"layers_{i}"]
    for m in module:
        node = node[m]
    return node["scale" if short.endswith("norm") else "kernel" if kind == "weight" else "bias"]


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    weights = hf_weights(tied=False)
    return weights, write_gguf(tmp_path_factory.mktemp("f32") / "tiny.gguf", weights)


def test_f32_weights_map_to_the_tree_with_q_k_unpermuted(f32_file):
    weights, path = f32_file
    model = load_gguf(path)
    assert model.format == "gguf" and model.source == str(path) and model.quant is None
    assert model.tokenizer is not None
    for name, x in weights.items():
        ours = np.asarray(kernel_of(model.params, name))
        assert ours.dtype == np.float32
        ref = x.T if x.ndim == 2 and name != "token_embd.weight" else x  # kernels are (in, out)
        np.testing.assert_array_equal(ours, ref, err_msg=name)


def test_config_maps(f32_file):
    _, path = f32_file
    cfg = load_gguf(path).config
    assert (cfg.architecture, cfg.vocab_size, cfg.dim, cfg.hidden_dim, cfg.n_layers) == \
        ("LlamaForCausalLM", VOCAB, DIM, HIDDEN, LAYERS)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.max_seq_len) == (HEADS, KV, HEAD_DIM, 256)
    assert cfg.norm_eps == 1e-5 and cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert not cfg.tie_embeddings and not cfg.qkv_bias and cfg.sliding_window is None
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)


def test_config_optional_keys_and_rope_scaling(tmp_path):
    meta = {"llama.rope.freq_base": np.float32(500000.0), "llama.attention.layer_norm_rms_epsilon": np.float32(1e-6),
            "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": np.float32(4.0),
            "tokenizer.ggml.eot_token_id": 5}
    path = write_gguf(tmp_path / "m.gguf", hf_weights(), meta=meta, drop_meta=("llama.rope.dimension_count",))
    f = read_gguf(path)
    assert "llama.vocab_size" not in f.metadata  # vocab from len(tokenizer.ggml.tokens)
    cfg = config_from_gguf(f.metadata, str(path), tensor_names=f.tensors)
    assert cfg.vocab_size == VOCAB and cfg.tie_embeddings and cfg.head_dim == HEAD_DIM
    assert cfg.rope_theta == 500000.0 and cfg.norm_eps == 1e-6
    assert cfg.rope_scaling == RopeScaling(rope_type="linear", factor=4.0)
    assert cfg.eos_token_ids == (2, 5)
    # without tensor names the head is assumed untied
    assert not config_from_gguf(f.metadata, str(path)).tie_embeddings
    assert config_from_gguf(f).tie_embeddings


def test_config_edge_cases(tmp_path):
    base = read_gguf(write_gguf(tmp_path / "m.gguf", hf_weights())).metadata
    # special-token ids outside the vocabulary are ignored (as llama.cpp does)
    cfg = config_from_gguf({**base, "tokenizer.ggml.eos_token_id": VOCAB + 5, "tokenizer.ggml.eot_token_id": 7}, "x")
    assert cfg.eos_token_ids == (7,)
    # a sliding window on a llama file is Mistral's
    cfg = config_from_gguf({**base, "llama.attention.sliding_window": 4096}, "x")
    assert cfg.architecture == "MistralForCausalLM" and cfg.sliding_window == 4096
    # the legacy linear-scaling key
    assert config_from_gguf({**base, "llama.rope.scale_linear": 2.0}, "x").rope_scaling == \
        RopeScaling(rope_type="linear", factor=2.0)
    # ModelConfig's own checks and wrong value types name the source
    with pytest.raises(ValueError, match=r"^src\.gguf: model config: n_heads \(4\) must be a multiple"):
        config_from_gguf({**base, "llama.attention.head_count_kv": 3}, "src.gguf")
    with pytest.raises(ValueError, match=r"src\.gguf: metadata key 'llama.block_count' should be int"):
        config_from_gguf({**base, "llama.block_count": "2"}, "src.gguf")
    with pytest.raises(UnsupportedModelError, match="varies per layer"):
        config_from_gguf({**base, "llama.attention.head_count_kv": [2, 4]}, "src.gguf")


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_import_matches_gguf_dequantize(tmp_path, qtype, tied):
    weights = hf_weights(seed=1, tied=tied)
    path = write_gguf(tmp_path / "q.gguf", weights, wtype=qtype)
    model = load_gguf(path)
    f = gguf.GGUFReader(str(path))
    for t in f.tensors:
        ours = kernel_of(model.params, t.name)
        if len(t.data.shape) == 1:
            np.testing.assert_array_equal(np.asarray(ours), weights[t.name])
            continue
        assert isinstance(ours, QuantizedTensor), t.name
        heads = HEADS if ".attn_q." in t.name else KV if ".attn_k." in t.name else None
        check_import(ours, t.data, qtype, heads, embedding=t.name == "token_embd.weight")

    # dequantize=True: plain float32 everywhere, equal to gguf's dequantization
    flat = load_gguf(path, dequantize=True)
    assert not any(isinstance(x, QuantizedTensor) for x in jax.tree.leaves(
        flat.params, is_leaf=lambda x: isinstance(x, QuantizedTensor)))
    for t in f.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        heads = HEADS if ".attn_q." in t.name else KV if ".attn_k." in t.name else None
        ref = to_hf_rows(ref, heads) if heads else ref
        ref = ref.T if ref.ndim == 2 and t.name != "token_embd.weight" else ref
        np.testing.assert_array_equal(np.asarray(kernel_of(flat.params, t.name)), ref, err_msg=t.name)

    # the model runs on the imported tensors (quantized embedding, tied or separate head)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 7)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    lq = np.asarray(Transformer(model.config).apply({"params": model.params}, tokens, pos)[0])
    lf = np.asarray(Transformer(flat.config).apply({"params": flat.params}, tokens, pos)[0])
    np.testing.assert_allclose(lq, lf, rtol=1e-4, atol=1e-4 * np.abs(lf).max())


def test_q4_1_blocks_with_zero_scale_are_exact(tmp_path):
    """d == 0 means every value of the block is m, whatever its nibbles say."""
    weights = hf_weights(seed=2)
    w = weights["blk.0.ffn_gate.weight"].copy()
    w[3, :32] = 0.3  # a constant block: gguf's quantizer writes d = 0, m = 0.3
    w[5, 32:] = 0.0  # all-zero blocks: d = 0, m = 0
    raw_q = gguf.quants.quantize(w, Q.Q4_1)
    blocks = raw_q.reshape(HIDDEN, DIM // 32, 20)
    blocks[7, 1, 0:2] = np.array([0], np.float16).view(np.uint8)  # d = 0 with live nibbles and m = -1.5
    blocks[7, 1, 2:4] = np.array([-1.5], np.float16).view(np.uint8)
    blocks[7, 1, 4:] = np.arange(16, dtype=np.uint8) * 17
    path = write_gguf(tmp_path / "z.gguf", weights, wtype=Q.Q4_1, raw={"blk.0.ffn_gate.weight": (raw_q, Q.Q4_1)})
    qt = load_gguf(path).params["layers_0"]["mlp"]["gate_proj"]["kernel"]
    check_import(qt, raw_q, Q.Q4_1)
    ours = np.asarray(dequantize(qt))
    assert (ours[32:64, 7] == -1.5).all() and (ours[:32, 3] == np.float32(np.float16(0.3))).all()
    assert (ours[32:, 5] == 0).all()


def test_f16_bf16_and_other_quant_types_become_float32(tmp_path):
    weights = hf_weights(seed=3)
    raw = {"blk.0.ffn_up.weight": (gguf.quants.quantize(weights["blk.0.ffn_up.weight"], Q.Q5_0), Q.Q5_0),
           "blk.1.ffn_up.weight": (gguf.quants.quantize(weights["blk.1.ffn_up.weight"], Q.BF16), Q.BF16)}
    path = write_gguf(tmp_path / "f16.gguf", weights, wtype=Q.F16, raw=raw)
    with pytest.warns(UserWarning, match=r"1 Q5_0.*dequantized to float32"):
        model = load_gguf(path)
    f = gguf.GGUFReader(str(path))
    for t in f.tensors:
        ours = kernel_of(model.params, t.name)
        assert not isinstance(ours, QuantizedTensor) and ours.dtype == jnp.float32, t.name
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        heads = HEADS if ".attn_q." in t.name else KV if ".attn_k." in t.name else None
        ref = to_hf_rows(ref, heads) if heads else ref
        ref = ref.T if ref.ndim == 2 and t.name != "token_embd.weight" else ref
        np.testing.assert_array_equal(np.asarray(ours), ref, err_msg=t.name)
    assert {t.tensor_type for t in f.tensors} == {Q.F16, Q.F32, Q.Q5_0, Q.BF16}


def test_qwen2_biases_and_no_permutation(tmp_path):
    weights = hf_weights(seed=4, bias=True)
    meta = {"tokenizer.ggml.model": "llama"}
    path = write_gguf(tmp_path / "qwen2.gguf", weights, arch="qwen2", meta=meta, permute=False)
    model = load_gguf(path)
    assert model.config.architecture == "Qwen2ForCausalLM" and model.config.qkv_bias
    for name, x in weights.items():
        ref = x.T if x.ndim == 2 and name != "token_embd.weight" else x
        np.testing.assert_array_equal(np.asarray(kernel_of(model.params, name)), ref, err_msg=name)


def test_llama_biases_are_unpermuted_like_weights(tmp_path):
    weights = hf_weights(seed=5, bias=True)
    path = write_gguf(tmp_path / "llama_bias.gguf", weights)
    model = load_gguf(path)
    assert model.config.qkv_bias and not model.config.o_bias
    for name in ("blk.0.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"):
        np.testing.assert_array_equal(np.asarray(kernel_of(model.params, name)), weights[name])


def llama3_rope_factors(theta, head_dim, factor, low, high, original):
    """llama.cpp's converter formula for rope_freqs.weight (Llama 3.1), written out per frequency."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_rope_freqs_tensor(tmp_path):
    weights = hf_weights(seed=6)
    ones = {"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)}
    assert load_gguf(write_gguf(tmp_path / "a.gguf", weights, extra_tensors=ones)).config.rope_scaling is None
    llama3 = {"rope_freqs.weight": llama3_rope_factors(10000.0, HEAD_DIM, 8.0, 1.0, 4.0, 8192)}
    assert len(set(llama3["rope_freqs.weight"].tolist())) > 2  # kept, scaled and blended frequencies
    cfg = load_gguf(write_gguf(tmp_path / "b.gguf", weights, extra_tensors=llama3)).config
    assert cfg.rope_scaling == RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)
    odd = {"rope_freqs.weight": np.linspace(1, 3, HEAD_DIM // 2).astype(np.float32)}
    path = write_gguf(tmp_path / "c.gguf", weights, extra_tensors=odd)
    with pytest.raises(UnsupportedModelError, match="rope_freqs.weight") as info:
        load_gguf(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- errors


def _raises(path, match, exc=ValueError, **kw):
    with pytest.raises(exc, match=match) as info:
        load_gguf(path, **kw)
    assert str(path) in str(info.value), str(info.value)
    return str(info.value)


def test_truncated_file_names_the_tensor(f32_file, tmp_path):
    _, good = f32_file
    last = list(read_gguf(good).tensors)[-1]
    path = tmp_path / "cut.gguf"
    data = Path(good).read_bytes()
    path.write_bytes(data[:-100])
    msg = _raises(path, "truncated")
    assert repr(last) in msg
    path.write_bytes(data[:5000])  # cut inside the metadata
    _raises(path, "truncated")
    with pytest.raises(ValueError, match="truncated"):
        read_gguf(path)


def test_bad_magic_and_version(f32_file, tmp_path):
    _, good = f32_file
    data = bytearray(Path(good).read_bytes())
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + data[4:])
    _raises(path, "not a GGUF file")
    path.write_bytes(data[:4] + (7).to_bytes(4, "little") + data[8:])
    _raises(path, "unsupported GGUF version 7")
    path.write_bytes(b"")
    _raises(path, "not a GGUF file")
    _raises(tmp_path / "absent.gguf", "no such file")


def test_missing_tensor(tmp_path):
    weights = hf_weights()
    del weights["blk.1.ffn_up.weight"]
    msg = _raises(write_gguf(tmp_path / "m.gguf", weights), "missing tensor")
    assert "'blk.1.ffn_up.weight'" in msg and "layers_1/mlp/up_proj/kernel" in msg


def test_wrong_shape(tmp_path):
    weights = hf_weights()
    weights["blk.0.attn_k.weight"] = np.zeros((HEADS * HEAD_DIM, DIM), np.float32)  # q-sized k
    msg = _raises(write_gguf(tmp_path / "s.gguf", weights, permute=False), "has shape")
    assert "'blk.0.attn_k.weight'" in msg and "(32, 64)" in msg


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_1])
def test_nan_tensor(tmp_path, qtype):
    weights = hf_weights()
    if qtype == Q.F32:
        weights["blk.1.ffn_down.weight"][3, 4] = np.nan
        path = write_gguf(tmp_path / "n.gguf", weights)
    else:
        raw_q = gguf.quants.quantize(weights["blk.1.ffn_down.weight"], qtype)
        raw_q[3, 0:2] = np.array([np.inf], np.float16).view(np.uint8)  # a block scale
        path = write_gguf(tmp_path / "n.gguf", weights, raw={"blk.1.ffn_down.weight": (raw_q, qtype)})
    msg = _raises(path, "NaN/Inf")
    assert "'blk.1.ffn_down.weight'" in msg


def test_unknown_tensor(tmp_path):
    extra = {"blk.0.attn_q_norm.weight": np.ones(HEAD_DIM, np.float32)}
    msg = _raises(write_gguf(tmp_path / "u.gguf", hf_weights(), extra_tensors=extra), "unexpected tensor",
                  UnsupportedModelError)
    assert "'blk.0.attn_q_norm.weight'" in msg


@pytest.mark.parametrize("arch,meta,match", [
    ("gpt2", {}, "unsupported GGUF architecture 'gpt2'"),
    ("mistral", {}, "'mistral'.*stores Mistral"),
    ("llama", {"llama.expert_count": 8}, "mixture-of-experts"),
    ("llama", {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": np.float32(4.0)}, "'yarn'"),
    ("llama", {"llama.rope.dimension_count": 8}, "partial RoPE"),
])
def test_unsupported_models(tmp_path, arch, meta, match):
    path = write_gguf(tmp_path / "x.gguf", hf_weights(), arch=arch, meta=meta)
    _raises(path, match, UnsupportedModelError)


def test_missing_metadata_key(tmp_path):
    path = write_gguf(tmp_path / "k.gguf", hf_weights(), drop_meta=("llama.embedding_length",))
    _raises(path, "missing required metadata key 'llama.embedding_length'")


# ----------------------------------------------------------------------------- stories260K


def read_llama2c_bin(path):
    """The llama2.c legacy checkpoint (layout table in shared/data/README.md)."""
    raw = Path(path).read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.frombuffer(raw[:28], np.int32)
    floats = np.frombuffer(raw[28:], np.float32)
    kv_dim = dim * n_kv // n_heads
    shapes = [("token_embedding", (abs(vocab), dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
              ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)),
              ("freq_cis_real", (seq_len, dim // n_heads // 2)), ("freq_cis_imag", (seq_len, dim // n_heads // 2))]
    out, pos = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        out[name] = floats[pos:pos + n].reshape(shape)
        pos += n
    assert pos == floats.size and vocab > 0
    return out, dict(dim=dim, n_heads=n_heads, n_kv=n_kv)


@pytest.fixture(scope="module")
def stories():
    return load_gguf(STORIES_GGUF)


def test_stories260k_equals_llama2c_bin(stories):
    ref, hp = read_llama2c_bin(STORIES_BIN)
    p = stories.params
    cfg = stories.config
    assert (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == \
        (64, 172, 5, 8, 4, 8, 512)
    assert cfg.max_seq_len == 2048 and cfg.norm_eps == 1e-5 and cfg.rope_theta == 10000.0
    assert not cfg.tie_embeddings and cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    eq = np.testing.assert_array_equal
    eq(np.asarray(p["embed"]["embedding"]), ref["token_embedding"])
    eq(np.asarray(p["lm_head"]["kernel"]), ref["token_embedding"].T)  # output.weight is a copy
    eq(np.asarray(p["final_norm"]["scale"]), ref["rms_final"])
    for i in range(5):
        layer = p[f"layers_{i}"]
        eq(np.asarray(layer["attn_norm"]["scale"]), ref["rms_att"][i])
        eq(np.asarray(layer["mlp_norm"]["scale"]), ref["rms_ffn"][i])
        eq(np.asarray(layer["attn"]["q_proj"]["kernel"]), to_hf_rows(ref["wq"][i], hp["n_heads"]).T)
        eq(np.asarray(layer["attn"]["k_proj"]["kernel"]), to_hf_rows(ref["wk"][i], hp["n_kv"]).T)
        eq(np.asarray(layer["attn"]["v_proj"]["kernel"]), ref["wv"][i].T)
        eq(np.asarray(layer["attn"]["o_proj"]["kernel"]), ref["wo"][i].T)
        eq(np.asarray(layer["mlp"]["gate_proj"]["kernel"]), ref["w1"][i].T)
        eq(np.asarray(layer["mlp"]["down_proj"]["kernel"]), ref["w2"][i].T)
        eq(np.asarray(layer["mlp"]["up_proj"]["kernel"]), ref["w3"][i].T)


def test_stories260k_reader_agrees_with_gguf_package():
    ours = read_gguf(STORIES_GGUF)
    ref = gguf.GGUFReader(str(STORIES_GGUF))
    assert ours.version == 3 and len(ours.tensors) == 48 and len(ours.metadata) == 19
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert (info.type, info.shape, info.offset, info.nbytes) == \
            (t.tensor_type.name, tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes)
    assert ours.metadata["general.architecture"] == "llama" and ours.metadata["llama.block_count"] == 5
    assert ours.metadata["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]


def test_stories260k_greedy_text_matches_readme(stories):
    """README: greedy decoding of 40 tokens after BOS (numpy llama2.c reference, fp32)."""
    import sentencepiece as spm

    out = greedy(stories.params, stories.config, [1], 40)
    text = spm.SentencePieceProcessor(model_file=str(STORIES_SPM)).decode(out)
    assert text == ("Once upon a time, there was a little girl named Lily. "
                    "She loved to play outside in the park. One day, she saw a big, r")


# ----------------------------------------------------------------------------- SmolLM2 (Q4_1)


@pytest.fixture(scope="module")
def smollm():
    t0 = time.perf_counter()
    model = load_gguf(SMOLLM)
    seconds = time.perf_counter() - t0
    print(f"\nload_gguf(SmolLM2-135M Q4_1): {seconds:.1f} s")
    return model, gguf.GGUFReader(str(SMOLLM))


def test_smollm2_config(smollm):
    cfg = smollm[0].config
    assert (cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (30, 576, 1536, 9, 3, 64)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings and cfg.vocab_size == 49152
    assert cfg.max_seq_len == 8192 and cfg.norm_eps == 1e-5 and cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert "lm_head" not in smollm[0].params


def test_smollm2_q4_1_tensors_match_gguf(smollm):
    model, reader = smollm
    n_q41, worst = 0, 0.0
    for t in reader.tensors:
        ours = kernel_of(model.params, t.name)
        if t.tensor_type == Q.Q4_1:
            assert isinstance(ours, QuantizedTensor), t.name
            heads = 9 if ".attn_q." in t.name else 3 if ".attn_k." in t.name else None
            worst = max(worst, check_import(ours, t.data, Q.Q4_1, heads))
            n_q41 += 1
        elif t.tensor_type == Q.Q8_0:
            assert t.name == "token_embd.weight"
            assert isinstance(ours, QuantizedTensor)
            check_import(ours, t.data, Q.Q8_0, embedding=True)
        else:
            np.testing.assert_array_equal(np.asarray(ours), t.data)
    assert n_q41 == 210
    assert worst < 1e-5, worst


def test_smollm2_greedy_paris(smollm):
    """README: greedy decoding of "The capital of France is" (no BOS) continues " Paris."."""
    model, reader = smollm
    vocab = reader.fields["tokenizer.ggml.tokens"].contents()
    index = {tok: i for i, tok in enumerate(vocab)}
    prompt = [index[w] for w in ("The", "\u0120capital", "\u0120of", "\u0120France", "\u0120is")]
    out = greedy(model.params, model.config, prompt, 2)
    assert [vocab[i] for i in out] == ["\u0120Paris", "."]
