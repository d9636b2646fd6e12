"""`cascade serve`: an OpenAI-compatible HTTP server over the cascade.

Three parts, data flowing one way:

* :class:`Engine`: one thread that owns the device work.  Requests wait in a bounded queue; the
  engine keeps one running :class:`cascade.batching.SlotBatch` of up to ``max_batch`` rows, and at
  every step (or speculative round) boundary it drops rows whose client went away, admits waiting
  requests of the same kind into free slots (continuous batching: each row its own length and
  stop), runs one step, and hands each request its new text.  Requests of another kind (another
  mode or sampling setting, which the jitted step shares across its rows) wait until the running
  batch drains; a sampled request with a ``seed`` runs in a batch of its own so that its draw is
  reproducible; ``defer`` runs whole, one request at a time.
* :class:`Metrics`: counters and histograms under vLLM's metric names, in Prometheus' text format.
* :func:`create_app`: the Starlette application: ``POST /v1/completions``,
  ``POST /v1/chat/completions`` (streaming as server-sent events), ``GET /v1/models``,
  ``GET /health``, ``GET /metrics``.  Bad input is an OpenAI-style error (400/401/404/429), never
  a 500, and never stops the engine.

:func:`serve` runs it under uvicorn; SIGTERM drains: no new connections, running requests finish
(those still running after ``drain_timeout`` end with an error), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import dataclasses
import json
import math
import secrets
import signal
import threading
import time
import uuid

from cascade.batching import JOINABLE, SlotBatch, room_for
from cascade.models.sampling import SamplingConfig

MODES = ("speculative", "spec-cascade", "defer", "large", "small")
RULES = ("chow", "diff", "opt")
# OpenAI request fields this server does not implement: refused (400) when given a non-default value
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None,), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
               "functions": (None, []), "response_format": (None, {"type": "text"}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)}
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class BadRequest(ValueError):
    """A request the server refuses: its HTTP status, and OpenAI's error type, param and code."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------- metrics


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1


class Metrics:
    """What ``GET /metrics`` reports, under vLLM's names (``vllm:...``) so existing dashboards read
    it; thread-safe."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.lock = threading.Lock()
        self.counters = collections.Counter()
        self.finished = collections.Counter()  # by finish reason
        self.rejected = collections.Counter()  # by HTTP status
        self.ttft, self.tpot, self.e2e = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS), Histogram(E2E_BUCKETS)
        self.gauges = {"running": 0, "waiting": 0}

    def add(self, **counts) -> None:
        with self.lock:
            self.counters.update(counts)

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            getattr(self, name).observe(value)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        escaped = self.model_id.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        label = f'model_name="{escaped}"'
        out = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for suffix, labels, value in samples:
                out.append(f"{name}{suffix}{{{labels}}} {value:.6g}" if isinstance(value, float) else
                           f"{name}{suffix}{{{labels}}} {value}")

        def histogram(name, help_, h: Histogram):
            samples = [("_bucket", f'{label},le="{b}"', c) for b, c in zip(h.buckets, h.counts)]
            samples += [("_bucket", f'{label},le="+Inf"', h.count), ("_sum", label, float(h.sum)), ("_count", label, h.count)]
            metric(name, "histogram", help_, samples)

        with self.lock:
            c = self.counters
            metric("vllm:num_requests_running", "gauge", "Requests in the running batch.",
                   [("", label, self.gauges["running"])])
            metric("vllm:num_requests_waiting", "gauge", "Requests waiting in the queue.",
                   [("", label, self.gauges["waiting"])])
            metric("vllm:request_success_total", "counter", "Requests finished, by finish reason.",
                   [("", f'{label},finished_reason="{r}"', n) for r, n in sorted(self.finished.items())] or
                   [("", f'{label},finished_reason="stop"', 0)])
            metric("cascade:requests_total", "counter", "Requests received on the generation endpoints.",
                   [("", label, c["requests"])])
            metric("cascade:requests_rejected_total", "counter", "Requests answered with an error, by HTTP status.",
                   [("", f'{label},status="{s}"', n) for s, n in sorted(self.rejected.items())] or
                   [("", f'{label},status="400"', 0)])
            metric("cascade:requests_cancelled_total", "counter", "Requests whose client went away before the end.",
                   [("", label, c["cancelled"])])
            metric("vllm:prompt_tokens_total", "counter", "Prompt tokens processed.", [("", label, c["prompt_tokens"])])
            metric("vllm:generation_tokens_total", "counter", "Tokens generated.", [("", label, c["generation_tokens"])])
            histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first token.", self.ttft)
            histogram("vllm:time_per_output_token_seconds", "Time per token after the first.", self.tpot)
            histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token.", self.e2e)
            metric("vllm:spec_decode_num_draft_tokens_total", "counter", "Tokens the draft proposed.",
                   [("", label, c["draft_tokens"])])
            metric("vllm:spec_decode_num_accepted_tokens_total", "counter", "Proposed tokens the verifier accepted.",
                   [("", label, c["accepted_tokens"])])
            rate = c["accepted_tokens"] / c["draft_tokens"] if c["draft_tokens"] else 0.0
            metric("vllm:spec_decode_draft_acceptance_rate", "gauge", "Accepted over proposed tokens.",
                   [("", label, float(rate))])
        return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------------- engine


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request as the engine sees it; events go to ``queue`` on ``loop``:
    ``("text", str)``, ``("done", dict)`` or ``("error", BadRequest)``."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    settings: dict  # mode and the cascade settings of this request
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: str = ""  # text already handed out
    seeded: bool = False  # a sampled request with its own seed: a batch of its own, reproducible
    first_at: float | None = None
    last_at: float | None = None
    done: bool = False

    @property
    def mode(self) -> str:
        return self.settings["mode"]

    def batch_key(self) -> tuple:
        """Requests with equal keys share a running batch: what the jitted step takes (the mode, its
        sampling setting, and only the settings that mode reads)."""
        s, st = self.sampling, self.settings
        sampling = (0.0, 0, 1.0) if s.greedy else (s.temperature, s.top_k, s.top_p)
        mode = st["mode"]
        used = {"large": ("large_kv",), "small": ("small_kv",), "speculative": ("draft_len", "draft_confidence"),
                "spec-cascade": ("draft_len", "draft_confidence", "rule", "alpha")}.get(mode, ())
        if mode in ("speculative", "spec-cascade"):
            used += ("small_kv", "large_kv")
        own = self.id if self.seeded else None
        return (mode, sampling, tuple((k, st.get(k)) for k in used), own)

    def emit(self, kind: str, value) -> None:
        if not self.cancelled:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is closed (after the shutdown): nobody is listening
                pass


class QueueFull(Exception):
    pass


class Engine:
    """The serving loop (module docs) over a loaded :class:`cascade.Cascade`."""

    def __init__(self, router, *, max_batch: int = 8, max_queue: int = 64, ctx: int, metrics: Metrics):
        self.router, self.pair, self.tokenizer = router, router.pair, router.pair.tokenizer
        self.max_batch, self.max_queue, self.ctx, self.metrics = max_batch, max_queue, ctx, metrics
        from cascade.models.generation import eos_ids

        self.eos = eos_ids(self.tokenizer, (self.pair.large or self.pair.small).config)
        self.waiting: collections.deque[Request] = collections.deque()
        self.cv = threading.Condition()
        self.batch: SlotBatch | None = None
        self.batch_key = None
        self.slots: dict[int, Request] = {}
        self.stopping = False
        self.draining = False
        self.fail_message: str | None = None  # set by fail_all: end everything at the next boundary
        self.fail_pending = False
        self.thread = threading.Thread(target=self._run, name="cascade-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def warmup(self, settings: dict) -> None:
        """Compile the programs of ``settings``' mode before serving: a one-token prompt and a few
        steps at every batch size the engine uses (1, 2, 4, ... up to --max-batch), grown into."""
        from cascade.models.sampling import SamplingConfig

        batch = SlotBatch(self.pair, settings["mode"], slots=1, ctx=self.ctx, sampling=SamplingConfig(), eos=(),
                          **{k: v for k, v in settings.items() if k != "mode"})
        ids = self.tokenizer.encode("a")
        n = min(3, max(1, batch.room_for(len(ids))))
        while True:
            slot, _ = batch.add(ids, n)
            while batch.rows[slot].stop is None:
                batch.step()
            batch.remove(slot)
            if batch.slots >= self.max_batch:
                break
            batch.grow(_slots_for(batch.slots + 1, self.max_batch))
        self.batch, self.batch_key = None, None

    def stop(self, timeout: float = 10.0) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join(timeout)

    def fail_all(self, message: str) -> None:
        """End every waiting and running request with an error (a drain that timed out), at the
        engine's next boundary (any thread may call this)."""
        with self.cv:
            self.fail_message, self.fail_pending = message, True
            self.cv.notify_all()

    def _fail_everything(self) -> None:
        error = BadRequest(self.fail_message, status=503, type="server_error", code="shutting_down")
        with self.cv:
            waiting, self.waiting, self.fail_pending = list(self.waiting), collections.deque(), False
        for req in waiting + list(self.slots.values()):
            req.emit("error", error)
            req.cancelled = True
        for slot in list(self.slots):
            self.batch.remove(slot)
        self.slots.clear()
        self._gauges()

    # ------------------------------------------------------------------------------ admission

    def room_for(self, n_prompt: int, settings: dict) -> int:
        """The most new tokens a prompt of ``n_prompt`` tokens may ask for under ``settings``."""
        from cascade.speculative import draft_setting

        k = draft_setting(settings["draft_len"], settings.get("draft_confidence"))[0] \
            if settings["mode"] in ("speculative", "spec-cascade") else 0
        return room_for(self.ctx, n_prompt, settings["mode"], k)

    def submit(self, req: Request) -> None:
        with self.cv:
            if self.draining or self.stopping:
                raise BadRequest("the server is shutting down", status=503, type="server_error", code="shutting_down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull()
            self.waiting.append(req)
            self.metrics.gauges["waiting"] = len(self.waiting)
            self.cv.notify_all()

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.waiting and not self.slots and not self.fail_pending:
                    self.cv.wait(0.5)
                if self.stopping and not self.slots and not self.waiting:
                    return
                if self.stopping:  # stop() after the drain: nobody is listening any more
                    for req in list(self.waiting) + list(self.slots.values()):
                        req.cancelled = True
            try:
                if self.fail_pending:
                    self._fail_everything()
                    continue
                self._drop_cancelled()
                self._admit()
                if self.slots:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests, never the server
                self._fail_running(f"generation failed: {type(e).__name__}: {e}")

    def _fail_running(self, message: str) -> None:
        for slot, req in list(self.slots.items()):
            req.emit("error", BadRequest(message, status=500, type="server_error"))
            self.slots.pop(slot)
        self.batch = None  # its state may be half-updated: start afresh
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.gauges["running"] = len(self.slots)
        self.metrics.gauges["waiting"] = len(self.waiting)

    def _drop_cancelled(self) -> None:
        with self.cv:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        for slot, req in list(self.slots.items()):
            if req.cancelled:
                self.batch.remove(slot)
                self.slots.pop(slot)
                gone.append(req)
        if gone:
            self.metrics.add(cancelled=len(gone))
        self._gauges()

    def _admit(self) -> None:
        with self.cv:
            if not self.waiting:
                return
            head = self.waiting[0]
            start = not self.slots  # an idle engine takes the next request's kind
            whole = self.waiting.popleft() if start and head.mode not in JOINABLE else None
            self._gauges()
        if whole is not None:
            self._run_whole(whole)
            return
        key = head.batch_key()
        if start:  # as many slots as the waiting requests of this kind need (a power of two), up to --max-batch
            with self.cv:
                same = sum(1 for r in itertools.islice(self.waiting, self.max_batch) if r.batch_key() == key)
            size = 1 if head.seeded else _slots_for(same, self.max_batch)
        if start and (self.batch is None or self.batch_key != key or self.batch.slots != size):
            self.batch, self.batch_key = None, None  # free the old caches before allocating the new ones
            try:
                self.batch = SlotBatch(self.pair, head.mode, slots=size, ctx=self.ctx,
                                       sampling=head.sampling, eos=self.eos,
                                       **{k: v for k, v in head.settings.items() if k != "mode"})
            except Exception as e:  # noqa: BLE001 - this request's batch cannot be built: fail it, serve the rest
                with self.cv:
                    if self.waiting and self.waiting[0] is head:
                        self.waiting.popleft()
                    self._gauges()
                head.emit("error", _failure(e))
                return
            self.batch_key = head.batch_key()
        with self.cv:
            same = 0
            for r in self.waiting:
                if r.batch_key() != self.batch_key:
                    break
                same += 1
        if same > self.batch.free() and self.batch.slots < self.max_batch and self.batch_key[-1] is None:
            self.batch.grow(_slots_for(self.batch.live + same, self.max_batch))
        with self.cv:
            joining = []
            while self.waiting and self.waiting[0].batch_key() == self.batch_key and len(joining) < self.batch.free():
                joining.append(self.waiting.popleft())
            self._gauges()
        for i, req in enumerate(joining):
            try:
                slot, first = self.batch.add(req.prompt_ids, req.max_tokens)
            except Exception as e:  # noqa: BLE001 - a ValueError is this request's; anything else ends the batch
                req.emit("error", _failure(e))
                if isinstance(e, ValueError):
                    continue
                for later in joining[i + 1:]:
                    later.emit("error", _failure(e))
                raise
            self.slots[slot] = req
            self.metrics.add(prompt_tokens=len(req.prompt_ids))
            self._deliver(slot, req, first)
        self._gauges()

    def _run_whole(self, req: Request) -> None:
        """A request of a mode that does not join a batch (defer): generated whole."""
        from cascade.pair import RowError, generate_batch

        try:
            (r,) = generate_batch(self.pair, [req.prompt_ids], max_new_tokens=req.max_tokens, sampling=req.sampling,
                                  **req.settings)
        except Exception as e:  # noqa: BLE001 - this request fails, the server goes on
            req.emit("error", _failure(e))
            return
        if isinstance(r, RowError):
            req.emit("error", BadRequest(r.error))
            return
        self.metrics.add(prompt_tokens=len(req.prompt_ids))
        cascade_info = {"mode": "defer", "answered_by": r.answered_by}
        if r.deferral is not None:
            cascade_info["deferred"] = bool(r.deferral.deferred)
            cascade_info["score"] = r.deferral.score
        self._deliver(None, req, list(r.token_ids), finish=r.stop_reason, extra=cascade_info)

    # ---------------------------------------------------------------------------------- steps

    def _step(self) -> None:
        emitted = self.batch.step()
        for slot, toks in emitted.items():
            req = self.slots.get(slot)
            if req is not None:
                self._deliver(slot, req, toks)

    def _completion_text(self, req: Request) -> str:
        """The text of ``req``'s tokens after its prompt, decoded with only the prompt's last tokens
        before them (what the spacing of the first piece depends on), not the whole prompt again at
        every step; the whole prompt where that does not give the same beginning."""
        tail = req.prompt_ids[-8:]
        base = self.tokenizer.decode(tail)
        full = self.tokenizer.decode(tail + req.tokens)
        if full.startswith(base) and not base.endswith("\ufffd"):
            return full[len(base):]
        return self.tokenizer.decode_completion(req.prompt_ids, req.tokens)

    def _deliver(self, slot, req: Request, toks: list[int], finish: str | None = None, extra: dict | None = None) -> None:
        """Hand ``req`` its new text (holding back what may be the start of a stop sequence); finish it
        at a stop sequence, EOS or max_tokens."""
        now = time.perf_counter()
        if toks:
            if req.first_at is None:
                req.first_at = now
                self.metrics.observe("ttft", now - req.arrived)
            else:
                per = (now - req.last_at) / len(toks)
                for _ in toks:
                    self.metrics.observe("tpot", per)
            req.last_at = now
            req.tokens += toks
            self.metrics.add(generation_tokens=len(toks))
        row = self.batch.rows[slot] if slot is not None else None
        if finish is None and row is not None and row.stop is not None:
            finish = row.stop
        text = self._completion_text(req)
        stopped = False
        if req.stop:
            hits = [text.find(s, max(0, len(req.sent) - len(s))) for s in req.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                text, stopped = text[:min(hits)], True
        if stopped or finish is not None:
            final = text
        else:
            if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
                return
            held = max((n for s in req.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
            final = text[:len(text) - held] if held else text
        if final.startswith(req.sent) and len(final) > len(req.sent):
            req.emit("text", final[len(req.sent):])
            req.sent = final
        if not (stopped or finish is not None):
            return
        reason = "stop" if stopped or finish == "eos" else "length"
        if slot is not None:
            self.batch.remove(slot)
            self.slots.pop(slot, None)
        info = dict(extra or {})
        if row is not None:
            info.setdefault("mode", req.mode)
            info.setdefault("answered_by", {"speculative": "large", "spec-cascade": "both"}.get(req.mode, req.mode))
            st = row.stats
            if st is not None:
                info["draft_tokens"], info["accepted_tokens"] = st.draft_tokens, st.accepted_tokens
                info["acceptance_rate"] = round(st.accepted_tokens / st.draft_tokens, 4) if st.draft_tokens else None
                info["mean_acceptance_length"] = round(st.accepted_tokens / st.rounds, 4) if st.rounds else None
                if req.mode == "spec-cascade":
                    info["deferral_rate"] = round(st.deferred_tokens / st.judged_tokens, 4) if st.judged_tokens else None
                self.metrics.add(draft_tokens=st.draft_tokens, accepted_tokens=st.accepted_tokens)
        with self.metrics.lock:
            self.metrics.finished[reason] += 1
        self.metrics.observe("e2e", now - req.arrived)
        req.done = True
        req.emit("done", {"finish_reason": reason, "text": final, "prompt_tokens": len(req.prompt_ids),
                          "completion_tokens": len(req.tokens), "cascade": info})
        self._gauges()


def _slots_for(rows: int, most: int) -> int:
    """The batch size for ``rows`` rows: the next power of two, at most ``most``."""
    return min(most, 1 << max(0, rows - 1).bit_length())


def _failure(e: Exception) -> BadRequest:
    """The error a request gets when the engine fails on it: a 400 for what it asked (a ValueError),
    a 500 (the server's fault, said as such) otherwise."""
    if isinstance(e, ValueError):
        return BadRequest(str(e))
    return BadRequest(f"generation failed: {type(e).__name__}: {e}", status=500, type="server_error")


# ---------------------------------------------------------------------------------- HTTP layer


def _number(body, name, default, *, lo=None, hi=None, lo_open=False, integer=False, allow_none=True):
    value = body.get(name, default)
    if value is None:
        if not allow_none:
            raise BadRequest(f"'{name}' must not be null", param=name)
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:40]}",
                         param=name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise BadRequest(f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {value}", param=name)
    if hi is not None and value > hi:
        raise BadRequest(f"'{name}' must be <= {hi}, got {value}", param=name)
    return value


def _choice(body, name, default, choices):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        raise BadRequest(f"'{name}' must be one of {', '.join(choices)}, got {json.dumps(value)[:40]}", param=name)
    return value


def _stop_list(body) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or a list of up to 4 strings", param="stop")
    if any(s == "" for s in stop):
        raise BadRequest("'stop' sequences must not be empty", param="stop")
    return stop


class Api:
    """The request handling of the HTTP layer: parsing and checking bodies, and turning engine events
    into OpenAI responses."""

    def __init__(self, engine: Engine, *, model_id: str, defaults: dict, chat: bool):
        self.engine, self.model_id, self.defaults, self.chat_template = engine, model_id, defaults, chat
        self.tokenizer = engine.tokenizer

    def settings(self, body: dict) -> dict:
        """The request's mode and cascade settings (extra body fields over the server's defaults)."""
        d = self.defaults
        mode = _choice(body, "mode", d["mode"], MODES)
        pair = self.engine.pair
        if mode in ("speculative", "spec-cascade", "defer") and (pair.small is None or pair.large is None):
            raise BadRequest(f"mode {mode!r} needs both models; this server runs --mode {d['mode']}", param="mode")
        if mode == "large" and pair.large is None or mode == "small" and pair.small is None:
            raise BadRequest(f"mode {mode!r} needs the {mode} model, which this server did not load", param="mode")
        draft_len = body.get("draft_len")
        if draft_len is None:
            draft_len = d["draft_len"]  # the server's own (--draft-len), checked by the command line
        elif draft_len != "auto":
            draft_len = _number(body, "draft_len", None, lo=1, hi=32, integer=True)
        return {"mode": mode, "draft_len": draft_len, "draft_confidence": d.get("draft_confidence"),
                "rule": _choice(body, "rule", d["rule"], RULES),
                "alpha": float(_number(body, "alpha", d["alpha"], lo=0, hi=1)),
                "threshold": float(_number(body, "threshold", d["threshold"], lo=-1e9, hi=1e9)),
                "defer_score": d["defer_score"], "small_kv": d["small_kv"], "large_kv": d["large_kv"]}

    def parse(self, body, chat: bool) -> Request:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest("'model' must be a string", param="model")
        if model is not None and model != self.model_id:
            raise BadRequest(f"The model '{model}' does not exist; this server runs '{self.model_id}'", status=404,
                             param="model", code="model_not_found")
        for name, allowed in UNSUPPORTED.items():
            if name in body and body[name] not in allowed:
                raise BadRequest(f"'{name}' is not supported by this server", param=name)
        n = body.get("n", 1)
        if n is not None and (isinstance(n, bool) or n != 1):
            raise BadRequest("only n = 1 is supported", param="n")
        if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
            raise BadRequest("'stream' must be a boolean", param="stream")
        ids = self._prompt_ids(body, chat)
        settings = self.settings(body)
        room = self.engine.room_for(len(ids), settings)
        default_max = 16 if not chat else max(1, room)
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, default_max, lo=1, integer=True)
        if max_tokens > room:
            raise BadRequest(f"This model's maximum context length is {self.engine.ctx} tokens. However, you requested "
                             f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the "
                             f"completion). Please reduce the length of the messages or completion.",
                             param="messages" if chat else "prompt", code="context_length_exceeded")
        temperature = float(_number(body, "temperature", 1.0, lo=0, hi=2))
        top_p = float(_number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True))
        vocab = (self.engine.pair.large or self.engine.pair.small).config.vocab_size
        top_k = _number(body, "top_k", 0, lo=0, hi=vocab, integer=True)
        seed = _number(body, "seed", None, lo=-(2 ** 63), hi=2 ** 64 - 1, integer=True)
        greedy = temperature == 0
        sampling = SamplingConfig(temperature=temperature, top_k=0 if greedy else top_k, top_p=1.0 if greedy else top_p,
                                  seed=secrets.randbits(63) if seed is None else seed % (2 ** 63))
        loop = asyncio.get_running_loop()
        return Request(prompt_ids=ids, max_tokens=max_tokens, sampling=sampling, settings=settings,
                       stop=_stop_list(body), loop=loop, queue=asyncio.Queue(), seeded=seed is not None and not greedy)

    def _prompt_ids(self, body, chat: bool) -> list[int]:
        tok = self.tokenizer
        vocab = (self.engine.pair.large or self.engine.pair.small).config.vocab_size
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty list", param="messages")
            clean = []
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                    raise BadRequest(f"messages[{i}] must be an object with role system, user or assistant",
                                     param="messages")
                content = m.get("content")
                if isinstance(content, list):  # OpenAI's content parts: text only
                    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                               for p in content):
                        raise BadRequest(f"messages[{i}].content: only text parts are supported", param="messages")
                    content = "".join(p["text"] for p in content)
                if not isinstance(content, str):
                    raise BadRequest(f"messages[{i}].content must be a string", param="messages")
                clean.append({"role": m["role"], "content": content})
            if self.chat_template:
                try:
                    text = tok.apply_chat_template(clean, add_generation_prompt=True)
                except ValueError as e:
                    raise BadRequest(str(e), param="messages") from None
                ids = tok.encode(text, add_bos=False)
            else:  # a model without a template (the default pair): the turns as plain text
                text = "\n\n".join(m["content"] for m in clean)
                ids = tok.encode(text)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, str):
                if not prompt:
                    raise BadRequest("'prompt' must not be empty", param="prompt")
                ids = tok.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt):
                if not all(0 <= t < vocab for t in prompt):
                    raise BadRequest(f"'prompt' token ids must be in [0, {vocab})", param="prompt")
                ids = list(prompt)
            else:
                raise BadRequest("'prompt' must be a string, a list of token ids, or a list of one of those "
                                 "(one prompt per request)", param="prompt")
        if not ids:
            raise BadRequest("the prompt encodes to no tokens", param="messages" if chat else "prompt")
        return ids

    def response(self, req: Request, done: dict, chat: bool, created: int) -> dict:
        usage = {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                 "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done["text"]},
                      "logprobs": None, "finish_reason": done["finish_reason"]}
            return {"id": f"chatcmpl-{req.id}", "object": "chat.completion", "created": created, "model": self.model_id,
                    "choices": [choice], "usage": usage, "cascade": done["cascade"]}
        choice = {"index": 0, "text": done["text"], "logprobs": None, "finish_reason": done["finish_reason"]}
        return {"id": f"cmpl-{req.id}", "object": "text_completion", "created": created, "model": self.model_id,
                "choices": [choice], "usage": usage, "cascade": done["cascade"]}

    def chunk(self, req: Request, chat: bool, created: int, text: str | None, finish: str | None = None,
              first: bool = False, extra: dict | None = None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = {"id": f"chatcmpl-{req.id}", "object": "chat.completion.chunk", "created": created,
                   "model": self.model_id, "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {"id": f"cmpl-{req.id}", "object": "text_completion", "created": created, "model": self.model_id,
                   "choices": [choice]}
        return {**out, **(extra or {})}


def create_app(engine: Engine, *, model_id: str, defaults: dict, chat_template: bool, api_key: str | None = None):
    """The Starlette application over a started :class:`Engine` (module docs)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    api = Api(engine, model_id=model_id, defaults=defaults, chat=chat_template)
    metrics = engine.metrics

    def error(e: BadRequest):
        with metrics.lock:
            metrics.rejected[str(e.status)] += 1
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def authorized(request) -> BadRequest | None:
        if api_key is None:
            return None
        if not secrets.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {api_key}".encode()):
            return BadRequest("Incorrect API key provided.", status=401, code="invalid_api_key")
        return None

    async def generate(request, chat: bool):
        denied = authorized(request)
        if denied:
            return error(denied)
        metrics.add(requests=1)
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, huge integers, deep nesting
                raise BadRequest("the request body is not valid JSON") from None
            try:
                req = api.parse(body, chat)
            except BadRequest:
                raise
            except Exception as e:  # noqa: BLE001 - a value no check above foresaw: still the request's fault
                raise BadRequest(f"could not read the request: {type(e).__name__}: {e}") from None
            stream = bool(body.get("stream"))
            include_usage = stream and isinstance(body.get("stream_options"), dict) and \
                bool(body["stream_options"].get("include_usage"))
            try:
                engine.submit(req)
            except QueueFull:
                raise BadRequest(f"the queue is full ({engine.max_queue} requests waiting); retry later", status=429,
                                 type="rate_limit_error", code="queue_full") from None
        except BadRequest as e:
            return error(e)
        created = int(time.time())
        if stream:
            return StreamingResponse(_sse(req, chat, created, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_watch_disconnect(request, req))
        try:
            while True:
                kind, value = await req.queue.get()
                if kind == "done":
                    return JSONResponse(api.response(req, value, chat, created))
                if kind == "error":
                    return error(value)
                if kind == "gone":  # the client went away: nobody reads this
                    return Response(status_code=499)
        finally:
            watcher.cancel()
            if not req.done:
                req.cancelled = True

    async def _watch_disconnect(request, req: Request):
        while not req.done:
            if await request.is_disconnected():
                req.cancelled = True
                req.queue.put_nowait(("gone", None))  # ends the handler (the engine says nothing more)
                with engine.cv:
                    engine.cv.notify_all()
                return
            await asyncio.sleep(0.05)

    async def _sse(req: Request, chat: bool, created: int, include_usage: bool):
        first = True
        try:
            while True:
                kind, value = await req.queue.get()
                if kind == "text":
                    yield _event(api.chunk(req, chat, created, value, first=first))
                    first = False
                elif kind == "done":
                    if first and chat:  # an empty answer still opens the assistant's turn
                        yield _event(api.chunk(req, chat, created, "", first=True))
                    yield _event(api.chunk(req, chat, created, None, finish=value["finish_reason"],
                                           extra={"cascade": value["cascade"]}))
                    if include_usage:
                        usage = {"prompt_tokens": value["prompt_tokens"], "completion_tokens": value["completion_tokens"],
                                 "total_tokens": value["prompt_tokens"] + value["completion_tokens"]}
                        out = api.chunk(req, chat, created, None)
                        yield _event({**out, "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                    return
                else:  # an error after the stream began: OpenAI's error object as an event
                    yield _event(value.body())
                    yield "data: [DONE]\n\n"
                    return
        finally:  # the client went away (the generator is closed) or the answer is complete
            if not req.done:
                req.cancelled = True
                with engine.cv:
                    engine.cv.notify_all()

    async def completions(request):
        return await generate(request, chat=False)

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def models(request):
        denied = authorized(request)
        if denied:
            return error(denied)
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                         "owned_by": "cascade"}]})

    async def health(request):
        if engine.draining or engine.stopping:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "running": len(engine.slots), "waiting": len(engine.waiting)})

    async def metrics_text(request):
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def not_found(request, exc):
        return error(BadRequest(f"no route {request.method} {request.url.path}", status=exc.status_code))

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics_text, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------- running


def make_server(router, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
                ctx: int, model_id: str, defaults: dict, chat_template: bool, api_key: str | None = None,
                drain_timeout: float = 30.0, ready=None, log_level: str = "warning", warmup: bool = True):
    """The uvicorn server and its started :class:`Engine` (module docs); ``ready(url)`` is called once
    it listens.  ``warmup``: compile the default mode's programs first (one short generation), so
    the first client does not wait for them."""
    import uvicorn

    engine = Engine(router, max_batch=max_batch, max_queue=max_queue, ctx=ctx, metrics=Metrics(model_id))
    if warmup and defaults["mode"] in JOINABLE:
        engine.warmup(defaults)
    engine.start()
    app = create_app(engine, model_id=model_id, defaults=defaults, chat_template=chat_template, api_key=api_key)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: drain, then fail what is left after the timeout
            if not engine.draining:
                engine.draining = True
                timer = threading.Timer(drain_timeout, engine.fail_all,
                                        args=(f"the server is shutting down (drain timeout {drain_timeout:g} s)",))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            """SIGTERM/SIGINT drain (handle_exit) and the process then exits 0: uvicorn's own version
            re-raises the signal after the shutdown, which would kill the process with it."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and ready is not None:
                bound = self.servers[0].sockets[0].getsockname() if self.servers else (host, port)
                ready(f"http://{host}:{bound[1]}")

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=drain_timeout + 5, lifespan="off")
    return Server(config), engine


def serve(router, **kwargs) -> None:
    """Run the server until SIGTERM/SIGINT (module docs); ``kwargs`` as :func:`make_server`."""
    server, engine = make_server(router, **kwargs)
    try:
        server.run()
    finally:
        engine.stop()


class ServerThread:
    """The server in a thread of this process (tests and ``cascade bench serve``): ``url``, ``engine``,
    :meth:`stop`."""

    def __init__(self, router, *, port: int = 0, **kwargs):
        self.url = None
        started = threading.Event()

        def ready(url):
            self.url = url
            started.set()

        self.server, self.engine = make_server(router, port=port, ready=ready, **kwargs)
        self.thread = threading.Thread(target=self.server.run, name="cascade-http", daemon=True)
        self.thread.start()
        if not started.wait(60):
            raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop()
