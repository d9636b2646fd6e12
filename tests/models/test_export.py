"""Hugging Face export: ``transformers`` reads what we write and computes the same logits."""

import os

import jax
import numpy as np
import pytest
import torch

from cascade.models.config import ModelConfig
from cascade.models.export import hf_state_dict, save_hf
from cascade.models.decoder import logits_of
from cascade.models.llama import init_params
from cascade.models.loaders.hf import load_hf
from cascade.quant import quantize
from cascade.quant.spec import parse_spec

CONFIGS = {
    "tied-gqa": ModelConfig(vocab_size=80, dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                            max_seq_len=64, tie_embeddings=True, bos_token_id=0, eos_token_ids=(0,)),
    "untied": ModelConfig(vocab_size=80, dim=24, hidden_dim=40, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=12,
                          max_seq_len=64, rope_theta=500.0, norm_eps=1e-6),
}
TOKENS = np.random.RandomState(0).randint(0, 80, (2, 12))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_loads_the_export_with_the_same_logits(name, tmp_path):
    from transformers import LlamaForCausalLM

    cfg = CONFIGS[name]
    params = jax.tree.map(lambda a: a * 3, init_params(cfg, jax.random.key(0)))
    out = save_hf(params, cfg, tmp_path / "m")
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(TOKENS)).logits.numpy()
    ours = np.asarray(logits_of(params, cfg, TOKENS))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    back = load_hf(out, tokenizer=False)
    assert back.config == cfg
    for x, y in zip(jax.tree.leaves(back.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tied_export_writes_no_head():
    names = hf_state_dict(init_params(CONFIGS["tied-gqa"], jax.random.key(0)))
    assert "lm_head.weight" not in names and names["model.embed_tokens.weight"].shape == (80, 32)
    assert names["model.layers.1.self_attn.k_proj.weight"].shape == (16, 32)  # (out, in) like torch


def test_refuses_quantized_weights_and_existing_dirs(tmp_path):
    cfg = CONFIGS["untied"]
    params = init_params(cfg, jax.random.key(0))
    q = dict(params, lm_head={"kernel": quantize(params["lm_head"]["kernel"], parse_spec("int8"), axis=0)})
    with pytest.raises(ValueError, match="quantized"):
        save_hf(q, cfg, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    save_hf(params, cfg, tmp_path / "m")
    with pytest.raises(ValueError, match="already exists"):
        save_hf(params, cfg, tmp_path / "m")
    with pytest.raises(ValueError, match="no tokenizer files"):
        save_hf(params, cfg, tmp_path / "m", overwrite=True, tokenizer_dir=tmp_path / "q")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temp directory left behind
    assert load_hf(tmp_path / "m", tokenizer=False).config == cfg  # the failed overwrite left the old one whole
