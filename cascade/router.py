"""The cascade router an application holds for its lifetime: :class:`Cascade`.

``Cascade.load(...)`` loads and quantizes the pair once (only the model a single-model mode
needs), checks the memory plan against ``budget``, and then serves ``generate`` (a batch of
prompts, every mode), ``stream`` (text pieces as they are decoded) and ``plan``, accumulating
metrics across calls under vLLM's names where they exist.  Jitted programs are cached per shape
bucket (:mod:`cascade.models.decoder`), so calls after the first compile nothing new for prompts
and lengths in the same buckets.

Thread safety: the device work of calls is serialised by a lock, so an instance may be shared
between threads (JAX itself would allow more, the metrics would not).  ``generate`` holds it for
the whole call; ``stream`` takes it for each piece of decoding and releases it before yielding, so
other calls (from any thread, the one reading the stream included) run between its pieces and a
stream left unfinished blocks nothing.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

from cascade.memory import KEYWORDS, MemoryPlan, over_budget_message, parse_bytes, plan_from_configs, plan_memory
from cascade.models.defaults import DEFAULT_LARGE, DEFAULT_SMALL
from cascade.models.sampling import SamplingConfig
from cascade.pair import (MODES, NO_QUANT, ModelPair, RowError, RunResult, generate_batch, load_pair, resolve_quant,
                          stream_batch)


class Cascade:
    """A loaded pair and its serving settings (see the module docs); build it with :meth:`load`."""

    def __init__(self, pair: ModelPair, *, mode: str = "speculative", small_kv: str | None = None,
                 large_kv: str | None = None, draft_len: int | str = 4, rule: str = "chow", alpha: float = 0.1,
                 defer_score: str = "mean-logprob", threshold: float = -1.0, draft_confidence: float | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        self.pair = pair
        self.settings = {"mode": mode, "small_kv": small_kv, "large_kv": large_kv, "draft_len": draft_len,
                         "draft_confidence": draft_confidence, "rule": rule, "alpha": alpha,
                         "defer_score": defer_score, "threshold": threshold}
        self._lock = threading.Lock()
        self._m = {"requests": 0, "rows": 0, "failed_rows": 0, "generated_tokens": 0, "seconds": 0.0,
                   "seconds_by_model": {"small": 0.0, "large": 0.0, "both": 0.0},
                   "draft_tokens": 0, "accepted_tokens": 0, "rounds": 0, "judged_tokens": 0, "deferred_tokens": 0,
                   "deferred_rows": 0, "deferral_rows": 0, "accepted_at": [], "offered_at": []}

    @classmethod
    def load(cls, small: str | None = DEFAULT_SMALL, large: str | None = DEFAULT_LARGE, *, small_quant: str | None = None,
             large_quant: str | None = None, mode: str = "speculative", kv: str | None = None,
             small_kv: str | None = None, large_kv: str | None = None, budget: int | str | None = None,
             ctx: int | None = None, batch: int = 1, scale_dtype="float16", calib: str | None = None,
             budget_flags: dict | None = None, **settings) -> "Cascade":
        """Load the pair (``small``/``large``: built-in names or paths; a single-model ``mode`` loads
        only its model) and quantize each under its rules (``*_quant`` None: as
        :func:`cascade.pair.load_pair`, int4/int8 for a float model, an already quantized one as
        stored).  With ``budget`` (:func:`cascade.memory.parse_bytes`), the memory plan for ``batch``
        sequences of ``ctx`` positions is checked first, from the configs alone
        (:func:`cascade.memory.plan_from_configs`): over budget is a ValueError saying by how much and
        which single change of these keywords would fit, and nothing is loaded (a model kept as
        stored is counted once loaded).  ``settings``: ``draft_len`` (tokens, or ``"auto"``),
        ``draft_confidence``, ``rule``, ``alpha``, ``defer_score``, ``threshold``.  ``budget_flags``: how
        the over-budget message spells each change (default: these keywords; `cascade serve` passes
        its flags)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        small, large = (small if mode != "large" else None), (large if mode != "small" else None)
        flags = {k: v for k, v in (budget_flags or KEYWORDS).items() if not (k == "kv" and (small_kv or large_kv))}
        stored = False
        if budget is not None:  # checked from the configs, before any weight is loaded
            parse_bytes(budget)
            request = dict(small=small, large=large, small_quant=small_quant, large_quant=large_quant, ctx=ctx,
                           batch=batch, small_kv=small_kv or kv or "fp32", large_kv=large_kv or kv or "fp32",
                           draft_len=settings.get("draft_len", 4), budget=budget, scale_dtype=scale_dtype)
            stored = any(resolve_quant(src, q, role).strip().lower() in NO_QUANT
                         for role, src, q in (("small", small, small_quant), ("large", large, large_quant))
                         if src is not None)
            if not stored:
                plan = plan_from_configs(**request)
                if not plan.fits:
                    raise ValueError(over_budget_message(plan, flags=flags, **request))
        pair = load_pair(small, large, small_quant=small_quant, large_quant=large_quant, scale_dtype=scale_dtype,
                         calib=calib)
        if stored:  # a model kept as stored: its bytes are those loaded
            base = {k: request[k] for k in ("ctx", "batch", "small_kv", "large_kv", "draft_len", "budget")}
            plan = plan_memory(pair, **base)
            if not plan.fits:
                raise ValueError(over_budget_message(
                    plan, flags={k: v for k, v in flags.items() if not k.endswith("_quant")},
                    replan=lambda **change: plan_memory(pair, **{**base, **change})))
        return cls(pair, mode=mode, small_kv=small_kv or kv, large_kv=large_kv or kv, **settings)

    def plan(self, *, ctx: int | None = None, batch: int = 1, budget: int | str | None = None) -> MemoryPlan:
        """The memory plan of this pair and settings (:func:`cascade.memory.plan_memory`)."""
        s = self.settings
        return plan_memory(self.pair, ctx=ctx, batch=batch, small_kv=s["small_kv"] or "fp32",
                           large_kv=s["large_kv"] or "fp32", draft_len=s["draft_len"], budget=budget)

    def generate(self, prompts: str | list[str], *, max_new_tokens: int = 128,
                 sampling: SamplingConfig = SamplingConfig(), **overrides) -> "RunResult | list[RunResult | RowError]":
        """Generate for one prompt (returns its :class:`RunResult`; an error raises) or a list of prompts
        (returns one :class:`RunResult` or :class:`RowError` per prompt, the rows run together).
        ``overrides``: any setting of :meth:`load` for this call (``mode``, ``alpha``, ...)."""
        single = isinstance(prompts, str)
        with self._lock:
            t0 = time.perf_counter()
            results = generate_batch(self.pair, [prompts] if single else list(prompts), max_new_tokens=max_new_tokens,
                                     sampling=sampling, **{**self.settings, **overrides})
            self._record(results, time.perf_counter() - t0, overrides.get("mode", self.settings["mode"]))
        if single:
            if isinstance(results[0], RowError):
                raise ValueError(results[0].error)
            return results[0]
        return results

    def stream(self, prompt: str, *, max_new_tokens: int = 128, sampling: SamplingConfig = SamplingConfig(),
               **overrides) -> Iterator[str]:
        """Text pieces of the completion of ``prompt`` as they are decoded (after each round of a
        speculative mode, each step of a single-model mode; ``defer`` can only answer once the small
        model's answer has been scored, so it yields the answer whole).  Joined, the pieces are the
        text :meth:`generate` returns."""
        s = {**self.settings, **overrides}
        stream = stream_batch(self.pair, [prompt], max_new_tokens=max_new_tokens, sampling=sampling, **s)
        tok = self.pair.tokenizer
        ids, tokens, shown, busy = tok.encode(prompt), [], "", 0.0
        while True:
            with self._lock:  # one piece of device work; released before the piece is yielded
                t0 = time.perf_counter()
                try:
                    new = next(stream)
                except StopIteration as end:
                    (final,) = end.value
                    break
                finally:
                    busy += time.perf_counter() - t0
            tokens += new[0]
            text = tok.decode_completion(ids, tokens)
            if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
                continue
            if len(text) > len(shown) and text.startswith(shown):
                yield text[len(shown):]
                shown = text
        if isinstance(final, RowError):
            raise ValueError(final.error)
        if final.text.startswith(shown) and len(final.text) > len(shown):
            yield final.text[len(shown):]
        with self._lock:
            self._record([final], busy, s["mode"])

    def _record(self, results, seconds: float, mode: str) -> None:
        m = self._m
        m["requests"] += 1
        m["seconds"] += seconds
        by = m["seconds_by_model"]
        if mode in ("large", "small"):
            by[mode] += seconds
        elif mode == "defer":  # each model's wall time, measured around its generation (and the scoring)
            timed = next((r.seconds for r in results if isinstance(r, RunResult) and r.seconds), None)
            for role, t in (timed or {}).items():
                by[role] += t
        else:  # a speculative round runs both models in one device call: not split
            by["both"] += seconds
        for r in results:
            m["rows"] += 1
            if isinstance(r, RowError):
                m["failed_rows"] += 1
                continue
            m["generated_tokens"] += len(r.token_ids)
            if r.deferral is not None:
                m["deferral_rows"] += 1
                m["deferred_rows"] += r.deferral.deferred
            st = r.stats
            if st is not None:
                for key in ("draft_tokens", "accepted_tokens", "rounds", "judged_tokens", "deferred_tokens"):
                    m[key] += getattr(st, key)
                for name in ("accepted_at", "offered_at"):
                    have = m[name]
                    have += [0] * (len(getattr(st, name)) - len(have))
                    for i, v in enumerate(getattr(st, name)):
                        have[i] += v

    @property
    def metrics(self) -> dict:
        """Counters over every call so far: requests, rows (failed rows), generated tokens, seconds and
        tokens/s; the time in each model (``seconds_by_model``: ``small``, ``large``, and ``both`` for
        the speculative modes, whose rounds run the two models in one device call); speculative modes: vLLM's draft tokens, accepted tokens, acceptance rate, mean
        acceptance length and acceptance per position; spec-cascade: the fraction of judged positions
        deferred; defer: the fraction of answers the large model gave."""
        m = self._m
        return {"requests": m["requests"], "rows": m["rows"], "failed_rows": m["failed_rows"],
                "generated_tokens": m["generated_tokens"], "seconds": round(m["seconds"], 4),
                "tokens_per_s": round(m["generated_tokens"] / m["seconds"], 2) if m["seconds"] else None,
                "seconds_by_model": {k: round(v, 4) for k, v in m["seconds_by_model"].items()},
                "draft_tokens": m["draft_tokens"], "accepted_tokens": m["accepted_tokens"],
                "acceptance_rate": round(m["accepted_tokens"] / m["draft_tokens"], 4) if m["draft_tokens"] else None,
                "mean_acceptance_length": round(m["accepted_tokens"] / m["rounds"], 4) if m["rounds"] else None,
                "acceptance_per_position": [round(a / o, 4) if o else 0.0 for a, o in zip(m["accepted_at"], m["offered_at"])],
                "deferral_rate": (round(m["deferred_tokens"] / m["judged_tokens"], 4) if m["judged_tokens"]
                                  else round(m["deferred_rows"] / m["deferral_rows"], 4) if m["deferral_rows"] else None)}
