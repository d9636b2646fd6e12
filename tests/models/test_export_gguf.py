"""GGUF export: the ``gguf`` package (llama.cpp's own reader and block arithmetic, in numpy) reads
what we write and gets our weights back, bit for bit; our loader reads it back to the same model."""

import dataclasses
import os

import flax
import gguf
import jax
import numpy as np
import pytest

from cascade.models import load_model
from cascade.models.config import ModelConfig, RopeScaling
from cascade.models.export_gguf import CHECK_TEXTS, ExportError, export_gguf, exact_type
from cascade.models.llama import init_params, unpermute_rope_rows
from cascade.models.loaders.gguf import expected_tensors, load_gguf, read_gguf
from cascade.models.model import Model
from cascade.models.quantize import quantize_model
from cascade.models.tokenizer import Tokenizer
from cascade.quant import parse_spec
from cascade.quant.qtensor import QuantizedTensor, dequantize
from tests.shared_data import DATA

SP_MODEL = DATA / "stories260K" / "tok512.model"
SMOLLM2 = DATA / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny(architecture="LlamaForCausalLM", **kw) -> Model:
    """A random model of 2 blocks with stories260K's SentencePiece tokenizer (512 tokens)."""
    fields = dict(architecture=architecture, vocab_size=512, dim=64, hidden_dim=96, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=16, max_seq_len=128, bos_token_id=1, eos_token_ids=(2,))
    if architecture == "Qwen2ForCausalLM":
        fields["qkv_bias"] = True
    cfg = ModelConfig(**{**fields, **kw})
    params = jax.tree.map(lambda a: a * 3, init_params(cfg, jax.random.key(0)))
    return Model(config=cfg, params=params, tokenizer=Tokenizer.from_sentencepiece(SP_MODEL), source="tiny",
                 format="hf")


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny()


def _gguf_weights(path) -> dict[str, np.ndarray]:
    """Every tensor of the file as float32 in numpy (out, in) order, dequantized by ``gguf.quants``."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = (np.asarray(x, np.float32).reshape(shape), t.tensor_type.name)
    return out


def _ours(model: Model, name: str, param: str, kind: str) -> np.ndarray:
    """Our weight for a GGUF tensor, in GGUF's layout: (out, in), Llama Q/K rows permuted."""
    a = flax.traverse_util.flatten_dict(model.params, sep="/")[param]
    x = np.asarray(dequantize(a, "float32") if isinstance(a, QuantizedTensor) else np.asarray(a, np.float32))
    return x.T if kind == "linear" else x


def _unpermuted(name: str, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if cfg.architecture != "Qwen2ForCausalLM" and (".attn_q." in name or ".attn_k." in name):
        return unpermute_rope_rows(x, cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads)
    return x


EXACT = ["int8-g32", "int8-g32-full", "int4-g32", "int4-g32-narrow", "int4-g32-asym", "int4-g32-mse-a8",
         "embed=int8-g32,*=int4-g32", "*=bf16", "*=fp16"]


@pytest.mark.parametrize("rules", EXACT)
def test_every_exportable_spec_reads_back_bit_for_bit_through_the_gguf_package(rules, tiny_llama, tmp_path):
    model = quantize_model(tiny_llama, rules, progress=False)[0]
    report = export_gguf(model, tmp_path / "m.gguf", progress=False)
    assert not report.requantized
    read = _gguf_weights(report.path)
    table = expected_tensors(model.config)
    assert set(read) == set(table)
    flat = flax.traverse_util.flatten_dict(model.params, sep="/")
    for name, (param, kind) in table.items():
        theirs, ggml = read[name]
        ours = _ours(model, name, param, kind)
        leaf = flat[param]
        want = "F32" if kind == "norm" else (exact_type(leaf.spec) if isinstance(leaf, QuantizedTensor)
                                             else {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[str(leaf.dtype)])
        assert ggml == want, name
        theirs = _unpermuted(name, theirs, model.config)
        if ggml == "Q4_1":  # llama.cpp: d*q + m with m rounded to fp16; ours (q - z)*d
            entry = next(t for t in report.tensors if t.name == name)
            assert 0 <= entry.max_min_rounding <= 2.0**-11 * np.abs(theirs).max()
            np.testing.assert_allclose(theirs, ours, rtol=0, atol=entry.max_min_rounding + 1e-6 * np.abs(ours).max())
            assert not np.array_equal(theirs, ours) or entry.max_min_rounding == 0
        else:
            np.testing.assert_array_equal(theirs, ours, err_msg=name)


def test_the_round_trip_gives_the_same_model_tokens_and_perplexity(tiny_llama, tmp_path):
    from cascade.models import perplexity
    from cascade.models.generation import generate

    model = quantize_model(tiny_llama, "embed=int8-g32,*=int4-g32", progress=False)[0]
    path = export_gguf(model, tmp_path / "m.gguf", progress=False).path
    back = load_gguf(path)
    assert back.config == model.config
    ours, theirs = (flax.traverse_util.flatten_dict(m.params, sep="/") for m in (model, back))
    assert set(ours) == set(theirs)
    for k in ours:
        a, b = ours[k], theirs[k]
        if isinstance(a, QuantizedTensor):
            assert isinstance(b, QuantizedTensor) and b.spec.storage_spec == a.spec.storage_spec, k
            for x, y in ((a.packed, b.packed), (a.scale, b.scale)):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)
        else:  # norms: written as F32 from bf16, read back as float32 with the same values
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=k)
    prompts = [[1, 5, 9, 200], [1, 77]]
    assert (generate(back.params, back.config, prompts, max_new_tokens=12, eos_ids=()).tokens
            == generate(model.params, model.config, prompts, max_new_tokens=12, eos_ids=()).tokens)
    docs = [[1, *range(3, 60)], [1, *range(100, 140)]]
    assert (perplexity(back.params, back.config, docs).ppl == perplexity(model.params, model.config, docs).ppl)


def test_an_imported_gguf_exports_to_the_same_tensor_bytes(tmp_path):
    """SmolLM2's Q4_1/Q8_0 file, imported without requantizing and exported again: every tensor's
    data is byte-identical to llama.cpp's original, and the tokenizer (with its ``pre``) is kept."""
    model = load_model(str(SMOLLM2))
    report = export_gguf(model, tmp_path / "s.gguf", progress=False)
    a, b = read_gguf(SMOLLM2), read_gguf(report.path)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].type == b.tensors[name].type, name
        assert np.asarray(a.tensor_data(name)).tobytes() == np.asarray(b.tensor_data(name)).tobytes(), name
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template", "llama.rope.freq_base", "llama.context_length", "llama.block_count"):
        assert b.metadata[key] == a.metadata[key], key
    assert b.metadata["general.quantized_by"].startswith("cascade ")
    assert b.metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_1)


@pytest.mark.parametrize("source", ["default-small", "stories260K"])
def test_metadata_and_tokenizer_round_trip(source, tmp_path):
    model = load_model("default-small" if source == "default-small" else str(DATA / "stories260K" / "stories260K.bin"),
                       tokenizer=None if source == "default-small" else str(SP_MODEL))
    quantized = quantize_model(model, "int8-g32", progress=False)[0]
    if source == "stories260K":  # its MLP is 172 wide: ffn_down's rows are not whole blocks of 32
        with pytest.raises(ExportError, match=r"ffn_down.*reduction axis \(172\) is not a multiple of 32"):
            export_gguf(quantized, tmp_path / "m.gguf", progress=False)
    report = export_gguf(quantized, tmp_path / "m.gguf", requantize="F32", progress=False)
    assert {t.name.split(".", 2)[-1] for t in report.requantized} == (
        {"ffn_down.weight"} if source == "stories260K" else set())
    assert all(t.type == "F32" and t.rel_rms_error == 0 for t in report.requantized)  # float32 holds them exactly
    meta = read_gguf(report.path).metadata
    back = load_gguf(report.path)
    assert back.config == dataclasses.replace(model.config, max_seq_len=model.config.max_seq_len)
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.model"] == ("gpt2" if source == "default-small" else "llama")
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert meta["cascade.quant"] == "int8-g32"
    texts = [*CHECK_TEXTS, "The cat sat. It was happy.\n\nThe end"]
    for text in texts:
        assert back.tokenizer.encode(text) == model.tokenizer.encode(text), text
    assert (back.tokenizer.bos_id, back.tokenizer.eos_ids, back.tokenizer.add_bos) == \
        (model.tokenizer.bos_id, model.tokenizer.eos_ids, model.tokenizer.add_bos)


@pytest.mark.parametrize("arch,extra", [
    ("Qwen2ForCausalLM", {}),
    ("MistralForCausalLM", {"sliding_window": 32}),
    ("LlamaForCausalLM", {"rope_scaling": RopeScaling(rope_type="llama3", factor=8.0, original_max_position_embeddings=64),
                          "rope_theta": 500000.0, "tie_embeddings": True}),
    ("LlamaForCausalLM", {"rope_scaling": RopeScaling(rope_type="linear", factor=2.0), "mlp_bias": True,
                          "o_bias": True, "qkv_bias": True}),
])
def test_architectures_and_rope_settings_round_trip(arch, extra, tmp_path):
    model = tiny(arch, **extra)
    path = export_gguf(model, tmp_path / "m.gguf", progress=False).path
    back = load_gguf(path)
    assert back.config == model.config
    ours, theirs = (flax.traverse_util.flatten_dict(m.params, sep="/") for m in (model, back))
    for k in ours:
        np.testing.assert_array_equal(np.asarray(theirs[k]), np.asarray(ours[k]), err_msg=k)
    names = set(read_gguf(path).tensors)
    assert ("rope_freqs.weight" in names) == (model.config.rope_scaling is not None
                                              and model.config.rope_scaling.rope_type == "llama3")


@pytest.mark.parametrize("rules", ["int4-g128", "int3-g32", "int8", "w8a8", "int4-g64-asym"])
def test_a_spec_without_an_exact_type_is_refused_or_requantized(rules, tiny_llama, tmp_path):
    model = quantize_model(tiny_llama, rules, progress=False)[0]
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError, match=r"has no exact GGUF type; exportable specs: int8-g32 \(Q8_0\).*--requantize"):
        export_gguf(model, out, progress=False)
    assert os.listdir(tmp_path) == []
    report = export_gguf(model, out, requantize="Q4_0", progress=False)
    linear = [t for t in report.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert len(linear) == 14 and all(t.requantized and t.type == "Q4_0" and 0 < t.rel_rms_error < 0.5 for t in linear)
    assert not [t for t in report.tensors if t.requantized and not t.name.startswith("blk.")]  # the bf16 head stays
    read = _gguf_weights(report.path)
    for t in linear:  # the reported error is the error of what llama.cpp dequantizes
        param, kind = expected_tensors(model.config)[t.name]
        ours = _ours(model, t.name, param, kind)
        theirs = _unpermuted(t.name, read[t.name][0], model.config)
        err = np.sqrt(np.mean((theirs.astype(np.float64) - ours) ** 2)) / np.sqrt(np.mean(ours.astype(np.float64) ** 2))
        assert err == pytest.approx(t.rel_rms_error, rel=1e-6)


def test_mixed_precision_writes_each_tensor_in_its_own_type(tiny_llama, tmp_path):
    rules = "embed=int8-g32,attn/q_proj=int8-g32,mlp/down_proj=int4-g32-asym,*=int4-g32"
    model = quantize_model(tiny_llama, rules, progress=False)[0]
    report = export_gguf(model, tmp_path / "m.gguf", progress=False)
    types = {n: t for n, (_, t) in _gguf_weights(report.path).items()}
    flat = flax.traverse_util.flatten_dict(model.params, sep="/")
    for name, (param, kind) in expected_tensors(model.config).items():
        leaf = flat[param]
        assert types[name] == (exact_type(leaf.spec) if isinstance(leaf, QuantizedTensor) else
                               "F32" if kind == "norm" else "BF16"), name
    assert {types["blk.0.attn_q.weight"], types["blk.0.ffn_down.weight"], types["blk.0.ffn_up.weight"]} == \
        {"Q8_0", "Q4_1", "Q4_0"}
    # most of the blocks' matrix weights are Q4_0, so the file says so
    assert read_gguf(report.path).metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)


def test_an_interrupted_export_leaves_no_file(tiny_llama, tmp_path, monkeypatch):
    model = quantize_model(tiny_llama, "int4-g32", progress=False)[0]
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")

    def boom(self, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model, out, overwrite=True, progress=False)
    assert os.listdir(tmp_path) == ["m.gguf"] and out.read_bytes() == b"old"


def test_what_has_no_gguf_form_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match="no tokenizer"):
        export_gguf(dataclasses.replace(tiny_llama, tokenizer=None), tmp_path / "a.gguf", progress=False)
    with pytest.raises(ExportError, match="already exists"):
        (tmp_path / "b.gguf").write_bytes(b"")
        export_gguf(tiny_llama, tmp_path / "b.gguf", progress=False)
    with pytest.raises(ExportError, match="--requantize takes one of"):
        export_gguf(tiny_llama, tmp_path / "c.gguf", requantize="Q5_K", progress=False)
    odd = tiny(dim=48, n_heads=3, n_kv_heads=3, head_dim=16)  # rows of 48: not whole blocks of 32
    with pytest.raises(ExportError, match="not a multiple of 32"):
        export_gguf(quantize_model(odd, "int4-g32", progress=False)[0], tmp_path / "d.gguf", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["b.gguf"]


def test_exact_types():
    assert [exact_type(parse_spec(s)) for s in ("int8-g32", "int4-g32-full", "int4-g32-narrow", "int4-g32-asym-mse",
                                                "int4-g32-a8", "bf16", "fp16", "fp32")] == \
        ["Q8_0", "Q4_0", "Q4_0", "Q4_1", "Q4_0", "BF16", "F16", "F32"]
    assert [exact_type(parse_spec(s)) for s in ("int8", "int8-g64", "int4-g128", "int3-g32", "int2-g16", "w8a8",
                                                "w8a8-had", "int8-g32-asym", "int4-tensor")] == [None] * 9


def test_embedding_rows_past_the_tokenizer_get_pad_tokens(tmp_path):
    """A model whose embedding has more rows than its tokenizer has tokens (Qwen2 pads it): the file
    lists [PAD<id>] tokens for the rest, as llama.cpp's converter does, and reads back the same."""
    model = tiny("Qwen2ForCausalLM", vocab_size=520)
    path = export_gguf(model, tmp_path / "m.gguf", progress=False).path
    meta = read_gguf(path).metadata
    assert len(meta["tokenizer.ggml.tokens"]) == 520 and meta["tokenizer.ggml.tokens"][512:] == [
        f"[PAD{i}]" for i in range(512, 520)]
    assert meta["tokenizer.ggml.token_type"][512:] == [5] * 8  # unused
    back = load_gguf(path)
    assert back.config == model.config
    for text in CHECK_TEXTS:
        assert back.tokenizer.encode(text) == model.tokenizer.encode(text)
