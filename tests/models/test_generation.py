"""The host decode loop every generation shares (:func:`cascade.models.generation.decode_loop`),
driven by hand-made steps whose right answers are written out by hand, and its small helpers."""

import types

import numpy as np
import pytest

from cascade.models import generation
from cascade.models.config import ModelConfig
from cascade.models.generation import (decode_loop, decode_rate, drain, eos_ids, generate, pad_prompts,
                                       prompt_problem)


def _run(stream):
    """Everything a stream yields, and what it returns."""
    yielded = []
    while True:
        try:
            yielded.append(next(stream))
        except StopIteration as end:
            return yielded, end.value


def test_one_token_steps_stop_each_row_at_eos_or_max_tokens():
    """Plain decoding: one token per row per step; row 0 hits EOS (1) at its third token, row 1 runs
    to max_new_tokens, row 2's prefill token is EOS, so it never decodes."""
    script = [[6, 1, 7, 8], [9, 9, 9, 9], [3, 3, 3, 3]]  # each row's tokens after the prefill's
    rooms = []

    def step(room):
        rooms.append(list(room))
        return [[script[i][len(rooms) - 1]] for i in range(3)]

    yielded, done = _run(decode_loop(lambda: np.array([5, 9, 1]), step, max_new_tokens=4, eos=(1,)))
    assert yielded == [[[5], [9], [1]], [[6], [9], []], [[1], [9], []], [[], [9], []]]
    assert rooms == [[3, 3, 0], [2, 2, 0], [0, 1, 0]]  # a stopped row has no room, the others what is left
    assert done.tokens == [[5, 6, 1], [9, 9, 9, 9], [1]]
    assert done.stop_reasons == ["eos", "max_tokens", "eos"]
    assert done.steady_steps == 3 and done.steady_tokens == [2, 3, 0]


def test_many_token_steps_are_cut_at_eos_and_at_the_room_left():
    """Speculative rounds: a step offers several tokens per row; a row keeps them up to its first
    EOS or its room, and ``account`` hears how many it kept out of how much room it had."""
    rounds = iter([[[11, 12, 13], [21]], [[14, 15, 16, 17], [22, 1, 23]]])
    heard = []
    yielded, done = _run(decode_loop(lambda: [10, 20], lambda room: next(rounds), max_new_tokens=6, eos=[1],
                                     account=lambda kept, room: heard.append((kept, room))))
    assert yielded == [[[10], [20]], [[11, 12, 13], [21]], [[14, 15], [22, 1]]]
    assert heard == [([3, 1], [5, 5]), ([2, 2], [2, 4])]
    assert done.tokens == [[10, 11, 12, 13, 14, 15], [20, 21, 22, 1]]
    assert done.stop_reasons == ["max_tokens", "eos"]
    assert done.steady_tokens == [5, 3] and done.steady_steps == 2


def test_one_new_token_decodes_nothing_after_the_prefill():
    def step(room):
        raise AssertionError("no step: the prefill's token is the whole completion")

    yielded, done = _run(decode_loop(lambda: [4, 1], step, max_new_tokens=1, eos={1}))
    assert yielded == [[[4], [1]]] and done.stop_reasons == ["max_tokens", "eos"]
    assert done.steady_steps == 0 and done.steady_tokens == [0, 0] and done.decode_s == 0.0


def test_steps_that_compile_are_left_out_of_the_steady_counts(monkeypatch):
    """A step during which the compile counter moves (here: the first) counts in decode_s but not in
    the steady steps, tokens or seconds that tokens/s is made of."""
    counter = [0]
    monkeypatch.setattr(generation, "compile_count", lambda: counter[0])

    def step(room):
        counter[0] += len(room) == 2 and room[0] == 3  # compiles in the first step only
        return [[7, 7], [8]]

    _, done = _run(decode_loop(lambda: [0, 0], step, max_new_tokens=4, eos=()))
    assert done.tokens == [[0, 7, 7, 7], [0, 8, 8, 8]]  # row 0 kept 2 then 1 (its room); row 1 one a step
    assert done.steady_steps == 2 and done.steady_tokens == [1, 2]
    assert done.steady_s <= done.decode_s


def test_decode_rate():
    assert decode_rate(6, 0.5) == 12.0
    assert decode_rate(0, 1.0) is None and decode_rate(3, 0.0) is None


def test_pad_prompts_pads_on_the_right():
    got = pad_prompts([[1, 2, 3], [4]], 4)
    assert got.dtype == np.int32 and got.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]


def test_prompt_problem_wording():
    assert prompt_problem(5, 3, 8) is None and prompt_problem(5, 3, 8, "the context") is None
    assert prompt_problem(8, 1, 8, "the context") == (
        "the prompt is 8 tokens; the context is 8, so the prompt alone leaves no room to generate: shorten the prompt")
    assert prompt_problem(5, 4, 8) == ("prompt (5 tokens) + max new tokens (4) exceeds the model context (8); "
                                       "generate at most 3 tokens")


def test_eos_ids_prefers_the_tokenizer():
    cfg = ModelConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, vocab_size=16,
                      max_seq_len=16, eos_token_ids=(2,))
    assert eos_ids(types.SimpleNamespace(eos_ids=(3, 5)), cfg) == (3, 5)
    assert eos_ids(types.SimpleNamespace(eos_ids=()), cfg) == (2,)


def test_generate_checks_the_prompts_before_any_work():
    cfg = ModelConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, vocab_size=16,
                      max_seq_len=16)
    for prompts, n, message in (([[]], 2, "every prompt needs at least one token"),
                                ([[1]], 0, "max_new_tokens must be >= 1"),
                                ([[1, 16]], 2, "prompt token id 16 is outside the vocabulary"),
                                ([[1] * 10], 7, "exceeds the model context")):
        with pytest.raises(ValueError, match=message):
            drain(generation.generate_stream(None, cfg, prompts, max_new_tokens=n))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_steps_in_one_device_call_give_the_tokens_of_one_step_a_call(temperature):
    """generate(steps_per_call=N): the device loops over N steps, stopping each row at its EOS or
    room; the tokens and stop reasons are those of one step a call, for calls of 3 and 8 steps."""
    import jax

    from cascade.models.config import ModelConfig
    from cascade.models.llama import init_params
    from cascade.models.sampling import SamplingConfig

    cfg = ModelConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                      max_seq_len=96, bos_token_id=0, eos_token_ids=(1,), tie_embeddings=False)
    params = jax.tree.map(lambda a: a * 3 if a.ndim >= 2 else a, init_params(cfg, jax.random.key(4)))
    prompts = [[0, 5, 9], [0], [0, 7, 7, 7, 2, 3]]
    sampling = SamplingConfig(temperature=temperature, seed=2)
    ref = generate(params, cfg, prompts[:1], max_new_tokens=30, eos_ids=()).tokens[0]

    def run(n):
        g = generate(params, cfg, prompts, max_new_tokens=30, sampling=sampling, eos_ids=(ref[6],), steps_per_call=n)
        return g.tokens, g.stop_reasons

    one = run(1)
    assert temperature > 0 or set(one[1]) == {"eos", "max_tokens"}
    assert run(3) == one and run(8) == one


def test_steps_of_one_call_are_taken_one_at_a_time(monkeypatch):
    """A step may return Steps (several steps' candidates from one device call): the loop takes them
    one at a time with the room each leaves, accounts each, splits the call's time evenly among them,
    and leaves all of a compiling call's steps out of the steady counts."""
    from cascade.models.generation import Steps

    counter, calls, heard = [0], [], []
    monkeypatch.setattr(generation, "compile_count", lambda: counter[0])
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # the prefill, then the two calls: 3 s and 2 s
    monkeypatch.setattr(generation.time, "perf_counter", lambda: next(clock))

    def step(room):
        calls.append(list(room))
        if len(calls) == 1:
            counter[0] += 1  # the first call compiles: its 3 steps are not steady
            return Steps([[[6], [9]], [[1], [9]], [[7], [9]]])  # row 0 stops at EOS 1 in the second step
        return Steps([[[5], [9]], [[5], [9]]])

    yielded, done = _run(decode_loop(lambda: [4, 8], step, max_new_tokens=6, eos=(1,),
                                     account=lambda kept, room: heard.append((kept, room))))
    assert yielded == [[[4], [8]], [[6], [9]], [[1], [9]], [[], [9]], [[], [9]], [[], [9]]]
    assert calls == [[5, 5], [0, 2]]  # the second call sees the room the first call's steps left
    assert heard == [([1, 1], [5, 5]), ([1, 1], [4, 4]), ([0, 1], [0, 3]), ([0, 1], [0, 2]), ([0, 1], [0, 1])]
    assert done.tokens == [[4, 6, 1], [8, 9, 9, 9, 9, 9]] and done.stop_reasons == ["eos", "max_tokens"]
    assert done.steady_steps == 2 and done.steady_tokens == [0, 2] and done.steady_s == 2.0 and done.decode_s == 5.0
