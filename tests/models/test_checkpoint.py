import dataclasses
import json
import os
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade import quant
from cascade.models import checkpoint, llama
from cascade.models.checkpoint import CHECKPOINT_MARKER, is_checkpoint, load_checkpoint, save_checkpoint
from cascade.models.config import ModelConfig, RopeScaling
from cascade.models.model import Model

CFG = ModelConfig(vocab_size=64, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  rope_scaling=RopeScaling(rope_type="linear", factor=2.0), eos_token_ids=(2, 3))
# bf16 norms and embedding, fp32 final norm, int8 (symmetric: no zero) attention, int4-g32-asym (zeros) MLP / head
MIXED_RULES = "final_norm=fp32,lm_head=int4-g32-asym,attn_norm|mlp_norm|embed=bf16,attn=int8,*=int4-g32-asym"


def _logits(cfg, params):
    tokens = jnp.array([[1, 5, 9, 17, 33, 47]], jnp.int32)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    logits, _ = jax.jit(llama.Transformer(cfg).apply)({"params": params}, tokens, positions)
    return np.asarray(logits)


def _leaves(params):
    return jax.tree_util.tree_flatten_with_path(params)


def _assert_identical(a, b):
    la, ta = _leaves(a)
    lb, tb = _leaves(b)
    assert ta == tb  # same structure, including QuantizedTensor metadata (spec, shape, axis, dtype)
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(np.asarray(x), np.asarray(y)), path


@pytest.fixture(scope="module")
def float_params():
    return llama.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def mixed_params(float_params):
    qp, _ = quant.quantize_params(float_params, MIXED_RULES, progress=False)
    return qp


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mixed_params):
    """A mixed-precision checkpoint saved once; corruption tests work on copies."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, Model(config=CFG, params=mixed_params, quant=MIXED_RULES, source="test", format="hf"))
    return path


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def test_round_trip_float_tree(tmp_path, float_params):
    path = tmp_path / "float"
    save_checkpoint(path, Model(config=CFG, params=float_params))
    assert is_checkpoint(path) and is_checkpoint(str(path))
    model = load_checkpoint(path)
    assert model.config == CFG and model.format == "checkpoint" and model.quant is None and model.tokenizer is None
    assert model.source == str(path)
    _assert_identical(float_params, model.params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(model.params))
    np.testing.assert_array_equal(_logits(CFG, float_params), _logits(model.config, model.params))


def test_round_trip_mixed_quantized_tree(saved, mixed_params):
    layer = mixed_params["layers_0"]
    assert layer["attn_norm"]["scale"].dtype == jnp.bfloat16
    assert mixed_params["embed"]["embedding"].dtype == jnp.bfloat16
    assert mixed_params["final_norm"]["scale"].dtype == jnp.float32
    assert layer["attn"]["q_proj"]["kernel"].zero is None  # int8 symmetric
    assert layer["mlp"]["up_proj"]["kernel"].zero is not None  # int4-g32-asym

    model = load_checkpoint(saved)
    assert model.config == CFG and model.quant == MIXED_RULES
    q = model.params["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(q, quant.QuantizedTensor) and q.spec == quant.parse_spec("int4-g32-asym")
    assert q.zero is not None and q.packed.dtype == jnp.uint8
    assert model.params["layers_1"]["attn"]["k_proj"]["kernel"].zero is None
    _assert_identical(mixed_params, model.params)
    np.testing.assert_array_equal(_logits(CFG, mixed_params), _logits(model.config, model.params))
    _assert_identical(mixed_params, load_checkpoint(saved).params)  # loading leaves the checkpoint loadable

    manifest = json.loads((saved / CHECKPOINT_MARKER).read_text())
    entry = manifest["tree"]["layers_0/mlp/up_proj/kernel"]
    assert entry["kind"] == "quantized" and entry["spec"] == "int4-g32-asym" and entry["axis"] == 0
    assert entry["shape"] == [64, 96] and entry["dtype"] == "float32"
    assert set(entry["leaves"]) == {"packed", "scale", "zero"}
    assert manifest["tree"]["embed/embedding"]["kind"] == "float"
    assert manifest["tree"]["embed/embedding"]["dtype"] == "bfloat16"


def test_tied_embedding_quantized_along_model_dim(tmp_path, float_params):
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    params = {k: v for k, v in float_params.items() if k != "lm_head"}
    qp, _ = quant.quantize_params(params, MIXED_RULES.replace("|embed", "") + ",embed=int8",
                                  axis=lambda p, s: 1 if "embed" in p else 0, progress=False)
    assert qp["embed"]["embedding"].axis == 1
    save_checkpoint(tmp_path / "tied", Model(config=cfg, params=qp))
    model = load_checkpoint(tmp_path / "tied")
    assert model.config.tie_embeddings and model.params["embed"]["embedding"].axis == 1
    _assert_identical(qp, model.params)
    np.testing.assert_array_equal(_logits(cfg, qp), _logits(cfg, model.params))


class FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "vocab.json"), "w") as f:
            json.dump(self.vocab, f)
        return ["vocab.json"]

    @classmethod
    def load(cls, directory):
        with open(os.path.join(directory, "vocab.json")) as f:
            return cls(json.load(f))


@pytest.fixture
def fake_tokenizer_module(monkeypatch):
    module = types.ModuleType("cascade.models.tokenizer")
    module.Tokenizer = FakeTokenizer
    monkeypatch.setitem(sys.modules, "cascade.models.tokenizer", module)


def test_tokenizer_round_trip_and_tamper(tmp_path, float_params, fake_tokenizer_module):
    path = tmp_path / "tok"
    save_checkpoint(path, Model(config=CFG, params=float_params, tokenizer=FakeTokenizer(["<s>", "a", "b"])))
    assert (path / "tokenizer" / "vocab.json").is_file()
    model = load_checkpoint(path)
    assert isinstance(model.tokenizer, FakeTokenizer) and model.tokenizer.vocab == ["<s>", "a", "b"]
    (path / "tokenizer" / "vocab.json").write_text('["<s>", "a", "c"]')
    with pytest.raises(ValueError, match="tokenizer/vocab.json is corrupted") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_overwrite(tmp_path, float_params, mixed_params):
    path = tmp_path / "m"
    save_checkpoint(path, Model(config=CFG, params=float_params))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="already exists; pass overwrite=True") as info:
        save_checkpoint(path, Model(config=CFG, params=mixed_params))
    assert str(path) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    _assert_identical(float_params, load_checkpoint(path).params)

    save_checkpoint(path, Model(config=CFG, params=mixed_params, quant="q"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old directory left behind
    model = load_checkpoint(path)
    assert model.quant == "q"
    _assert_identical(mixed_params, model.params)


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, float_params):
    path = tmp_path / "data"
    path.mkdir()
    (path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a cascade checkpoint; refusing to replace it"):
        save_checkpoint(path, Model(config=CFG, params=float_params), overwrite=True)
    assert (path / "precious.txt").read_text() == "keep me"


def _fail(*args, **kwargs):
    raise RuntimeError("disk full (simulated)")


@pytest.mark.parametrize("stage", ["_write_marker", "_write_arrays", "_install"])
def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch, float_params, stage):
    monkeypatch.setattr(checkpoint, stage, _fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "m", Model(config=CFG, params=float_params))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch, float_params, mixed_params):
    path = tmp_path / "m"
    save_checkpoint(path, Model(config=CFG, params=float_params))
    monkeypatch.setattr(checkpoint, "_write_marker", _fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, Model(config=CFG, params=mixed_params), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    _assert_identical(float_params, load_checkpoint(path).params)


def test_failed_rename_restores_the_old_checkpoint(tmp_path, monkeypatch, float_params, mixed_params):
    path = tmp_path / "m"
    save_checkpoint(path, Model(config=CFG, params=float_params))
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in os.path.basename(src):
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(path, Model(config=CFG, params=mixed_params), overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    _assert_identical(float_params, load_checkpoint(path).params)


def test_target_created_during_save_is_not_replaced(tmp_path, monkeypatch, float_params):
    path = tmp_path / "m"
    real_write_marker = checkpoint._write_marker

    def write_marker(*args):
        real_write_marker(*args)
        path.mkdir()  # another process creates the target while we write
        (path / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(checkpoint, "_write_marker", write_marker)
    with pytest.raises(ValueError, match="already exists"):
        save_checkpoint(path, Model(config=CFG, params=float_params))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (path / "theirs.txt").read_text() == "theirs"


def test_save_rejects_params_that_do_not_match_the_config(tmp_path, float_params):
    params = dict(float_params)
    del params["final_norm"]
    with pytest.raises(ValueError, match="missing 'final_norm/scale'"):
        save_checkpoint(tmp_path / "m", Model(config=CFG, params=params))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ corruption


def _data_files(path):
    """The orbax array data files (OCDBT), largest first."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(path / "arrays") for f in fs if os.path.basename(r) == "d"]
    assert files
    return sorted(files, key=lambda f: (-os.path.getsize(f), f))


def _flip_byte(path):
    f = _data_files(path)[0]
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(f, "wb").write(bytes(data))


def _delete_file(path):
    os.remove(_data_files(path)[0])


def _truncate_file(path):
    f = _data_files(path)[0]
    os.truncate(f, os.path.getsize(f) // 2)


def _delete_orbax_metadata(path):
    os.remove(path / "arrays" / "_METADATA")


def _extra_file(path):
    (path / "arrays" / "stray.bin").write_bytes(b"x")


def _edit_manifest(path):
    m = json.loads((path / CHECKPOINT_MARKER).read_text())
    m["config"]["norm_eps"] = 1e-3
    (path / CHECKPOINT_MARKER).write_text(json.dumps(m))


def _garble_manifest(path):
    (path / CHECKPOINT_MARKER).write_text("{not json")


def _wrong_version(path):
    m = json.loads((path / CHECKPOINT_MARKER).read_text())
    m["format_version"] = 99
    (path / CHECKPOINT_MARKER).write_text(json.dumps(m))


def _rehash(m):
    m["manifest_sha256"] = checkpoint._manifest_digest(m)
    return m


def _edit_leaf_dtype_consistently(path):
    """A manifest edited *with* a fresh checksum still has to agree with orbax's stored metadata."""
    m = json.loads((path / CHECKPOINT_MARKER).read_text())
    m["tree"]["final_norm/scale"]["dtype"] = "bfloat16"
    (path / CHECKPOINT_MARKER).write_text(json.dumps(_rehash(m)))


def _edit_leaf_hash_consistently(path):
    m = json.loads((path / CHECKPOINT_MARKER).read_text())
    m["tree"]["layers_0/mlp/up_proj/kernel"]["leaves"]["zero"]["sha256"] = "0" * 64
    (path / CHECKPOINT_MARKER).write_text(json.dumps(_rehash(m)))


def _edit_spec_consistently(path):
    m = json.loads((path / CHECKPOINT_MARKER).read_text())
    m["tree"]["layers_0/attn/q_proj/kernel"]["spec"] = "int4"
    (path / CHECKPOINT_MARKER).write_text(json.dumps(_rehash(m)))


def _remove_marker(path):
    os.remove(path / CHECKPOINT_MARKER)


@pytest.mark.parametrize("damage,match", [
    (_flip_byte, r"file arrays/.* is corrupted \(sha256 mismatch\)"),
    (_delete_file, r"file arrays/.* is missing"),
    (_truncate_file, r"file arrays/.* bytes, expected .* \(truncated or damaged\)"),
    (_delete_orbax_metadata, r"file arrays/_METADATA is missing"),
    (_extra_file, r"unexpected file arrays/stray.bin"),
    (_edit_manifest, r"modified or corrupted \(manifest checksum mismatch\)"),
    (_garble_manifest, r"cannot read cascade_checkpoint.json \(JSONDecodeError"),
    (_wrong_version, r"unsupported checkpoint format version 99 \(this cascade reads versions 1, 2\)"),
    (_edit_leaf_dtype_consistently,
     r"tensor 'final_norm/scale' is stored as float32\[64\], the manifest says bfloat16\[64\]"),
    (_edit_leaf_hash_consistently, r"tensor 'layers_0/mlp/up_proj/kernel/zero' is corrupted \(sha256 mismatch\)"),
    (_edit_spec_consistently, r"tensor 'layers_0/attn/q_proj/kernel': packed shape .* does not match spec int4"),
    (_remove_marker, r"not a cascade checkpoint \(missing cascade_checkpoint.json\)"),
])
def test_damaged_checkpoint_is_rejected(copy, damage, match):
    damage(copy)
    with pytest.raises(ValueError, match=match) as info:
        load_checkpoint(copy)
    message = str(info.value)
    assert message.startswith(f"{copy}: ") and "\n" not in message


def test_orbax_errors_are_one_line(copy, monkeypatch):
    """An error from orbax itself (files intact) becomes a one-line ValueError naming the directory."""
    import orbax.checkpoint as ocp

    def restore(self, *args, **kwargs):
        raise RuntimeError("tensorstore exploded\n" + "  spec: {...}\n" * 50)

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", restore)
    with pytest.raises(ValueError) as info:
        load_checkpoint(copy)
    assert str(info.value) == f"{copy}: cannot read arrays (RuntimeError: tensorstore exploded)"


def test_not_a_checkpoint(tmp_path, saved):
    assert not is_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nope")
    orbax_only = saved / "arrays"  # an orbax checkpoint without the cascade marker
    assert not is_checkpoint(orbax_only)
    with pytest.raises(ValueError, match=r"not a cascade checkpoint \(missing cascade_checkpoint.json\)") as info:
        load_checkpoint(orbax_only)
    assert str(orbax_only) in str(info.value)
    (tmp_path / "file").write_text("x")
    assert not is_checkpoint(tmp_path / "file")
    with pytest.raises(ValueError, match="not a directory"):
        load_checkpoint(tmp_path / "file")


V1 = os.path.join(os.path.dirname(__file__), "..", "data", "checkpoint-v1")  # tests/data/make_checkpoint_v1.py


def test_a_checkpoint_of_the_release_before_spec_version_2_keeps_its_old_meaning(tmp_path):
    """tests/data/checkpoint-v1 was written by the previous release (format 1), when ``int4``,
    ``int2-g16`` and ``int3-g32`` meant the narrow symmetric grid.  Loaded today its specs and rules
    text say narrow explicitly, its rules requantize the same float weights to exactly its stored
    codes (they would not under today's default grid), and saving it again writes format 2 with
    every grid explicit, which loads back identical."""
    cfg = ModelConfig(vocab_size=64, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16)
    old = load_checkpoint(V1)
    assert old.quant == "attn=int4-narrow,mlp=int2-g16-narrow,lm_head=int3-g32-narrow"
    is_q = lambda a: isinstance(a, quant.QuantizedTensor)  # noqa: E731
    specs = {jax.tree_util.keystr(p): a.spec for p, a in jax.tree_util.tree_flatten_with_path(old.params, is_leaf=is_q)[0]
             if is_q(a)}
    assert {str(s) for s in specs.values()} == {"int4-narrow", "int2-g16-narrow", "int3-g32-narrow"}
    assert all((s.qmin, s.qmax) == (-(2 ** (s.bits - 1) - 1), 2 ** (s.bits - 1) - 1) for s in specs.values())
    float_params = llama.init_params(cfg, jax.random.key(0))  # the weights make_checkpoint_v1.py quantized
    again, _ = quant.quantize_params(float_params, old.quant, progress=False)
    _assert_identical(again, old.params)
    today, _ = quant.quantize_params(float_params, "attn=int4,mlp=int2-g16,lm_head=int3-g32", progress=False)
    assert not np.array_equal(np.asarray(today["layers_0"]["attn"]["q_proj"]["kernel"].packed),
                              np.asarray(old.params["layers_0"]["attn"]["q_proj"]["kernel"].packed))
    save_checkpoint(tmp_path / "v2", old)
    manifest = json.loads((tmp_path / "v2" / CHECKPOINT_MARKER).read_text())
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION == 2
    assert manifest["quant"] == old.quant
    assert {e["spec"] for e in manifest["tree"].values() if e["kind"] == "quantized"} == {
        "int4-narrow", "int2-g16-narrow", "int3-g32-narrow"}
    new = load_checkpoint(tmp_path / "v2")
    _assert_identical(new.params, old.params)
    assert new.quant == old.quant


def test_a_format_2_checkpoint_records_every_grid(tmp_path, float_params):
    qp, _ = quant.quantize_params(float_params, "attn=int4,*=int3-g32", progress=False)
    save_checkpoint(tmp_path / "m", Model(config=CFG, params=qp, quant="attn=int4,*=int3-g32", source="t", format="hf"))
    manifest = json.loads((tmp_path / "m" / CHECKPOINT_MARKER).read_text())
    assert manifest["quant"] == "attn=int4-full,*=int3-g32-full"
    assert {e["spec"] for e in manifest["tree"].values() if e["kind"] == "quantized"} == {"int4-full", "int3-g32-full"}
    loaded = load_checkpoint(tmp_path / "m")
    assert loaded.params["layers_0"]["attn"]["q_proj"]["kernel"].spec.qmin == -8
