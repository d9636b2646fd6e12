"""The embedded default pair: real Hugging Face checkpoints, the promised sizes, a shared tokenizer."""

import json
import os

import jax
import numpy as np
import pytest
import torch

from cascade.models import load_model, logits_of
from cascade.models.defaults import DEFAULT_MODELS, default_model_dir, resolve_model_path
from cascade.models.evaluation import split_documents
from tests.shared_data import DATA

VAL = os.path.join(DATA, "text", "tinystories_val.txt")
HERE = os.path.dirname(default_model_dir("default-small"))


@pytest.fixture(scope="module")
def pair():
    return {name: load_model(name) for name in DEFAULT_MODELS}


def test_builtin_names_resolve_to_shipped_hf_directories(pair):
    for name, m in pair.items():
        d = default_model_dir(name)
        assert resolve_model_path(name) == d and m.source == d and m.format == "hf"
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert os.path.isfile(os.path.join(d, f))
    assert resolve_model_path("some/other/path") == "some/other/path"
    with pytest.raises(ValueError, match="unknown built-in model"):
        default_model_dir("default-medium")


def test_sizes_as_promised(pair):
    n = {name: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(m.params)) for name, m in pair.items()}
    assert 0.5e6 <= n["default-small"] <= 2e6
    assert n["default-large"] >= 8 * n["default-small"]
    shipped = sum(os.path.getsize(os.path.join(default_model_dir(k), "model.safetensors")) for k in DEFAULT_MODELS)
    assert shipped < 50e6
    assert pair["default-small"].config.vocab_size == pair["default-large"].config.vocab_size


def test_the_shared_tokenizer_round_trips_the_validation_text(pair):
    small, large = pair["default-small"].tokenizer, pair["default-large"].tokenizer
    with open(VAL, encoding="utf-8") as f:
        docs = split_documents(f.read())
    assert len(docs) == 1000
    for doc in docs:
        ids = small.encode(doc)
        assert ids[0] == small.bos_id == 0
        assert small.decode(ids) == doc
    assert large.encode(docs[0]) == small.encode(docs[0])


@pytest.mark.parametrize("name", DEFAULT_MODELS)
def test_transformers_gives_the_same_logits(pair, name):
    from transformers import LlamaForCausalLM

    m = pair[name]
    hf = LlamaForCausalLM.from_pretrained(default_model_dir(name), torch_dtype=torch.float32).eval()
    ids = m.tokenizer.encode("Once upon a time, there was a little dog named Max. He liked to run in the park.")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(logits_of(m.params, m.config, [ids]))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_the_card_records_a_large_model_at_least_15_percent_better():
    with open(os.path.join(HERE, "training.json"), encoding="utf-8") as f:
        rec = json.load(f)["models"]
    small, large = rec["default-small"]["val_perplexity"], rec["default-large"]["val_perplexity"]
    assert large <= 0.85 * small
    with open(os.path.join(HERE, "MODEL_CARD.md"), encoding="utf-8") as f:
        card = f.read()
    assert f"{small:.3f}" in card and f"{large:.3f}" in card and "CDLA-Sharing-1.0" in card


def test_the_shipped_validation_sample_is_the_first_40_validation_stories_and_installs():
    """`tinystories-val-sample.txt` (what `scripts/evaluate.py --quick` scores on an installed package)
    holds exactly the first 40 stories of the validation text, and the package data installs it."""
    import fnmatch
    import tomllib

    from cascade.models.defaults import VALIDATION_SAMPLE, validation_sample

    with open(VAL, encoding="utf-8") as f:
        first = split_documents(f.read())[:40]
    with open(validation_sample(), encoding="utf-8") as f:
        assert split_documents(f.read()) == first
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["cascade.models.defaults"]
    assert any(fnmatch.fnmatch(VALIDATION_SAMPLE, p) for p in patterns)
