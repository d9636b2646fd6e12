"""`cascade bench serve`: `cascade serve` under concurrent clients, on loopback.

The server runs as `cascade serve --port 0` in a process of its own (as it would in use: its engine
does not share this process's interpreter with the clients), on 127.0.0.1; ``clients`` threads each send ``requests`` greedy requests one after another (prompts from
:data:`cascade.bench.cascade.PROMPTS`, rotated per client), non-streaming and streaming.  Every
answer is checked against the same prompt generated alone (:func:`cascade.pair.generate_batch`, what
`cascade run` prints): ``lost`` (no answer or an error), ``duplicated`` (an id seen twice) and
``garbled`` (text that differs) are counted.  Per row: tokens/s over the whole wall time, its ratio
to one client, the median and 95th percentile of the time to the first token (streaming: the first
text event; non-streaming: the whole answer) and of the request latency.  Bounded: at most
``clients x requests`` requests of ``tokens`` tokens per row.
"""

from __future__ import annotations

import statistics
import threading
import time

from cascade.bench.cascade import pair_setup


def _pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _one(url, prompt, tokens, stream, chat):
    """One request; its id, text, time to the first text, latency and completion tokens (None: lost)."""
    import json

    import httpx

    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"max_tokens": tokens, "temperature": 0, "stream": stream}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    if not stream:
        r = httpx.post(url + path, json=body, timeout=600)
        done = time.perf_counter() - t0
        if r.status_code != 200:
            return None
        data = r.json()
        choice = data["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return {"id": data["id"], "text": text, "ttft": done, "latency": done,
                "tokens": data["usage"]["completion_tokens"]}
    first, pieces, rid, finish, n_tokens = None, [], None, None, None
    with httpx.stream("POST", url + path, json=body, timeout=600) as r:
        if r.status_code != 200:
            return None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return None
            rid = event["id"]
            if event.get("usage"):
                n_tokens = event["usage"]["completion_tokens"]
            if not event["choices"]:
                continue
            choice = event["choices"][0]
            piece = (choice["delta"].get("content") if chat else choice["text"]) or ""
            if piece and first is None:
                first = time.perf_counter() - t0
            pieces.append(piece)
            finish = choice["finish_reason"] or finish
    if finish is None or n_tokens is None:
        return None
    return {"id": rid, "text": "".join(pieces), "ttft": first, "latency": time.perf_counter() - t0, "tokens": n_tokens}


class _Server:
    """`cascade serve ...` in a subprocess; ``url`` once it listens; :meth:`stop` sends SIGTERM."""

    def __init__(self, argv):
        import json
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            raise RuntimeError(f"cascade serve did not start: {err.strip().splitlines()[-1] if err.strip() else '?'}")
        self.url = json.loads(line)["url"]

    def stop(self):
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def run(small_model: str = "default-small", large_model: str = "default-large", *, pair: str | None = None,
        small_quant: str | None = None, large_quant: str | None = None, clients=(1, 8, 16), requests: int = 8,
        tokens: int = 32, max_batch: int = 8, mode: str = "speculative", draft_len: int = 4, ctx: int = 256,
        n_prompts: int = 8) -> dict:
    """Rows per (streaming, clients); see the module docs."""
    from cascade import Cascade
    from cascade.pair import generate_batch

    small, large, small_quant, large_quant, chat, prompts = pair_setup(pair, small_model, large_model, small_quant,
                                                                       large_quant)
    prompts = list(prompts[:n_prompts])
    router = Cascade.load(small, large, small_quant=small_quant, large_quant=large_quant, mode=mode, ctx=ctx)
    settings = {"draft_len": draft_len} if mode in ("speculative", "spec-cascade") else {}
    want = {p: r.text for p, r in zip(prompts, generate_batch(router.pair, prompts, mode=mode, max_new_tokens=tokens,
                                                               chat=chat, **settings))}
    for p in prompts:  # each alone as well: a batch of all of them must agree with that
        (alone,) = generate_batch(router.pair, [p], mode=mode, max_new_tokens=tokens, chat=chat, **settings)
        if alone.text != want[p]:
            raise RuntimeError(f"generate_batch disagrees with itself on {p!r}")
    del router  # the server loads its own pair
    argv = ["serve", "--port", "0", "--json", "--mode", mode, "--draft-len", str(draft_len), "--max-batch",
            str(max_batch), "--max-queue", str(max(clients) * requests), "--ctx", str(ctx), "--model-id", "bench"]
    argv += ["--pair", pair] if pair else ["--small-model", small, "--large-model", large]
    argv += ["--small", small_quant] if small_quant and not pair else []
    argv += ["--large", large_quant] if large_quant and not pair else []
    server = _Server(argv)
    rows = []
    try:
        _one(server.url, prompts[0], tokens, True, chat)  # warm both paths (prompt buckets compile on first use)
        for p in prompts:
            _one(server.url, p, tokens, False, chat)
        for stream in (False, True):
            base = None
            for c in clients:
                results, ids = [], set()
                lock = threading.Lock()

                def client(index, c=c):
                    for j in range(requests):
                        p = prompts[(index + j) % len(prompts)]
                        r = _one(server.url, p, tokens, stream, chat)
                        with lock:
                            results.append((p, r))

                t0 = time.perf_counter()
                threads = [threading.Thread(target=client, args=(i,)) for i in range(c)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                seconds = time.perf_counter() - t0
                ok = [(p, r) for p, r in results if r is not None]
                duplicated = len(ok) - len({r["id"] for _, r in ok})
                garbled = sum(r["text"] != want[p] for p, r in ok)
                counted = sum(r["tokens"] for _, r in ok)  # the server's usage counts, EOS included
                tps = counted / seconds
                base = base or tps or None
                ttft = [r["ttft"] for _, r in ok if r["ttft"] is not None]
                latency = [r["latency"] for _, r in ok]
                rows.append({"stream": stream, "clients": c, "requests": len(results), "tokens": counted,
                             "seconds": round(seconds, 3), "tokens_per_s": round(tps, 1),
                             "vs_one_client": round(tps / base, 2) if base else None,
                             "ttft_p50_s": round(statistics.median(ttft), 4) if ttft else None,
                             "ttft_p95_s": round(_pct(ttft, 0.95), 4) if ttft else None,
                             "latency_p95_s": round(_pct(latency, 0.95), 4) if latency else None,
                             "lost": len(results) - len(ok), "duplicated": duplicated, "garbled": garbled})
    finally:
        server.stop()
    from cascade.bench.context import run_context

    return {"benchmark": "serve", **run_context(warmup=1), "small": small, "large": large, "small_quant": small_quant, "large_quant": large_quant,
            "pair": pair, "mode": mode, "draft_len": draft_len, "max_batch": max_batch, "ctx": ctx, "tokens": tokens,
            "requests_per_client": requests, "prompts": len(prompts),
            "note": "tokens/s: completion tokens of all requests over the wall time; ttft: to the first text event "
                    "(streaming) or the whole answer (not streaming); every answer checked against the prompt alone",
            "rows": rows}


def table(result: dict) -> str:
    from cascade.bench.context import describe
    from cascade.bench.tables import KINDS

    head = (f"serve: {result['small']} {result['small_quant']} / {result['large']} {result['large_quant']}, "
            f"mode {result['mode']}, max batch {result['max_batch']}, {result['tokens']} tokens a request, "
            f"{result['requests_per_client']} requests a client, greedy, {describe(result)}")
    return head + "\n" + KINDS["serve"](result)
