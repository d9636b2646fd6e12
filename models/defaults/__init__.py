"""The embedded default model pair, shipped inside the package as Hugging Face directories.

``default-small`` (the draft) and ``default-large`` (the verifier) are Llama-architecture models
trained from scratch on TinyStories by ``scripts/train_default_pair.py``; they share one byte-level
BPE tokenizer.  See ``MODEL_CARD.md`` beside the weights.  The names work wherever a MODEL path
is accepted (:func:`cascade.models.load_model`, every CLI command).  ``tinystories-val-sample.txt``
beside them holds the first 40 stories of their validation text (never trained on): text every
installation has, for smoke tests such as ``scripts/evaluate.py --quick``.
"""

from __future__ import annotations

import importlib.resources
import os

DEFAULT_SMALL = "default-small"
DEFAULT_LARGE = "default-large"
DEFAULT_MODELS = (DEFAULT_SMALL, DEFAULT_LARGE)
SMOLLM2_DRAFT = "smollm2-draft"  # the draft distilled for SmolLM2-135M-Instruct (scripts/train_smollm2_draft.py)
BUILTIN_MODELS = DEFAULT_MODELS + (SMOLLM2_DRAFT,)
VALIDATION_SAMPLE = "tinystories-val-sample.txt"  # 40 validation stories separated by <|endoftext|> lines


def validation_sample() -> str:
    """The path of the validation sample shipped with the default pair (module docs)."""
    return os.fspath(importlib.resources.files(__name__) / VALIDATION_SAMPLE)


def default_model_dir(name: str) -> str:
    """The directory of a built-in model (``default-small`` / ``default-large`` / ``smollm2-draft``)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN_MODELS)}")
    path = os.fspath(importlib.resources.files(__name__) / name)
    if not any(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "cascade_checkpoint.json")):
        raise ValueError(f"built-in model {name!r} is missing from this installation ({path}); "
                         "reinstall the package or run scripts/"
                         f"{'train_smollm2_draft.py' if name == SMOLLM2_DRAFT else 'train_default_pair.py'} --export models/defaults")
    return path


def resolve_model_path(path) -> str:
    """A built-in name becomes its directory, a pulled model's name (``smollm2``,
    :mod:`cascade.models.pull`) its file in the cache; anything else is returned unchanged.  A
    pullable name not pulled yet is an error that says to pull it (an existing path of that name wins)."""
    from cascade.models.pull import PULLABLE, is_pulled, pulled_path

    path = os.fspath(path)
    if os.path.exists(path):
        return path
    if path in BUILTIN_MODELS:
        return default_model_dir(path)
    if path in PULLABLE:
        if not is_pulled(path):
            raise ValueError(f"model {path!r} is not in the cache ({pulled_path(path)}); run `cascade pull {path}` "
                             "first (it downloads it once)")
        return pulled_path(path)
    return path


def model_names() -> tuple[str, ...]:
    """Every name a MODEL argument accepts besides a path: the built-in models and the pullable ones."""
    from cascade.models.pull import PULLABLE

    return BUILTIN_MODELS + tuple(PULLABLE)
