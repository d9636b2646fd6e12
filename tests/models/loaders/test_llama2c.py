"""llama2.c checkpoints against an independent float64 numpy forward pass (tests/models/reference_llama2c)."""

import os

import numpy as np
import pytest
import sentencepiece as spm

from cascade.models.generation import generate
from cascade.models.decoder import logits_of
from cascade.models.loaders.llama2c import load_llama2c
from tests.models import reference_llama2c as ref

from tests.shared_data import DATA  # noqa: E402
BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
TOK = os.path.join(DATA, "stories260K", "tok512.model")
OPENING = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
           "One day, she saw a big, r")


@pytest.fixture(scope="module")
def model():
    return load_llama2c(BIN)


def test_config_from_header(model):
    c = model.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == (64, 172, 5, 8, 4, 512, 512)
    assert c.tie_embeddings and model.tokenizer is not None and model.tokenizer.vocab_size == 512


def test_logits_match_numpy_reference(model):
    w = ref.read_llama2c(BIN)
    tokens = [1] + spm.SentencePieceProcessor(model_file=TOK).encode("Once upon a time, a dog named Max ran far.")
    expected = ref.forward(w, tokens)
    ours = np.asarray(logits_of(model.params, model.config, np.asarray(tokens)[None]))[0]
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_greedy_decode_reproduces_the_known_story_opening(model):
    out = generate(model.params, model.config, [[1]], max_new_tokens=40)
    assert model.tokenizer.decode(out.tokens[0]) == OPENING


def test_truncated_and_bad_files(tmp_path):
    raw = open(BIN, "rb").read()
    (tmp_path / "short.bin").write_bytes(raw[:-4])
    with pytest.raises(ValueError, match="short.bin: file is truncated"):
        load_llama2c(str(tmp_path / "short.bin"))
    (tmp_path / "tiny.bin").write_bytes(raw[:10])
    with pytest.raises(ValueError, match="too short for a llama2.c header"):
        load_llama2c(str(tmp_path / "tiny.bin"))
    bad = np.frombuffer(raw[:28], "<i4").copy()
    bad[3] = 7  # n_heads does not divide dim
    (tmp_path / "bad.bin").write_bytes(bad.tobytes() + raw[28:])
    with pytest.raises(ValueError, match="implausible header"):
        load_llama2c(str(tmp_path / "bad.bin"))
    nan = np.frombuffer(raw[28:], "<f4").copy()
    nan[100] = np.nan  # inside the token embedding
    (tmp_path / "nan.bin").write_bytes(raw[:28] + nan.tobytes())
    with pytest.raises(ValueError, match="embed/embedding contains NaN"):
        load_llama2c(str(tmp_path / "nan.bin"))


def test_untied_classifier(tmp_path):
    """A negative vocab_size means wcls follows the weights: the head must use it, not the embedding."""
    raw = open(BIN, "rb").read()
    header = np.frombuffer(raw[:28], "<i4").copy()
    header[5] = -header[5]
    wcls = np.random.RandomState(0).randn(512, 64).astype("<f4")
    path = tmp_path / "untied.bin"
    path.write_bytes(header.tobytes() + raw[28:] + wcls.tobytes())
    m = load_llama2c(str(path), tokenizer_path=TOK)
    assert not m.config.tie_embeddings
    w = ref.read_llama2c(str(path))
    tokens = [1, 300, 301, 302]
    np.testing.assert_allclose(np.asarray(logits_of(m.params, m.config, np.asarray(tokens)[None]))[0],
                               ref.forward(w, tokens), rtol=1e-4, atol=1e-4)
