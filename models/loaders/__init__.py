"""Loaders: every MODEL argument (a path or a built-in name) becomes a :class:`cascade.models.model.Model`.

* ``default-small`` / ``default-large``: the embedded pair, :mod:`cascade.models.defaults`

* a directory with ``cascade_checkpoint.json``: a saved (quantized) model, :mod:`cascade.models.checkpoint`
* a directory with ``config.json``: a Hugging Face checkpoint, :mod:`cascade.models.loaders.hf`
* a ``.gguf`` file: :mod:`cascade.models.loaders.gguf`
* a ``.bin`` file: a llama2.c checkpoint, :mod:`cascade.models.loaders.llama2c` (``tokenizer``: its
  SentencePiece ``.model``; by default a ``tokenizer.model`` or single ``tok*.model`` beside it)
"""

from __future__ import annotations

import os

from cascade.models.model import Model


def load_model(path, *, tokenizer=None, mesh=None) -> Model:
    """The model at ``path`` (a built-in name, a Hugging Face directory, a saved checkpoint, a .gguf
    or a llama2.c .bin).  ``mesh`` (:func:`cascade.models.sharding.make_mesh`): its parameters in
    the tensor-parallel layout.  A checkpoint and a Hugging Face directory are read shard by shard
    (each process reads only the slices its devices hold); a .gguf or .bin file is read whole and
    then placed."""
    model = _load(path, tokenizer=tokenizer, mesh=mesh)
    if mesh is not None and model.format not in ("checkpoint", "hf"):
        import dataclasses

        from cascade.models import sharding

        model = dataclasses.replace(model, params=sharding.shard_params(model.params, model.config, mesh))
    return model


def _load(path, *, tokenizer=None, mesh=None) -> Model:
    from cascade.models.defaults import resolve_model_path

    path = resolve_model_path(path)
    if not os.path.exists(path):
        from cascade.models.checkpoint import recover_interrupted_save

        recover_interrupted_save(path)  # a checkpoint whose overwrite was killed midway comes back
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    if tokenizer is not None and not (os.path.isfile(path) and path.lower().endswith(".bin")):
        raise ValueError(f"{path}: a tokenizer path applies only to a llama2.c .bin model; "
                         "this model brings its own tokenizer")
    if os.path.isdir(path):
        from cascade.models.checkpoint import is_checkpoint

        if is_checkpoint(path):
            from cascade.models.checkpoint import load_checkpoint

            return load_checkpoint(path, mesh=mesh)
        from cascade.models.loaders.hf import is_hf_dir, load_hf

        if is_hf_dir(path):
            return load_hf(path, mesh=mesh)
        raise ValueError(f"{path}: not a model directory (no config.json or cascade_checkpoint.json)")
    lower = path.lower()
    if lower.endswith(".gguf"):
        from cascade.models.loaders.gguf import load_gguf

        return load_gguf(path)
    if lower.endswith(".bin"):
        from cascade.models.loaders.llama2c import load_llama2c

        return load_llama2c(path, tokenizer_path=tokenizer)
    raise ValueError(f"{path}: unknown model format (expected a Hugging Face directory, a saved checkpoint, "
                     "a .gguf file or a llama2.c .bin file)")


def read_config(path, *, tokenizer=None):
    """The :class:`ModelConfig` of a model without loading its weights (a built-in name, a Hugging Face
    directory, a saved checkpoint, a .gguf or a llama2.c .bin), e.g. for a memory plan."""
    import json

    from cascade.models.config import ModelConfig, load_hf_config
    from cascade.models.defaults import resolve_model_path

    path = resolve_model_path(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        from cascade.models.checkpoint import CHECKPOINT_MARKER, is_checkpoint

        if is_checkpoint(path):
            with open(os.path.join(path, CHECKPOINT_MARKER), encoding="utf-8") as f:
                return ModelConfig.from_dict(json.load(f)["config"])
        if os.path.isfile(os.path.join(path, "config.json")):
            return load_hf_config(os.path.join(path, "config.json"))
        raise ValueError(f"{path}: not a model directory (no config.json or cascade_checkpoint.json)")
    lower = path.lower()
    if lower.endswith(".gguf"):
        from cascade.models.loaders.gguf import config_from_gguf, read_gguf

        f = read_gguf(path)
        return config_from_gguf(f.metadata, path, tensor_names=set(f.tensors))
    if lower.endswith(".bin"):
        from cascade.models.loaders.llama2c import read_header

        return read_header(path)[0]
    raise ValueError(f"{path}: unknown model format (expected a Hugging Face directory, a saved checkpoint, "
                     "a .gguf file or a llama2.c .bin file)")
