"""Loaders: every MODEL argument (a path or a built-in name) becomes a :class:`cascade.models.model.Model`.

* ``default-small`` / ``default-large``: the embedded pair, :mod:`cascade.models.defaults`

* a directory with ``cascade_checkpoint.json``: a saved (quantized) model, :mod:`cascade.models.checkpoint`
* a directory with ``config.json``: a Hugging Face checkpoint, :mod:`cascade.models.loaders.hf`
* a ``.gguf`` file: :mod:`cascade.models.loaders.gguf`
* a ``.bin`` file: a llama2.c checkpoint, :mod:`cascade.models.loaders.llama2c` (``tokenizer``: its
  SentencePiece ``.model``; by default a ``tokenizer.model`` or single ``tok*.model`` beside it)

``tokenizer=PATH`` (a ``tokenizer.json`` or a SentencePiece ``.model``,
:meth:`cascade.models.tokenizer.Tokenizer.from_file`) is for a model without a tokenizer of its
own: a llama2.c ``.bin``, a Hugging Face directory without tokenizer files, a ``.gguf`` without
tokenizer metadata, a checkpoint saved without one.  A model that brings its own refuses it
(:func:`check_tokenizer_path`), so a tokenizer never silently replaces the one the model was
trained with.
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
    if tokenizer is not None:
        check_tokenizer_path(path, tokenizer)
    if os.path.isdir(path):
        from cascade.models.checkpoint import is_checkpoint

        if is_checkpoint(path):
            from cascade.models.checkpoint import load_checkpoint

            return _with_tokenizer(load_checkpoint(path, mesh=mesh), tokenizer)
        from cascade.models.loaders.hf import is_hf_dir, load_hf

        if is_hf_dir(path):
            return _with_tokenizer(load_hf(path, mesh=mesh, tokenizer=tokenizer is None), tokenizer)
        raise ValueError(f"{path}: not a model directory (no config.json or cascade_checkpoint.json)")
    lower = path.lower()
    if lower.endswith(".gguf"):
        from cascade.models.loaders.gguf import load_gguf

        return _with_tokenizer(load_gguf(path, tokenizer=tokenizer is None), tokenizer)
    if lower.endswith(".bin"):
        from cascade.models.loaders.llama2c import load_llama2c

        return load_llama2c(path, tokenizer_path=tokenizer)
    raise ValueError(f"{path}: unknown model format (expected a Hugging Face directory, a saved checkpoint, "
                     "a .gguf file or a llama2.c .bin file)")


TOKENIZER_PATH_USE = ("a llama2.c .bin model or a model without a tokenizer of its own (a Hugging Face directory "
                      "without tokenizer files, a .gguf without tokenizer metadata)")


def has_own_tokenizer(path) -> bool:
    """Whether the model at ``path`` (a built-in name or a path) brings a tokenizer, read from its
    files without loading it.  A llama2.c ``.bin`` never does (its ``.model`` lies beside it); a
    model whose files cannot be read says no here and its loader reports the damage."""
    import json

    from cascade.models.defaults import resolve_model_path

    path = resolve_model_path(path)
    if os.path.isdir(path):
        from cascade.models.checkpoint import CHECKPOINT_MARKER, is_checkpoint

        if is_checkpoint(path):
            try:
                with open(os.path.join(path, CHECKPOINT_MARKER), encoding="utf-8") as f:
                    return json.load(f).get("tokenizer") is not None
            except (OSError, ValueError, AttributeError):
                return False
        return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
    if path.lower().endswith(".gguf") and os.path.isfile(path):
        from cascade.models.loaders.gguf import read_gguf

        try:
            return "tokenizer.ggml.model" in read_gguf(path).metadata
        except Exception:  # noqa: BLE001 - a damaged file: load_model says what is wrong with it
            return False
    return False


def check_tokenizer_path(path, tokenizer) -> None:
    """A ValueError unless ``tokenizer`` (a path) may be given for the model at ``path``: it must
    be a file, and the model must not bring a tokenizer of its own (module docstring)."""
    if has_own_tokenizer(path):
        raise ValueError(f"{path}: a tokenizer path applies only to {TOKENIZER_PATH_USE}; this model brings its own "
                         "tokenizer")
    if not os.path.isfile(tokenizer):
        raise ValueError(f"{tokenizer}: no such tokenizer file (a tokenizer.json or a SentencePiece .model)")


def _with_tokenizer(model: Model, tokenizer) -> Model:
    """``model`` with the tokenizer read from the file ``tokenizer`` (None: as it is)."""
    if tokenizer is None:
        return model
    import dataclasses

    from cascade.models.tokenizer import Tokenizer

    cfg = model.config
    tok = Tokenizer.from_file(tokenizer, bos_id=cfg.bos_token_id, eos_ids=cfg.eos_token_ids)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tokenizer}: the tokenizer has {tok.vocab_size} tokens but {model.source} has vocab_size "
                         f"{cfg.vocab_size}")
    return dataclasses.replace(model, tokenizer=tok)


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
            try:
                with open(os.path.join(path, CHECKPOINT_MARKER), encoding="utf-8") as f:
                    return ModelConfig.from_dict(json.load(f)["config"])
            except (TypeError, ValueError, KeyError) as e:  # as load_checkpoint says it
                raise ValueError(f"{path}: invalid model config in {CHECKPOINT_MARKER} "
                                 f"({type(e).__name__}: {' '.join(str(e).split())})") from None
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
