"""Continuous batching (cascade/batching.py): rows that join a running batch at different steps, and
leave it, give each prompt exactly the greedy tokens it gets alone (cascade.pair.generate_batch of
that prompt), in every joinable mode; a dropped row does not disturb the others."""

import pytest

from cascade.batching import SlotBatch
from cascade.models.generation import eos_ids
from cascade.models.sampling import SamplingConfig
from cascade.pair import generate_batch, load_pair

PROMPTS = ["Once upon a time", "The dog ran to the park and", "Lily had a red ball.", "Tom",
           "One day, a little bird"]


@pytest.fixture(scope="module")
def pair():
    return load_pair()


def _alone(pair, mode, prompt, n, **settings):
    (r,) = generate_batch(pair, [prompt], mode=mode, max_new_tokens=n, **settings)
    return r.token_ids


def _run(batch, pair, jobs, drop=None):
    """Feed ``jobs`` [(prompt, max_new_tokens)] into ``batch``, one new row per step while a slot is
    free, until every row is done; ``drop``: the job index removed after its second step."""
    tok = pair.tokenizer
    waiting, slot_of, out, steps = list(enumerate(jobs)), {}, {}, {}
    while waiting or batch.live:
        if waiting and batch.free():
            i, (prompt, n) = waiting.pop(0)
            slot, first = batch.add(tok.encode(prompt), n)
            assert first == batch.rows[slot].tokens
            slot_of[slot], steps[i] = i, 0
        emitted = batch.step()
        for slot, toks in emitted.items():
            assert batch.rows[slot].tokens[-len(toks):] == toks if toks else True
            steps[slot_of[slot]] += 1
        for slot, row in enumerate(batch.rows):
            if row is None:
                continue
            i = slot_of[slot]
            if row.stop is not None or (i == drop and steps[i] >= 2):
                out[i] = batch.remove(slot)
    return out


@pytest.mark.parametrize("mode, settings", [("large", {}), ("small", {}), ("speculative", {"draft_len": 3}),
                                            ("spec-cascade", {"draft_len": 2, "alpha": 0.3}),
                                            ("speculative", {"draft_len": 2, "small_kv": "int8", "large_kv": "int4"})])
def test_rows_joining_a_running_batch_get_their_own_greedy_tokens(pair, mode, settings):
    jobs = [(p, n) for p, n in zip(PROMPTS, (24, 9, 17, 30, 5))]
    if "large_kv" in settings:  # quantized caches compile slowly: four rows still join and leave a batch of three slots
        jobs = jobs[:4]
    eos = eos_ids(pair.tokenizer, pair.large.config)
    batch = SlotBatch(pair, mode, slots=3, ctx=128, sampling=SamplingConfig(), eos=eos, **settings)
    out = _run(batch, pair, jobs)
    for i, (prompt, n) in enumerate(jobs):
        want = _alone(pair, mode, prompt, n, **settings)
        assert out[i].tokens == want, (mode, prompt)
        assert out[i].stop == ("eos" if want[-1] in eos else "max_tokens")
        if mode in ("speculative", "spec-cascade"):
            assert out[i].stats.draft_tokens > 0 and 0 <= out[i].stats.accepted_tokens <= out[i].stats.draft_tokens


def test_a_dropped_row_leaves_the_others_untouched(pair):
    jobs = [(p, 20) for p in PROMPTS[:4]]
    eos = eos_ids(pair.tokenizer, pair.large.config)
    batch = SlotBatch(pair, "speculative", slots=2, ctx=128, sampling=SamplingConfig(), eos=eos, draft_len=3)
    out = _run(batch, pair, jobs, drop=0)
    assert out[0].stop is None and len(out[0].tokens) < 20  # dropped mid-way
    for i in (1, 2, 3):
        assert out[i].tokens == _alone(pair, "speculative", jobs[i][0], 20, draft_len=3)


def test_room_and_refusals(pair):
    batch = SlotBatch(pair, "speculative", slots=1, ctx=64, sampling=SamplingConfig(), eos=(), draft_len=4)
    assert batch.room_for(10) == 64 - 10 - 6
    assert batch.room_for(65) == 0  # the padded prefill alone does not fit
    ids = pair.tokenizer.encode("Once upon a time")
    with pytest.raises(ValueError, match="do not fit the context of 64"):
        batch.add(ids, batch.room_for(len(ids)) + 1)
    with pytest.raises(ValueError, match="empty"):
        batch.add([], 4)
    with pytest.raises(ValueError, match="joinable"):
        SlotBatch(pair, "defer", slots=1, ctx=64, sampling=SamplingConfig(), eos=())
    batch.add(ids, 4)
    assert batch.free() == 0


@pytest.mark.parametrize("mode", ["large", "speculative"])
def test_a_batch_grows_under_running_rows(pair, mode):
    """A batch started at one slot grows to 2 and then 4 while rows run; every row still gets its own
    greedy tokens (the running rows are copied into the bigger caches mid-way)."""
    tok = pair.tokenizer
    eos = eos_ids(tok, pair.large.config)
    settings = {"draft_len": 3} if mode == "speculative" else {}
    batch = SlotBatch(pair, mode, slots=1, ctx=128, sampling=SamplingConfig(), eos=eos, **settings)
    jobs = [(p, 16) for p in PROMPTS[:4]]
    slot_of = {}
    for i, (prompt, n) in enumerate(jobs):
        if i in (1, 2):
            batch.grow({1: 2, 2: 4}[i])
        slot, _ = batch.add(tok.encode(prompt), n)
        slot_of[slot] = i
        batch.step()
        batch.step()
    assert batch.slots == 4
    out = {}
    while batch.live:
        batch.step()
        for slot, row in enumerate(batch.rows):
            if row is not None and row.stop is not None:
                out[slot_of[slot]] = batch.remove(slot).tokens
    for i, (prompt, n) in enumerate(jobs):
        assert out[i] == _alone(pair, mode, prompt, n, **settings), (mode, prompt)
