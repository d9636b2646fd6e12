"""The SmolLM2 pair: SmolLM2-135M-Instruct (the shared data's GGUF, the bytes `cascade pull smollm2`
fetches) verified against the shipped reduced-vocabulary draft, `smollm2-draft`."""

import os

import numpy as np
import pytest

from tests.shared_data import DATA


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):
    """A cache where `smollm2` is pulled (a link to the shared file: same bytes, no network)."""
    from cascade.models.pull import PULLABLE

    home = tmp_path_factory.mktemp("home")
    entry = PULLABLE["smollm2"]
    os.makedirs(home / "models" / "smollm2")
    os.symlink(DATA / "smollm2-135m" / entry.filename, home / "models" / "smollm2" / entry.filename)
    old = os.environ.get("CASCADE_HOME")
    os.environ["CASCADE_HOME"] = str(home)
    yield home
    os.environ["CASCADE_HOME"] = old


@pytest.fixture(scope="module")
def pair(pulled):
    from cascade.pair import PAIRS, load_pair

    preset = PAIRS["smollm2"]
    return load_pair(preset.small, preset.large)


def test_the_shipped_draft_is_a_reduced_vocabulary_model(pair):
    d, t = pair.small, pair.large
    assert d.config.vocab_size == t.config.vocab_size == 49152 and d.config.vocab_subset == 8192
    vm = np.asarray(d.params["vocab_map"])
    assert (vm == -1).sum() == 1 and len(np.unique(vm)) == 8192 and vm.max() < 49152
    assert {0, 1, 2} <= set(vm.tolist())  # <|endoftext|>, <|im_start|>, <|im_end|>: the chat template's tokens
    assert d.config.n_layers < t.config.n_layers and d.quant  # shipped quantized (int4)
    assert d.tokenizer.encode("Hello there!") == t.tokenizer.encode("Hello there!")


@pytest.mark.parametrize("prompt, chat", [("Write a short story about a cat who wants to fly.", True),
                                          ("Once upon a time", False)])
def test_greedy_speculative_output_is_smollm2s_own(pair, prompt, chat):
    """Through the reduced-vocabulary head, with and without the chat template."""
    from cascade.pair import run

    want = run(pair, prompt, mode="large", max_new_tokens=32, chat=chat)
    got = run(pair, prompt, mode="speculative", max_new_tokens=32, chat=chat, draft_len=4)
    assert got.token_ids == want.token_ids and got.stats.rounds >= 1
    if chat:  # the template wrapped the prompt: its ids start with <|im_start|>
        assert got.prompt_token_ids[0] == 1 and got.prompt == prompt
