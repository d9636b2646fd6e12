"""Hugging Face checkpoints: a directory with ``config.json``, ``model.safetensors`` (or shards
listed in ``model.safetensors.index.json``) and the tokenizer files (``tokenizer.json`` /
``tokenizer_config.json``).  Weights are read with ``safetensors`` into numpy, in their stored
dtype (bf16 stays bf16), and renamed/transposed into the tree of :mod:`cascade.models.llama`.
"""

from __future__ import annotations

import json
import os
import re

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy for bf16 safetensors
import numpy as np

from cascade.models.config import load_hf_config
from cascade.models.loaders.common import build_params, linear_from_torch
from cascade.models.model import Model

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm/scale",
    "post_attention_layernorm.weight": "mlp_norm/scale",
    **{f"self_attn.{p}_proj.weight": f"attn/{p}_proj/kernel" for p in "qkvo"},
    **{f"self_attn.{p}_proj.bias": f"attn/{p}_proj/bias" for p in "qkvo"},
    **{f"mlp.{p}_proj.weight": f"mlp/{p}_proj/kernel" for p in ("gate", "up", "down")},
    **{f"mlp.{p}_proj.bias": f"mlp/{p}_proj/bias" for p in ("gate", "up", "down")},
}
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def is_hf_dir(path) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def safetensors_files(directory) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    if os.path.exists(single):
        return [single]
    others = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {', '.join(others[:3])}: only safetensors weights are supported)" if others else ""
    raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def read_safetensors(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not os.path.exists(path):
        raise ValueError(f"{path}: weight shard is missing")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        raise ValueError(f"{path}: cannot read safetensors ({type(e).__name__}: {' '.join(str(e).split())})") from None


def hf_name_to_path(name: str) -> str | None:
    """Our parameter path for a Hugging Face tensor name, or None if it is not a model weight."""
    if name == "model.embed_tokens.weight":
        return "embed/embedding"
    if name == "model.norm.weight":
        return "final_norm/scale"
    if name == "lm_head.weight":
        return "lm_head/kernel"
    if name == "model.vocab_map":  # cascade's own tensor (a reduced-vocabulary draft: ModelConfig.vocab_subset)
        return "vocab_map"
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers_{m.group(1)}/{_LAYER_NAMES[m.group(2)]}"
    return None


def _our_path(name: str, shard: str, cfg) -> str | None:
    """Our path for tensor ``name`` of ``shard``, None to skip it, or a ValueError for a stranger."""
    path = hf_name_to_path(name)
    if path is None:
        if _IGNORED.search(name):
            return None
        raise ValueError(f"{shard}: unexpected tensor {name!r} for {cfg.architecture}")
    if path == "lm_head/kernel" and cfg.tie_embeddings:
        return None  # some exporters write the tied head too; the embedding is the head
    return path


READ_BYTES = {"sharded": 0}  # bytes this process has read in sharded loads (a diagnostic: the multi-host check)


def _read_sharded(shard: str, cfg, mesh, flat: dict) -> None:
    """Each tensor of ``shard`` as a jax.Array in the tensor-parallel layout on ``mesh``, reading
    from the file only the slices this process's devices hold (``safe_open(...).get_slice``), each
    slice transposed for a kernel and checked for NaN/Inf as it is read."""
    import jax
    from jax.sharding import NamedSharding
    from safetensors import safe_open

    from cascade.models import sharding

    try:
        handle = safe_open(shard, framework="np")
    except Exception as e:
        raise ValueError(f"{shard}: cannot read safetensors ({type(e).__name__}: {' '.join(str(e).split())})") from None
    with handle as f:
        for name in f.keys():
            path = _our_path(name, shard, cfg)
            if path is None:
                continue
            view = f.get_slice(name)
            stored = tuple(view.get_shape())
            kernel = path.endswith("/kernel") and len(stored) == 2
            shape = stored[::-1] if kernel else stored

            def read(index, view=view, kernel=kernel, path=path):
                try:
                    part = np.ascontiguousarray(view[index[1], index[0]].T) if kernel else np.asarray(view[index])
                except Exception as e:
                    raise ValueError(f"{shard}: cannot read {name!r} ({type(e).__name__}: {e})") from None
                if not np.isfinite(np.asarray(part, np.float32)).all():
                    raise ValueError(f"{shard}: tensor {path} contains NaN/Inf values")
                READ_BYTES["sharded"] += part.nbytes
                return part

            layout = NamedSharding(mesh, sharding.param_partition(path, len(shape)))
            flat[path] = jax.make_array_from_callback(shape, layout, read)


def load_hf(directory, *, tokenizer: bool = True, mesh=None) -> Model:
    """``mesh``: read straight into the tensor-parallel layout, each process only its slices
    (:func:`_read_sharded`; ``tp`` must split the model)."""
    cfg = load_hf_config(os.path.join(directory, "config.json"))
    if mesh is not None:
        from cascade.models import sharding

        try:
            sharding.check_tp(cfg, mesh.shape[sharding.AXIS])
        except ValueError as e:
            raise ValueError(f"{directory}: {e}") from None
    flat = {}
    for shard in safetensors_files(directory):
        if mesh is not None:
            if not os.path.exists(shard):
                raise ValueError(f"{shard}: weight shard is missing")
            _read_sharded(shard, cfg, mesh, flat)
            continue
        for name, w in read_safetensors(shard).items():
            path = _our_path(name, shard, cfg)
            if path is None:
                continue
            if path.endswith("/kernel"):
                w = linear_from_torch(w)
            flat[path] = w
    params = build_params(flat, cfg, str(directory), finite_checked=mesh is not None)
    tok = None
    if tokenizer and any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model")):
        from cascade.models.tokenizer import Tokenizer

        tok = Tokenizer.from_hf_dir(directory)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"{directory}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                             f"{cfg.vocab_size}")
    return Model(config=cfg, params=params, tokenizer=tok, source=str(directory), format="hf")
