"""The one loader gate (issue 38): every config value checked whatever the format (``ModelConfig``),
every tensor floating point (``build_params``), and an external tokenizer for a model without one."""

import dataclasses
import json
import math

import jax
import ml_dtypes
import numpy as np
import pytest

from cascade.models.config import ModelConfig, RopeScaling
from cascade.models.llama import init_params, param_shapes
from cascade.models.loaders import load_model, read_config
from cascade.models.loaders.common import build_params
from tests.models.loaders.test_gguf import STORIES_SPM, VOCAB, hf_weights, write_gguf

CFG = ModelConfig(vocab_size=64, dim=32, hidden_dim=48, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                  max_seq_len=64, tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,))
NAN, INF = float("nan"), float("inf")

BAD = [("norm_eps", NAN), ("norm_eps", -1e-5), ("norm_eps", 0.0), ("norm_eps", INF), ("rope_theta", NAN),
       ("rope_theta", 0.0), ("rope_theta", -1e4), ("vocab_size", 0), ("dim", -32), ("hidden_dim", 2**31),
       ("n_layers", 1.0), ("n_heads", True), ("n_kv_heads", 3), ("head_dim", 7), ("max_seq_len", 0),
       ("sliding_window", 0), ("bos_token_id", 64), ("bos_token_id", -1), ("eos_token_ids", (2, 64)),
       ("tie_embeddings", "yes"), ("architecture", "GPT2LMHeadModel")]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_model_config_refuses_each_invalid_value(field, value):
    """NaN, infinite, negative, zero, out-of-range, wrongly typed or inconsistent: refused naming the field."""
    with pytest.raises(ValueError, match=f"model config: .*{field}") as e:
        dataclasses.replace(CFG, **{field: value})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scaling,field", [
    (dict(rope_type="linear", factor=NAN), "factor"), (dict(rope_type="linear", factor=0.0), "factor"),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=-1.0), "low_freq_factor"),
    (dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=0), "original_max_position_embeddings"),
    (dict(rope_type="yarn", factor=2.0), "rope_type"),
])
def test_rope_scaling_refuses_each_invalid_value(scaling, field):
    with pytest.raises(ValueError, match=f"rope_scaling.{field}"):
        RopeScaling(**scaling)


def test_valid_configs_pass_and_the_rope_frequencies_stay_finite():
    for cfg in (CFG, dataclasses.replace(CFG, norm_eps=1e-12, rope_theta=1e6, sliding_window=16, eos_token_ids=()),
                dataclasses.replace(CFG, rope_scaling=RopeScaling(rope_type="llama3", factor=8.0,
                                                                  original_max_position_embeddings=32))):
        from cascade.models.config import rope_inv_freq

        assert np.isfinite(rope_inv_freq(cfg)).all()


def test_gguf_and_checkpoint_configs_go_through_the_same_checks(tmp_path):
    """Every format builds a ModelConfig, so every format is checked; GGUF names its metadata key."""
    path = write_gguf(tmp_path / "m.gguf", hf_weights(), meta={"llama.attention.layer_norm_rms_epsilon": np.float32(NAN)})
    for read in (load_model, read_config):
        with pytest.raises(ValueError, match=r"norm_eps must be a finite number.*llama\.attention\.layer_norm_rms_epsilon"):
            read(str(path))
    path = write_gguf(tmp_path / "t.gguf", hf_weights(), meta={"llama.rope.freq_base": np.float32(-10000.0)})
    with pytest.raises(ValueError, match=r"rope_theta must be .*-10000.*llama\.rope\.freq_base"):
        load_model(str(path))
    # a checkpoint's config (read before its weights, e.g. by `cascade plan`)
    from cascade.models.checkpoint import CHECKPOINT_MARKER, save_checkpoint
    from cascade.models.model import Model

    save_checkpoint(tmp_path / "ckpt", Model(config=CFG, params=init_params(CFG, jax.random.key(0))))
    marker = tmp_path / "ckpt" / CHECKPOINT_MARKER
    manifest = json.loads(marker.read_text())
    manifest["config"]["norm_eps"] = NAN
    marker.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"invalid model config .*norm_eps must be a finite number.*got nan"):
        read_config(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="norm_eps must be a finite number"):
        ModelConfig.from_dict(manifest["config"])


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, np.bool_, np.int64])
def test_integer_tensors_are_refused_by_the_gate(dtype):
    """Issue 38: an int32 tensor (in a safetensors file) was used as integer weights."""
    flat = {k: np.ones(s, np.float32) for k, s in param_shapes(CFG).items()}
    flat["layers_0/mlp/up_proj/kernel"] = flat["layers_0/mlp/up_proj/kernel"].astype(dtype)
    with pytest.raises(ValueError, match=rf"src: tensor layers_0/mlp/up_proj/kernel has dtype {np.dtype(dtype)}; "
                                         "model weights must be floating point"):
        build_params(flat, CFG, "src")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_float_tensors_pass_the_gate(dtype):
    flat = {k: np.ones(s, dtype) for k, s in param_shapes(CFG).items()}
    params = build_params(flat, CFG, "src")
    assert params["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == np.dtype(dtype)


def test_gguf_without_a_tokenizer_takes_one_from_a_file(tmp_path):
    """Issue 38 (bug 3): a model without a tokenizer of its own takes --tokenizer; a GGUF without
    tokenizer metadata loads (tokenizer None) instead of failing, and takes one from a file."""
    from cascade.models.tokenizer import Tokenizer

    full = load_model(str(write_gguf(tmp_path / "full.gguf", hf_weights())))
    spm = tmp_path / "tok"
    full.tokenizer.save(spm)  # its vocabulary as a SentencePiece tokenizer.model
    drop = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    bare = str(write_gguf(tmp_path / "bare.gguf", hf_weights(), meta={"llama.vocab_size": VOCAB}, drop_meta=drop))
    assert load_model(bare).tokenizer is None
    model = load_model(bare, tokenizer=str(spm / "tokenizer.model"))
    text = "the cat and a dog"
    assert model.tokenizer.encode(text) == full.tokenizer.encode(text) == \
        Tokenizer.from_sentencepiece(spm / "tokenizer.model").encode(text)
    with pytest.raises(ValueError, match="brings its own tokenizer"):  # never a silent replacement
        load_model(str(tmp_path / "full.gguf"), tokenizer=str(spm / "tokenizer.model"))
    with pytest.raises(ValueError, match="the tokenizer has 512 tokens but .* has vocab_size 288"):
        load_model(bare, tokenizer=str(STORIES_SPM))
    assert math.isfinite(model.config.norm_eps)
