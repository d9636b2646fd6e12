"""`cascade serve` (cascade/server.py): a live server on 127.0.0.1 (a free port, in a thread of this
process) over the default pair, driven by the official `openai` client and by raw HTTP.

Greedy answers are compared with cascade.pair.generate_batch of the same prompt alone (what
`cascade run` prints); concurrency, queue overflow, client disconnects, authentication, a fuzz of
request bodies, the budget refusal at start and the SIGTERM drain (a `cascade serve` subprocess)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade import Cascade
from cascade.pair import generate_batch
from cascade.server import ServerThread

DEFAULTS = {"mode": "speculative", "draft_len": 3, "draft_confidence": None, "rule": "chow", "alpha": 0.1,
            "threshold": -1.0, "defer_score": "mean-logprob", "small_kv": None, "large_kv": None}
# a small chat template (the default pair has none): exercises the template path of chat requests
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"


@pytest.fixture(scope="module")
def router():
    r = Cascade.load(ctx=256)
    r.pair.tokenizer.chat_template = TEMPLATE
    return r


@pytest.fixture(scope="module")
def server(router):
    s = ServerThread(router, max_batch=4, max_queue=64, ctx=256, model_id="default", defaults=DEFAULTS,
                     chat_template=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _alone(router, prompt, n, mode="speculative", **settings):
    (r,) = generate_batch(router.pair, [prompt], mode=mode, max_new_tokens=n, **{"draft_len": 3, **settings})
    return r


def test_completion_equals_cascade_run_with_usage(client, router):
    r = client.completions.create(model="default", prompt="Once upon a time", max_tokens=24, temperature=0)
    want = _alone(router, "Once upon a time", 24)
    assert r.choices[0].text == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids) and r.usage.total_tokens == r.usage.prompt_tokens + 24
    assert r.choices[0].finish_reason == "length"
    extra = r.model_extra["cascade"]
    assert extra["mode"] == "speculative" and extra["answered_by"] == "large"
    assert extra["draft_tokens"] == want.stats.draft_tokens and extra["accepted_tokens"] == want.stats.accepted_tokens


def test_chat_completion_through_the_template(client, router):
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A story about a cat"}]
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=16, temperature=0)
    tok = router.pair.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages), add_bos=False)
    (want,) = generate_batch(router.pair, [ids], mode="speculative", max_new_tokens=16, draft_len=3)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(ids)
    assert r.object == "chat.completion"


def test_streaming_joins_to_the_whole_answer(client):
    whole = client.completions.create(model="default", prompt="The dog", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="default", prompt="The dog", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    chat = list(client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=8, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason == "length"


def test_the_stream_ends_with_done(server):
    body = {"prompt": "The cat", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and "cascade" in last


@pytest.mark.parametrize("mode", ["large", "small", "spec-cascade", "defer"])
def test_per_request_cascade_settings(client, router, mode):
    r = client.completions.create(model="default", prompt="Tom had a red ball", max_tokens=12, temperature=0,
                                  extra_body={"mode": mode, "alpha": 0.3, "draft_len": 2})
    want = _alone(router, "Tom had a red ball", 12, mode=mode, alpha=0.3, draft_len=2)
    assert r.choices[0].text == want.text
    extra = r.model_extra["cascade"]
    assert extra["mode"] == mode
    if mode in ("large", "small"):
        assert extra["answered_by"] == mode and "draft_tokens" not in extra
    elif mode == "spec-cascade":
        assert extra["answered_by"] == "both" and 0 <= extra["deferral_rate"] <= 1
    else:
        assert extra["answered_by"] == want.answered_by and extra["deferred"] == want.deferral.deferred


def test_stop_sequences(client, router):
    full = _alone(router, "Once upon a time", 40).text
    stop = full[full.index(".") - 3:full.index(".") + 1]  # a sequence spanning tokens, ending at the first period
    r = client.completions.create(model="default", prompt="Once upon a time", max_tokens=40, temperature=0,
                                  stop=[stop, "zzz"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="default", prompt="Once upon a time", max_tokens=40, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]


def test_seeds_reproduce_a_sampled_answer(client):
    def draw(seed):
        return client.completions.create(model="default", prompt="Once upon a time", max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text

    a, b, c = draw(7), draw(7), draw(8)
    assert a == b and a != c


def test_concurrent_requests_equal_sequential_ones(server, router):
    prompts = ["Once upon a time", "The dog", "Lily went to the park", "Tom had a red ball", "One day",
               "The sun was hot", "A little bird", "Sue and Ben"]
    want = [_alone(router, p, 16).text for p in prompts]
    got = [None] * len(prompts)

    def one(i):
        r = httpx.post(server.url + "/v1/completions", timeout=120,
                       json={"prompt": prompts[i], "max_tokens": 16, "temperature": 0})
        got[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_a_full_queue_answers_429(router):
    s = ServerThread(router, max_batch=1, max_queue=1, ctx=256, model_id="default", defaults=DEFAULTS,
                     chat_template=True, warmup=False)
    try:
        codes, retry = [], []

        def one():
            r = httpx.post(s.url + "/v1/completions", timeout=120,
                           json={"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0})
            codes.append(r.status_code)
            if r.status_code == 429:
                retry.append(r.headers.get("retry-after"))
                assert r.json()["error"]["type"] == "rate_limit_error"

        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in codes and 200 in codes and retry and all(retry)
    finally:
        s.stop()


def test_a_client_that_disconnects_frees_its_row(server):
    engine = server.engine
    before = engine.metrics.counters["cancelled"]
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    deadline = time.time() + 30
    while (engine.slots or engine.metrics.counters["cancelled"] == before) and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.slots and engine.metrics.counters["cancelled"] == before + 1


def test_a_non_streaming_client_that_disconnects_frees_its_row(server):
    engine = server.engine
    before = engine.metrics.counters["cancelled"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(30, read=0.3),
                   json={"prompt": "Once upon a time", "max_tokens": 240, "temperature": 0, "mode": "large"})
    deadline = time.time() + 30
    while (engine.slots or engine.metrics.counters["cancelled"] == before) and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.slots and engine.metrics.counters["cancelled"] == before + 1
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "The", "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200


def test_the_servers_own_draft_len_is_not_held_to_the_request_limit(server):
    """A server started with --draft-len 20 serves requests that do not name one (only a request's own
    draft_len is checked here; the command line checks the server's)."""
    from cascade.server import Api

    api = Api(server.engine, model_id="default", defaults={**DEFAULTS, "draft_len": 20}, chat=False)
    assert api.settings({})["draft_len"] == 20
    with pytest.raises(ValueError, match="<= 32"):
        api.settings({"draft_len": 33})


def test_models_health_metrics_and_errors(server):
    get = lambda path: httpx.get(server.url + path, timeout=30)  # noqa: E731
    assert get("/v1/models").json()["data"][0]["id"] == "default"
    assert get("/health").json()["status"] == "ok"
    text = get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:time_per_output_token_seconds_count", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_draft_acceptance_rate",
                 "vllm:generation_tokens_total", "vllm:prompt_tokens_total", "vllm:request_success_total"):
        assert f"\n{name}" in "\n" + text, name
    post = lambda body, path="/v1/completions": httpx.post(server.url + path, content=body, timeout=30)  # noqa: E731
    cases = [(b"{not json", 400, None), (b"[1, 2]", 400, None), (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
             (b'{"prompt": "x", "model": "gpt-4"}', 404, "model"), (b'{"prompt": "x", "n": 2}', 400, "n"),
             (b'{"prompt": "x", "temperature": "hot"}', 400, "temperature"), (b'{"prompt": ""}', 400, "prompt"),
             (b'{"prompt": ["a", "b"]}', 400, "prompt"), (b'{"prompt": "x", "mode": "fast"}', 400, "mode"),
             (b'{"prompt": "x", "logprobs": 3}', 400, "logprobs"), (b'{"prompt": [999999]}', 400, "prompt"),
             (json.dumps({"prompt": "word " * 300, "max_tokens": 10}).encode(), 400, "prompt"),
             (b'{"prompt": "x", "temperature": 1, "top_k": 3000000000}', 400, "top_k"),
             (b'{"prompt": "x", "threshold": 1' + b"0" * 400 + b"}", 400, "threshold"),
             (b'{"prompt": 1' + b"0" * 5000 + b"}", 400, None), (b"[" * 100000 + b"]" * 100000, 400, None),
             (b'{"prompt": "x", "draft_len": 0}', 400, "draft_len"), (b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
             (b'\xff\xfe', 400, None)]
    for body, status, param in cases:
        r = post(body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and err["param"] == param, (body, err)
    assert post(b'{"messages": "hi"}', "/v1/chat/completions").json()["error"]["param"] == "messages"
    assert post(b'{"messages": [{"role": "robot", "content": "x"}]}', "/v1/chat/completions").status_code == 400
    assert httpx.get(server.url + "/v2/nothing", timeout=30).status_code == 404
    long = post(json.dumps({"prompt": "word " * 300}).encode()).json()["error"]
    assert long["code"] == "context_length_exceeded" and "maximum context length is 256" in long["message"]


def test_a_taken_port_or_unknown_host_is_a_usage_error_before_loading(server, capsys):
    from cascade import cli

    port = server.url.rsplit(":", 1)[1]
    assert cli.main(["serve", "--port", port]) == 2
    assert cli.main(["serve", "--host", "no-such-host.invalid", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("cannot listen on 127.0.0.1:" + port) == 1 and "no-such-host.invalid" in err


def test_an_api_key_is_required_when_set(router):
    s = ServerThread(router, max_batch=2, ctx=256, model_id="default", defaults=DEFAULTS, chat_template=True,
                     api_key="sekret", warmup=False)
    try:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="default", prompt="x", max_tokens=2)
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="default", prompt="The", max_tokens=2, temperature=0).usage.completion_tokens == 2
        assert httpx.get(s.url + "/v1/models", timeout=30).status_code == 401
        assert httpx.get(s.url + "/health", timeout=30).status_code == 200
    finally:
        s.stop()


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=8), st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                                  st.integers(), max_size=2))
FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "model",
          "mode", "alpha", "rule", "threshold", "draft_len", "logprobs", "stream_options", "max_completion_tokens"]


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(body=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6), chat=st.booleans())
def test_fuzzed_bodies_get_a_2xx_or_an_openai_4xx(server, body, chat):
    body.setdefault("max_tokens", 2)
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 4:
        body["max_tokens"] = 4
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = httpx.post(server.url + path, content=json.dumps(body, allow_nan=True), timeout=120)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    elif body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def _cli(*args, **kwargs):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.Popen([sys.executable, "-m", "cascade.cli", *args], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.system  # another process
def test_over_budget_refuses_to_start():
    p = _cli("serve", "--budget", "100MB", "--port", "0")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    assert err.count("\n") == 1 and "over" in err and "--max-batch" in err and "Traceback" not in err


@pytest.mark.system  # another process
@pytest.mark.parametrize("drain", [60, 0])
def test_sigterm_drains_running_requests_then_exits_0(drain):
    """The running request finishes (a drain timeout it fits in), or ends with a clear 503 error (one
    it does not); either way the process exits 0."""
    p = _cli("serve", "--port", "0", "--max-batch", "2", "--ctx", "256", "--drain-timeout", str(drain))
    try:
        url = p.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), p.stderr.read()
        result = {}

        def long_request():
            result["r"] = httpx.post(url + "/v1/completions", timeout=120,
                                     json={"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
                                           "mode": "large"})

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.time() + 60
        while time.time() < deadline and "vllm:num_requests_running{model_name=\"default\"} 1" not in \
                httpx.get(url + "/metrics", timeout=30).text:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        t.join(120)
        assert p.wait(120) == 0
        r = result["r"]
        if drain == 60:
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    finally:
        p.kill()


@pytest.mark.parametrize("page", ["README.md", "docs/guides/server.md"])
def test_the_documented_client_examples_run(server, page, capsys):
    """The README's and the server guide's `openai` examples, against the live server."""
    from tests.docs_blocks import ROOT, python_block

    code = python_block(ROOT / page, "OpenAI(").replace("http://127.0.0.1:8000", server.url)
    exec(compile(code, page, "exec"), {})
    assert capsys.readouterr().out.strip()
