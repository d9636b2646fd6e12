"""Hugging Face directory loading: sharded safetensors, and clear errors for broken checkpoints."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from cascade.models.decoder import logits_of
from cascade.models.loaders import load_model
from cascade.models.loaders.hf import load_hf
from tests.models.hf_fixtures import make_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    model = make_hf_model("llama3", d)
    return d, model


def _copy(src, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_like_single_file(hf_dir, tmp_path):
    d, hf = hf_dir
    sharded = tmp_path / "sharded"
    hf.save_pretrained(str(sharded), safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(sharded / "model.safetensors.index.json")
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    a, b = load_model(str(d)), load_model(str(sharded))
    tokens = np.arange(10)[None]
    np.testing.assert_array_equal(np.asarray(logits_of(a.params, a.config, tokens)),
                                  np.asarray(logits_of(b.params, b.config, tokens)))


def test_bf16_checkpoint_keeps_bf16_and_matches_transformers(tmp_path):
    hf = make_hf_model("qwen2", tmp_path / "f32")
    hf16 = hf.to(torch.bfloat16)
    hf16.save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
    m = load_hf(tmp_path / "bf16")
    assert str(m.params["layers_0"]["attn"]["q_proj"]["kernel"].dtype) == "bfloat16"
    ref = hf16.float()(torch.arange(12)[None]).logits.detach().numpy()  # same bf16 weights, f32 compute
    ours = np.asarray(logits_of(m.params, m.config, np.arange(12)[None]))
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())


def _edit_safetensors(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(hf_dir, tmp_path):
    d = _copy(hf_dir[0], tmp_path)
    _edit_safetensors(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) layers_1/mlp/up_proj/kernel"):
        load_model(str(d))


def test_wrong_shape_is_named(hf_dir, tmp_path):
    d = _copy(hf_dir[0], tmp_path)
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
    _edit_safetensors(d / "model.safetensors", edit)
    with pytest.raises(ValueError, match=r"layers_0/attn/k_proj/kernel has shape \(64, 8\), expected \(64, 32\)"):
        load_model(str(d))


def test_nan_weights_are_rejected(hf_dir, tmp_path):
    d = _copy(hf_dir[0], tmp_path)
    def edit(t):
        w = t["model.norm.weight"].copy()
        w[3] = np.nan
        t["model.norm.weight"] = w
    _edit_safetensors(d / "model.safetensors", edit)
    with pytest.raises(ValueError, match="final_norm/scale contains NaN/Inf"):
        load_model(str(d))


def test_truncated_safetensors_is_a_clear_error(hf_dir, tmp_path):
    d = _copy(hf_dir[0], tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors"):
        load_model(str(d))


def test_unknown_tensor_and_missing_shard(hf_dir, tmp_path):
    d = _copy(hf_dir[0], tmp_path)
    _edit_safetensors(d / "model.safetensors", lambda t: t.__setitem__("model.vision_tower.weight", np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="unexpected tensor 'model.vision_tower.weight'"):
        load_model(str(d))
    os.remove(d / "model.safetensors")
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_model(str(d))


def test_unsupported_architecture_and_bad_json(hf_dir, tmp_path):
    d = _copy(hf_dir[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPTNeoXForCausalLM'"):
        load_model(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model(str(d))


def test_unknown_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="unknown model format"):
        load_model(str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="not a model directory"):
        load_model(str(tmp_path))
