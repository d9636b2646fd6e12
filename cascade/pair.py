"""A draft/target model pair and one call that generates text with it.

:func:`load_pair` loads two models (built-in names or paths), checks they share a tokenizer, and
RTN-quantizes each under its own precision spec (``--small int4 --large int8``).  :func:`run`
generates with the pair (``mode="speculative"``, exact; ``"spec-cascade"``, a speculative cascade
whose deferral ``rule`` and ``alpha`` let the small model's tokens stand where it is confident) or
with one of its models alone (``"large"``, ``"small"``), and reports text, token ids, timing and the
speculative metrics.  ``"defer"`` is a sequence-level cascade: the small model answers, and
the large model answers instead when the small model's confidence in its answer is below a
threshold (:mod:`cascade.deferral`).
"""

from __future__ import annotations

import dataclasses
import time

from cascade.models import Model, SamplingConfig, generate, load_model, matmul_backends, quantize_model, weight_bytes
from cascade.models.defaults import DEFAULT_LARGE, DEFAULT_SMALL
from cascade.quant.kernels.cpu import attention_backend
from cascade.deferral import Deferral, answer_scores, decide
from cascade.deferral import check as check_deferral
from cascade.speculative import SpeculativeStats, speculative_generate

MODES = ("speculative", "spec-cascade", "defer", "large", "small")
NO_QUANT = ("none", "source")  # keep the checkpoint's own weights


@dataclasses.dataclass
class ModelPair:
    small: Model | None  # the draft (None: a large-only pair)
    large: Model | None  # the target / verifier (None: a small-only pair)

    @property
    def tokenizer(self):
        return (self.large or self.small).tokenizer

    def describe(self) -> dict:
        return {role: None if m is None else {"source": m.source, "quant": m.quant, "weight_bytes": weight_bytes(m.params),
                                              "matmul_backends": matmul_backends(m),
                                              "attention_backend": attention_backend()}
                for role, m in (("small", self.small), ("large", self.large))}


def _quantized(model: Model, spec: str | None, scale_dtype) -> Model:
    if spec is None or spec.strip().lower() in NO_QUANT:
        return model
    return quantize_model(model, spec, scale_dtype=scale_dtype, progress=False)[0]


def check_same_tokenizer(small: Model, large: Model) -> None:
    a, b = small.tokenizer, large.tokenizer
    if a is None or b is None:
        raise ValueError("both models of a pair need a tokenizer")
    probe = "Once upon a time, Lily said: \"1234 héllo!\"\n<|endoftext|> the end."
    if a.vocab_size != b.vocab_size or a.encode(probe) != b.encode(probe) or small.config.vocab_size > large.config.vocab_size:
        raise ValueError(f"{small.source} and {large.source} do not share a tokenizer; a cascade needs the same vocabulary")


def load_pair(small: str | None = DEFAULT_SMALL, large: str | None = DEFAULT_LARGE, *,
              small_quant: str | None = "int4", large_quant: str | None = "int8",
              scale_dtype="float16") -> ModelPair:
    """Load and quantize the pair (``*_quant``: a precision spec or rules; ``None``/``"none"`` keeps the
    weights; ``scale_dtype``: how quantization scales are stored).  ``small=None`` or ``large=None``
    loads one model, for single-model runs."""
    if small is None and large is None:
        raise ValueError("load_pair needs at least one model")
    s = None if small is None else load_model(small)
    l = None if large is None else load_model(large)
    for m in (s, l):
        if m is not None and m.tokenizer is None:
            raise ValueError(f"{m.source}: no tokenizer; a pair generates text")
    if s is not None and l is not None:
        check_same_tokenizer(s, l)
    return ModelPair(small=None if s is None else _quantized(s, small_quant, scale_dtype),
                     large=None if l is None else _quantized(l, large_quant, scale_dtype))


@dataclasses.dataclass
class RunResult:
    mode: str
    prompt: str
    prompt_token_ids: list[int]
    text: str  # the completion (without the prompt)
    token_ids: list[int]
    stop_reason: str
    prefill_s: float
    decode_s: float
    tokens_per_s: float | None  # decode tokens per second after the first token
    stats: SpeculativeStats | None  # speculative and spec-cascade modes
    answered_by: str | None = None  # "small" or "large": the model whose tokens these are (None: both, speculative)
    deferral: Deferral | None = None  # defer mode: the score, threshold and verdict
    seconds: dict | None = None  # wall time in each model (defer mode: {"small": s, "large": s})

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("mode", "prompt", "prompt_token_ids", "text", "token_ids", "stop_reason",
                                             "prefill_s", "decode_s", "tokens_per_s", "answered_by")}
        out["speculative"] = self.stats.to_json() if self.stats is not None else None
        out["deferral"] = None if self.deferral is None else {**self.deferral.to_json(), "seconds": self.seconds}
        return out


def run(pair: ModelPair, prompt: str, *, mode: str = "speculative", max_new_tokens: int = 128, draft_len: int = 4,
        sampling: SamplingConfig = SamplingConfig(), small_kv: str | None = None, large_kv: str | None = None,
        rule: str = "chow", alpha: float = 0.1, defer_score: str = "mean-logprob",
        threshold: float = -1.0) -> RunResult:
    """Generate with the pair; ``small_kv``/``large_kv``: each model's KV cache precision
    (:mod:`cascade.quant.kv`, default fp32); ``rule``/``alpha``: the deferral rule of
    ``mode="spec-cascade"`` (:func:`cascade.speculative.deferral`); ``defer_score``/``threshold``:
    ``mode="defer"`` (:mod:`cascade.deferral`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    needs = {"speculative": ("small", "large"), "spec-cascade": ("small", "large"), "defer": ("small", "large"),
             "large": ("large",), "small": ("small",)}[mode]
    if mode == "defer":
        check_deferral(defer_score, threshold)  # before any generation
    missing = [role for role in needs if getattr(pair, role) is None]
    if missing:
        raise ValueError(f"mode {mode!r} needs the {' and '.join(missing)} model, which this pair was loaded without")
    tok = pair.tokenizer
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    eos = tok.eos_ids or pair.large.config.eos_token_ids
    if mode in ("speculative", "spec-cascade"):
        cascade_rule = {"rule": rule, "alpha": alpha} if mode == "spec-cascade" else {}
        r = speculative_generate(pair.small.params, pair.small.config, pair.large.params, pair.large.config, ids,
                                 max_new_tokens=max_new_tokens, draft_len=draft_len, sampling=sampling, eos_ids=eos,
                                 draft_kv=small_kv, target_kv=large_kv, **cascade_rule)
        gen, stop, prefill_s, decode_s, tps, stats = r.tokens, r.stop_reason, r.prefill_s, r.decode_s, r.tokens_per_s, r.stats
    elif mode == "defer":
        t0 = time.perf_counter()
        g = generate(pair.small.params, pair.small.config, [ids], max_new_tokens=max_new_tokens, sampling=sampling,
                     eos_ids=eos, kv=small_kv)
        verdict = decide(answer_scores(pair.small.params, pair.small.config, ids, g.tokens[0]), defer_score, threshold)
        seconds = {"small": time.perf_counter() - t0, "large": 0.0}
        if verdict.deferred:
            t1 = time.perf_counter()
            g = generate(pair.large.params, pair.large.config, [ids], max_new_tokens=max_new_tokens, sampling=sampling,
                         eos_ids=eos, kv=large_kv)
            seconds["large"] = time.perf_counter() - t1
        text = tok.decode_completion(ids, g.tokens[0])
        return RunResult(mode=mode, prompt=prompt, prompt_token_ids=ids, text=text, token_ids=g.tokens[0],
                         stop_reason=g.stop_reasons[0], prefill_s=g.prefill_s, decode_s=g.decode_s,
                         tokens_per_s=g.tokens_per_s, stats=None, answered_by="large" if verdict.deferred else "small",
                         deferral=verdict, seconds={k: round(v, 4) for k, v in seconds.items()})
    else:
        m = pair.large if mode == "large" else pair.small
        g = generate(m.params, m.config, [ids], max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos,
                     kv=large_kv if mode == "large" else small_kv)
        gen, stop, prefill_s, decode_s, tps, stats = (g.tokens[0], g.stop_reasons[0], g.prefill_s, g.decode_s,
                                                      g.tokens_per_s, None)
    text = tok.decode_completion(ids, gen)
    return RunResult(mode=mode, prompt=prompt, prompt_token_ids=ids, text=text, token_ids=gen, stop_reason=stop,
                     prefill_s=prefill_s, decode_s=decode_s, tokens_per_s=tps, stats=stats,
                     answered_by=mode if mode in ("large", "small") else None)
