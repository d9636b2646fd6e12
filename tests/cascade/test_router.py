"""`cascade.Cascade`: the router an app holds, on the embedded default pair."""

import threading

import pytest

from cascade import Cascade, SamplingConfig, load_pair, run_pair


@pytest.fixture(scope="module")
def router():
    return Cascade.load()


def test_generate_stream_and_metrics(router):
    before = router.metrics
    one = router.generate("Once upon a time", max_new_tokens=20)
    pair = router.pair
    assert one.token_ids == run_pair(pair, "Once upon a time", mode="large", max_new_tokens=20).token_ids  # exact
    rows = router.generate(["The dog", "", "Lily went"], max_new_tokens=12)
    assert rows[1].error == "the prompt is empty" and rows[0].token_ids == router.generate("The dog", max_new_tokens=12).token_ids
    pieces = list(router.stream("Lily went", max_new_tokens=12))
    assert len(pieces) > 1 and "".join(pieces) == rows[2].text
    m = router.metrics
    assert m["requests"] == before["requests"] + 4 and m["rows"] == before["rows"] + 6
    assert m["failed_rows"] == before["failed_rows"] + 1
    assert m["generated_tokens"] == before["generated_tokens"] + 20 + 12 + 12 + 12 + 12
    assert 0 < m["acceptance_rate"] <= 1 and m["draft_tokens"] >= m["accepted_tokens"] > 0
    assert len(m["acceptance_per_position"]) == 4 and m["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="exceeds the context"):
        router.generate("Once upon a time", max_new_tokens=600)
    sampled = router.generate("The cat", max_new_tokens=16, sampling=SamplingConfig(temperature=0.8, seed=3))
    assert sampled.token_ids == router.generate("The cat", max_new_tokens=16,
                                                sampling=SamplingConfig(temperature=0.8, seed=3)).token_ids


def test_modes_per_call_and_their_metrics(router):
    d = router.generate("The dog", max_new_tokens=12, mode="defer", threshold=0.5)
    assert d.answered_by == "large" and d.deferral.deferred
    assert "".join(router.stream("The dog", max_new_tokens=12, mode="large")) == \
        router.generate("The dog", max_new_tokens=12, mode="large").text
    c = Cascade(router.pair, mode="spec-cascade", alpha=0.0)
    r = c.generate("The dog", max_new_tokens=12)
    assert r.stats.deferred_tokens == r.stats.judged_tokens and c.metrics["deferral_rate"] == 1.0
    fresh = Cascade(router.pair)  # the time in each model: one model alone, both in a round, each when deferring
    fresh.generate("The dog", max_new_tokens=8, mode="large")
    alone = fresh.metrics["seconds"]
    assert fresh.metrics["seconds_by_model"] == {"small": 0.0, "large": alone, "both": 0.0} and alone > 0
    fresh.generate("The dog", max_new_tokens=8)
    d = fresh.generate("The dog", max_new_tokens=8, mode="defer", threshold=0.5)
    by = fresh.metrics["seconds_by_model"]
    assert by["both"] > 0 and by["small"] == round(d.seconds["small"], 4) and d.seconds["large"] > 0
    assert abs(by["large"] - (alone + d.seconds["large"])) < 1e-3  # the large model alone, then deferred to


def test_later_calls_compile_nothing_new(router):
    """Prompts of the same bucket, other lengths and other sampling settings: no new programs."""
    from cascade.models import decoder, generation
    from cascade.models import sampling as sampling_mod
    from cascade import speculative

    router.generate(["Once upon a time", "The dog"], max_new_tokens=24)
    router.generate(["Once upon a time", "The dog"], max_new_tokens=24, sampling=SamplingConfig(temperature=0.7))
    jitted = (speculative.speculative_round, decoder.forward, generation._decode_and_sample, sampling_mod.sample_logits)
    before = [f._cache_size() for f in jitted]
    router.generate(["A big red ball", "She said"], max_new_tokens=20)
    router.generate(["A big red ball", "She said"], max_new_tokens=20,
                    sampling=SamplingConfig(temperature=1.0, top_k=5, seed=9))
    assert [f._cache_size() for f in jitted] == before


def test_shared_between_threads(router):
    prompts = ["The dog", "Once upon a time", "Lily went", "The cat"]
    want = {p: router.generate(p, max_new_tokens=10).token_ids for p in prompts}
    got, before = {}, router.metrics["requests"]

    def work(p):
        got[p] = router.generate(p, max_new_tokens=10).token_ids

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want and router.metrics["requests"] == before + len(prompts)


def test_budget_is_checked_at_load():
    with pytest.raises(ValueError, match=r"over\); nothing smaller in one change fits"):
        Cascade.load(budget="1MB")
    fits = Cascade.load(budget="96MB", ctx=256, batch=2)
    plan = fits.plan(ctx=256, batch=2)
    assert plan.total < 96_000_000 and {m.role for m in plan.models} == {"small", "large"}
    assert isinstance(fits.pair, type(load_pair(None, "default-large")))


def test_a_stream_left_open_blocks_no_other_call(default_pair):
    """A stream holds the router's lock only for each piece of decoding, not between its yields:
    the thread reading it (or any other) can generate meanwhile, and the stream then finishes with
    the text it would have given alone (issue 38: this hung forever).  Run in a daemon thread with
    a timeout, so a deadlock fails the test instead of hanging the suite."""
    router = Cascade(default_pair)
    want_cat = router.generate("The cat", max_new_tokens=32).text
    want_dog = router.generate("The dog", max_new_tokens=4).text
    got = {}

    def work():
        s = router.stream("The cat", max_new_tokens=32)
        first = next(s)
        got["dog"] = router.generate("The dog", max_new_tokens=4).text  # the same thread, the stream open
        other = threading.Thread(target=lambda: got.setdefault("other", router.generate("The dog", max_new_tokens=4).text))
        other.start()
        other.join()
        got["cat"] = first + "".join(s)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "a call while a stream was open deadlocked"
    assert got == {"dog": want_dog, "other": want_dog, "cat": want_cat}


def test_budget_suggestions_are_keywords_of_load_that_fit(monkeypatch):
    """Over budget, Cascade.load names its own keywords (not CLI flags), each of which, passed back
    to Cascade.load, passes the budget check; a budget that is not a positive size is a clear
    ValueError before anything is planned."""
    import ast
    import re

    import cascade.router as router_mod

    loaded = []
    monkeypatch.setattr(router_mod, "load_pair", lambda *a, **k: loaded.append(k) or "pair")
    with pytest.raises(ValueError) as e:
        Cascade.load(budget="310MB", ctx=512, batch=8)
    msg = str(e.value)
    suggestions = re.findall(r"(\w+)=('[^']*'|\d+) \(", msg.split("would fit:")[1])
    assert {name for name, _ in suggestions} >= {"kv", "batch", "ctx"} and "--" not in msg
    for name, value in suggestions:
        fits = Cascade.load(**{"budget": "310MB", "ctx": 512, "batch": 8, name: ast.literal_eval(value)})
        assert fits.pair == "pair"  # the budget check passed and the (stubbed) loading ran
    for bad, why in ((-5, "must be positive"), (0, "must be positive"), ("0.5", "at least 1 byte"),
                     ("lots", "cannot read 'lots' as a size")):
        with pytest.raises(ValueError, match=why):
            Cascade.load(budget=bad)
    assert len(loaded) == len(suggestions)
