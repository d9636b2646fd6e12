"""A draft/target model pair and one call that generates text with it.

:func:`load_pair` loads two models (built-in names or paths), checks they share a tokenizer, and
RTN-quantizes each under its own precision spec (``--small int4 --large int8``).  :func:`run`
generates with the pair (``mode="speculative"``, exact; ``"spec-cascade"``, a speculative cascade
whose deferral ``rule`` and ``alpha`` let the small model's tokens stand where it is confident) or
with one of its models alone (``"large"``, ``"small"``), and reports text, token ids, timing and the
speculative metrics.  ``"defer"`` is a sequence-level cascade: the small model answers, and
the large model answers instead when the small model's confidence in its answer is below a
threshold (:mod:`cascade.deferral`).  :func:`stream_batch` is the one place a mode and its
settings become a run: :func:`run`, :func:`generate_batch` and :class:`cascade.Cascade` go through it.
"""

from __future__ import annotations

import dataclasses
import time

from cascade.console import format_table
from cascade.models import Model, SamplingConfig, load_model, matmul_backends, quantize_model, weight_bytes
from cascade.models.quantize import SOURCE_A8, source_a8
from cascade.models.defaults import DEFAULT_LARGE, DEFAULT_SMALL
from cascade.models.generation import drain, eos_ids, generate_stream, prompt_problem
from cascade.quant.kernels.cpu import attention_backend
from cascade.deferral import Deferral, answer_scores, decide
from cascade.deferral import check as check_deferral
from cascade.speculative import SpeculativeStats, draft_setting, speculative_stream

MODES = ("speculative", "spec-cascade", "defer", "large", "small")
SPECULATIVE = ("speculative", "spec-cascade")  # the modes whose rounds run both models
NO_QUANT = ("none", "source")  # keep the checkpoint's own weights (SOURCE_A8: the same with int8 activations)
DEFAULT_QUANT = {"small": "int4", "large": "int8"}  # the precision a float model gets when none is given


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairPreset:
    name: str  # `cascade run --pair NAME`
    small: str  # the draft model (a name or path)
    large: str  # the target model
    chat: bool  # prompts go through the target's chat template (`--raw` skips it)
    description: str


PAIRS = {p.name: p for p in (
    PairPreset(name="default", small=DEFAULT_SMALL, large=DEFAULT_LARGE, chat=False,
               description="the embedded TinyStories pair (shipped, offline)"),
    PairPreset(name="smollm2", small="smollm2-draft", large="smollm2", chat=True,
               description="SmolLM2-135M-Instruct (`cascade pull smollm2`) with its shipped distilled draft"),
)}


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as one user turn through the tokenizer's chat template, ready for the answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


@dataclasses.dataclass
class ModelPair:
    small: Model | None  # the draft (None: a large-only pair)
    large: Model | None  # the target / verifier (None: a small-only pair)

    @property
    def tokenizer(self):
        return (self.large or self.small).tokenizer

    def describe(self) -> dict:
        return {role: None if m is None else {"source": m.source, "quant": m.quant,
                                              "method": None if m.ptq is None else m.ptq.get("method"),
                                              "weight_bytes": weight_bytes(m.params),
                                              "matmul_backends": matmul_backends(m),
                                              "attention_backend": attention_backend()}
                for role, m in (("small", self.small), ("large", self.large))}


def _quantized(model: Model, spec: str | None, role: str, scale_dtype, calib: str | None = None,
               calib_samples: int = 128, calib_len: int = 512) -> Model:
    if spec is None:  # the default: a float model gets DEFAULT_QUANT, one already quantized stays as stored
        spec = "none" if _has_quantized(model.params) else DEFAULT_QUANT[role]
    if spec.strip().lower() in NO_QUANT:
        return model
    if spec.strip().lower() == SOURCE_A8:  # the checkpoint's own codes with int8 activations
        return source_a8(model)
    tokens = None
    if calib is not None:  # the default method with calibration text (models.quantize.choose_method)
        from cascade.models.calibration import calibration_tokens

        tokens = calibration_tokens(model.tokenizer, calib, samples=calib_samples,
                                    length=min(calib_len, model.config.max_seq_len), max_len=model.config.max_seq_len)
    return quantize_model(model, spec, calib=tokens, scale_dtype=scale_dtype, progress=False)[0]


def _has_quantized(params) -> bool:
    import jax

    from cascade.quant.qtensor import QuantizedTensor

    is_q = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
    return any(is_q(leaf) for leaf in jax.tree.leaves(params, is_leaf=is_q))


def holds_quantized_weights(source: str) -> bool:
    """Whether the model at ``source`` stores quantized weights (a checkpoint saved by ``cascade
    quantize``, a .gguf with Q8_0/Q4_0/Q4_1 tensors), read from its manifest or header, not its weights."""
    import json
    import os

    from cascade.models.defaults import resolve_model_path

    try:
        path = resolve_model_path(source)
        if os.path.isdir(path):
            from cascade.models.checkpoint import CHECKPOINT_MARKER, is_checkpoint

            if not is_checkpoint(path):
                return False
            with open(os.path.join(path, CHECKPOINT_MARKER), encoding="utf-8") as f:
                tree = json.load(f).get("tree") or {}
            return any(isinstance(e, dict) and e.get("kind") == "quantized" for e in tree.values())
        if path.lower().endswith(".gguf"):
            from cascade.models.loaders.gguf import IMPORTED_TYPES, read_gguf

            return any(t.type in IMPORTED_TYPES for t in read_gguf(path).tensors.values())
    except (OSError, ValueError, AttributeError):  # unreadable: loading it will say why
        return False
    return False


def resolve_quant(source: str, quant: str | None, role: str) -> str:
    """The precision ``role``'s model at ``source`` gets: ``quant`` when given; by default (None)
    :data:`DEFAULT_QUANT` for a float model and ``"none"`` (as stored) for one already quantized."""
    if quant is not None:
        return quant
    return "none" if holds_quantized_weights(source) else DEFAULT_QUANT[role]


def read_tokenizer(source: str):
    """The tokenizer of the model at ``source``, read without its weights (for counting prompt
    tokens before loading), or None when it has none this can read (:func:`cascade.models.load_model`
    is the authority)."""
    import os

    from cascade.models.defaults import resolve_model_path
    from cascade.models.tokenizer import Tokenizer

    try:
        path = resolve_model_path(source)
        if os.path.isdir(path):
            from cascade.models.checkpoint import TOKENIZER_DIR, is_checkpoint

            if is_checkpoint(path):
                tok_dir = os.path.join(path, TOKENIZER_DIR)
                return Tokenizer.load(tok_dir) if os.path.isdir(tok_dir) else None
            if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
                return Tokenizer.from_hf_dir(path)
            return None
        if path.lower().endswith(".gguf"):
            from cascade.models.loaders.gguf import read_gguf

            return Tokenizer.from_gguf_metadata(read_gguf(path).metadata, source=path)
        if path.lower().endswith(".bin"):
            from cascade.models.loaders.llama2c import _default_tokenizer

            found = _default_tokenizer(path)
            return None if found is None else Tokenizer.from_sentencepiece(found)
    except (OSError, ValueError):
        return None
    return None


def check_same_tokenizer(small: Model, large: Model) -> None:
    a, b = small.tokenizer, large.tokenizer
    if a is None or b is None:
        raise ValueError("both models of a pair need a tokenizer")
    probe = "Once upon a time, Lily said: \"1234 héllo!\"\n<|endoftext|> the end."
    if a.vocab_size != b.vocab_size or a.encode(probe) != b.encode(probe) or small.config.vocab_size > large.config.vocab_size:
        raise ValueError(f"{small.source} and {large.source} do not share a tokenizer; a cascade needs the same vocabulary")


def load_pair(small: str | None = DEFAULT_SMALL, large: str | None = DEFAULT_LARGE, *,
              small_quant: str | None = None, large_quant: str | None = None,
              scale_dtype="float16", calib: str | None = None, calib_samples: int = 128,
              calib_len: int = 512) -> ModelPair:
    """Load and quantize the pair (``*_quant``: a precision spec or rules; ``"none"`` keeps the weights;
    None, the default: ``int4`` for the small model and ``int8`` for the large one when it is a float
    model, its stored precision when it is already quantized, e.g. a checkpoint saved by ``cascade
    quantize``; ``scale_dtype``: how quantization scales are stored).  ``calib``: a calibration text
    file; each model quantized here then gets the default calibrated method
    (:func:`cascade.models.quantize.choose_method`, awq-gptq on ``-mse`` ranges) on ``calib_samples``
    sequences of ``calib_len`` of its own tokens (capped at its context) instead of RTN.  ``small=None`` or ``large=None`` loads one model, for
    single-model runs."""
    if small is None and large is None:
        raise ValueError("load_pair needs at least one model")
    s = None if small is None else load_model(small)
    l = None if large is None else load_model(large)
    for m in (s, l):
        if m is not None and m.tokenizer is None:
            raise ValueError(f"{m.source}: no tokenizer; a pair generates text")
    if s is not None and l is not None:
        check_same_tokenizer(s, l)
    how = dict(calib=calib, calib_samples=calib_samples, calib_len=calib_len)
    return ModelPair(small=None if s is None else _quantized(s, small_quant, "small", scale_dtype, **how),
                     large=None if l is None else _quantized(l, large_quant, "large", scale_dtype, **how))


def place_pair(pair: ModelPair, tp: int, small_devices: int | None = None) -> tuple[ModelPair, dict]:
    """The pair on devices: the large model sharded over the first ``tp`` devices in the Megatron
    layout (:mod:`cascade.models.sharding`), the small one replicated on those same devices, or,
    with ``small_devices``, sharded over the next ``small_devices`` devices of its own (the
    speculative rounds then run each model's side on its devices:
    :func:`cascade.speculative.split_round`).  Returns the placed pair and ``{"tp", "devices",
    "bytes_per_device"}`` (both models' bytes on each device), plus ``"small_devices"`` and
    ``"small_device_list"`` with devices of its own."""
    import jax

    from cascade.memory import PlacementError
    from cascade.models import sharding

    def split(role, fn, *args):  # a model that cannot be split: blame the setting that split it
        try:
            return fn(*args)
        except ValueError as e:
            param = "small_devices" if role == "small" and small_devices is not None else "tp"
            raise PlacementError(f"the {role} model over {args[-1].devices.size} devices: {e}", param) from None

    if small_devices is not None:
        if pair.small is None or pair.large is None:
            raise PlacementError("--small-devices places the small model beside the large one: it needs both models "
                                 "(--mode speculative, spec-cascade or defer)", "small_devices")
        if small_devices < 1:
            raise PlacementError(f"small_devices must be a positive integer, got {small_devices}", "small_devices")
        if tp + small_devices > jax.device_count():
            raise PlacementError(f"tp={tp} for the large model and {small_devices} device(s) for the small one need "
                                 f"{tp + small_devices} devices; JAX sees {jax.device_count()} "
                                 f"({jax.devices()[0].platform})", "small_devices")
    mesh = sharding.make_mesh(tp)
    large = None if pair.large is None else dataclasses.replace(
        pair.large, params=split("large", sharding.shard_params, pair.large.params, pair.large.config, mesh))
    small_mesh = mesh if small_devices is None else sharding.make_mesh(small_devices, jax.devices()[tp:])
    small = None if pair.small is None else dataclasses.replace(
        pair.small, params=(sharding.replicate(pair.small.params, small_mesh) if small_devices is None
                            else split("small", sharding.shard_params, pair.small.params, pair.small.config, small_mesh)))
    placed = [m.params for m in (small, large) if m is not None]
    info = sharding.placement(mesh, placed)
    if small_devices is not None:
        info.update(small_devices=small_devices, small_device_list=[str(d) for d in small_mesh.devices.flat])
    return ModelPair(small=small, large=large), info


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
    tokens_per_s: float | None  # decode tokens per second, steps that compiled left out (None: no such step)
    stats: SpeculativeStats | None  # speculative and spec-cascade modes
    answered_by: str | None = None  # "small" or "large": the model whose tokens these are (None: both, speculative)
    deferral: Deferral | None = None  # defer mode: the score, threshold and verdict
    seconds: dict | None = None  # defer mode: wall time in each model for the whole batch ({"small": s, "large": s})

    def table(self) -> str:
        """The result as a two-column table for people (:meth:`to_json` for scripts)."""
        rows = [("mode", self.mode), ("answered by", self.answered_by or "small drafts, large verifies"),
                ("tokens", len(self.token_ids)), ("stop", self.stop_reason), ("prefill s", f"{self.prefill_s:.4f}"),
                ("decode s", f"{self.decode_s:.4f}"),
                ("tokens/s", "n/a" if self.tokens_per_s is None else f"{self.tokens_per_s:.1f}")]
        st = self.stats
        if st is not None:
            rows += [("rounds", st.rounds), ("draft tokens", st.draft_tokens), ("accepted tokens", st.accepted_tokens),
                     ("acceptance", f"{st.acceptance_rate:.1%}"),
                     ("mean acceptance length", f"{st.mean_accepted_length:.2f}"),
                     ("acceptance per position", " ".join(f"{a / o:.2f}" if o else "-"
                                                          for a, o in zip(st.accepted_at, st.offered_at)))]
            if st.judged_tokens:
                rows.append(("deferral rate", f"{st.deferral_rate:.1%} of {st.judged_tokens} judged positions"))
        if self.deferral is not None:
            rows.append(("deferral", self.deferral.reason))
        return format_table(rows, align="<<")

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("mode", "prompt", "prompt_token_ids", "text", "token_ids", "stop_reason",
                                             "prefill_s", "decode_s", "tokens_per_s", "answered_by")}
        out["speculative"] = self.stats.to_json() if self.stats is not None else None
        out["deferral"] = None if self.deferral is None else {**self.deferral.to_json(), "seconds": self.seconds}
        return out


@dataclasses.dataclass(frozen=True)
class RowError:
    """A prompt of a batch that could not run (the other rows still did)."""

    prompt: str
    error: str

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "error": self.error}


NEEDS = {"speculative": ("small", "large"), "spec-cascade": ("small", "large"), "defer": ("small", "large"),
         "large": ("large",), "small": ("small",)}  # the models each mode runs


def check_mode(pair: ModelPair, mode: str) -> int:
    """Raise if ``mode`` is unknown or needs a model the pair lacks; returns the context of the models it runs."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    missing = [role for role in NEEDS[mode] if getattr(pair, role) is None]
    if missing:
        raise ValueError(f"mode {mode!r} needs the {' and '.join(missing)} model, which this pair was loaded without")
    return min(getattr(pair, role).config.max_seq_len for role in NEEDS[mode])


def row_problem(prompt: str, ids: list[int], context: int, max_new_tokens: int) -> str | None:
    """Why ``prompt`` (encoded ``ids``) cannot run in ``context`` with ``max_new_tokens``, or None."""
    if prompt == "":
        return "the prompt is empty"
    if not ids:
        return "the prompt encodes to no tokens"
    return prompt_problem(len(ids), max_new_tokens, context, "the context")


def cascade_rule(mode: str, rule: str, alpha: float) -> dict:
    """The deferral rule ``mode`` runs with, as keyword arguments: ``rule`` and ``alpha`` for
    ``spec-cascade``, none for the other modes (exact speculation judges by the large model alone)."""
    return {"rule": rule, "alpha": alpha} if mode == "spec-cascade" else {}


def run(pair: ModelPair, prompt: str, **kwargs) -> RunResult:
    """Generate with the pair for one prompt: :func:`generate_batch` of one row, its error raised."""
    (r,) = generate_batch(pair, [prompt], **kwargs)
    if isinstance(r, RowError):
        raise ValueError(r.error)
    return r


def generate_batch(pair: ModelPair, prompts: list[str], **kwargs) -> list["RunResult | RowError"]:
    """Generate with the pair for every prompt, the rows together in every mode (each its own cache
    length, acceptance, rewinds and stop): :func:`stream_batch` run to its end (same arguments).  A
    prompt that cannot run (it encodes to nothing, or does not fit the context with
    ``max_new_tokens``) is a :class:`RowError` in its place; the others run."""
    return drain(stream_batch(pair, prompts, **kwargs))


def _mapped(stream, f):
    """``stream`` with ``f`` applied to each item it yields; returns what ``stream`` returns."""
    while True:
        try:
            item = next(stream)
        except StopIteration as end:
            return end.value
        yield f(item)


def stream_batch(pair: ModelPair, prompts: list[str], *, mode: str = "speculative", max_new_tokens: int = 128,
                 draft_len: int | str = 4, sampling: SamplingConfig = SamplingConfig(), small_kv: str | None = None,
                 large_kv: str | None = None, rule: str = "chow", alpha: float = 0.1,
                 defer_score: str = "mean-logprob", threshold: float = -1.0, draft_confidence: float | None = None,
                 chat: bool = False, per_call: int | None = None):
    """The one place a mode and its settings become a run.  A generator: after the prefill and after
    every step or round it yields the tokens each prompt's row emitted (``list[list[int]]``, empty for
    a row that stopped or could not run; ``defer`` yields once, the answers whole, since a deferred
    answer is replaced); it returns one :class:`RunResult` or :class:`RowError` per prompt.

    ``small_kv``/``large_kv``: each model's KV cache precision (:mod:`cascade.quant.kv`, default
    fp32); ``draft_len``/``draft_confidence``: how far the draft proposes in the speculative modes
    (a number of tokens, or ``"auto"``: adaptive, :func:`cascade.speculative.draft_setting`);
    ``rule``/``alpha``: the deferral rule of ``mode="spec-cascade"``
    (:func:`cascade.speculative.deferral`); ``defer_score``/``threshold``: ``mode="defer"``
    (:mod:`cascade.deferral`).  ``chat``: each prompt is a user turn through the chat template
    (:func:`chat_prompt`; the template writes any BOS itself), the result's ``prompt`` the text as given.
    A prompt may also be a list of token ids, used as they are (its result's ``prompt``: their text).
    ``per_call``: decode steps or speculative rounds run by one device call (default
    :data:`cascade.models.generation.STEPS_PER_CALL` / :data:`cascade.speculative.ROUNDS_PER_CALL`;
    1: a call and a read-back per step); the tokens are the same either way."""
    context = check_mode(pair, mode)
    if mode == "defer":
        check_deferral(defer_score, threshold)  # before any generation
    if mode in SPECULATIVE:
        draft_setting(draft_len, draft_confidence)
    if not prompts:
        raise ValueError("no prompts to generate for")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tok = pair.tokenizer
    encoded = [list(p) if not isinstance(p, str) else tok.encode(chat_prompt(tok, p), add_bos=False) if chat and p
               else tok.encode(p) for p in prompts]
    prompts = [p if isinstance(p, str) else tok.decode(p) for p in prompts]
    out: list = [None] * len(prompts)
    good = []
    for i, (p, ids) in enumerate(zip(prompts, encoded)):
        problem = row_problem(p, ids, context, max_new_tokens)
        if problem is None:
            good.append(i)
        else:
            out[i] = RowError(prompt=p, error=problem)
    if not good:
        return out
    eos = eos_ids(tok, (pair.large or pair.small).config)

    def spread(emitted):  # the good rows' tokens, in the prompts' places
        rows = [[] for _ in prompts]
        for i, new in zip(good, emitted):
            rows[i] = new
        return rows

    def result(i, tokens, stop, prefill_s, decode_s, tps, **extra):
        return RunResult(mode=mode, prompt=prompts[i], prompt_token_ids=encoded[i],
                         text=tok.decode_completion(encoded[i], tokens), token_ids=tokens, stop_reason=stop,
                         prefill_s=prefill_s, decode_s=decode_s, tokens_per_s=tps, **extra)

    def alone(model, kv, rows):
        return generate_stream(model.params, model.config, [encoded[i] for i in rows], max_new_tokens=max_new_tokens,
                               sampling=sampling, eos_ids=eos, kv=kv, **calls)

    if per_call is not None and (not isinstance(per_call, int) or per_call < 1):
        raise ValueError(f"per_call must be a positive number of steps, got {per_call!r}")
    calls = {} if per_call is None else {"steps_per_call": per_call}
    if mode in SPECULATIVE:
        rs = yield from _mapped(speculative_stream(
            pair.small.params, pair.small.config, pair.large.params, pair.large.config, [encoded[i] for i in good],
            max_new_tokens=max_new_tokens, draft_len=draft_len, sampling=sampling, eos_ids=eos, draft_kv=small_kv,
            target_kv=large_kv, draft_confidence=draft_confidence, **cascade_rule(mode, rule, alpha),
            **({} if per_call is None else {"rounds_per_call": per_call})), spread)
        for i, r in zip(good, rs):
            out[i] = result(i, r.tokens, r.stop_reason, r.prefill_s, r.decode_s, r.tokens_per_s, stats=r.stats)
    elif mode == "defer":
        t0 = time.perf_counter()
        g = drain(alone(pair.small, small_kv, good))
        verdicts = [decide(answer_scores(pair.small.params, pair.small.config, encoded[i], toks), defer_score, threshold)
                    for i, toks in zip(good, g.tokens)]
        small_s = time.perf_counter() - t0
        rows = {i: (toks, stop, g) for i, toks, stop in zip(good, g.tokens, g.stop_reasons)}
        deferred = [i for i, v in zip(good, verdicts) if v.deferred]
        large_s = 0.0
        if deferred:
            t1 = time.perf_counter()
            gl = drain(alone(pair.large, large_kv, deferred))
            large_s = time.perf_counter() - t1
            rows.update({i: (toks, stop, gl) for i, toks, stop in zip(deferred, gl.tokens, gl.stop_reasons)})
        seconds = {"small": round(small_s, 4), "large": round(large_s, 4)}
        for i, v in zip(good, verdicts):
            toks, stop, gen = rows[i]
            out[i] = result(i, toks, stop, gen.prefill_s, gen.decode_s, gen.tokens_per_s, stats=None,
                            answered_by="large" if v.deferred else "small", deferral=v, seconds=seconds)
        yield spread([rows[i][0] for i in good])
    else:
        m, kv = (pair.large, large_kv) if mode == "large" else (pair.small, small_kv)
        g = yield from _mapped(alone(m, kv, good), spread)
        for i, toks, stop in zip(good, g.tokens, g.stop_reasons):
            out[i] = result(i, toks, stop, g.prefill_s, g.decode_s, g.tokens_per_s, stats=None, answered_by=mode)
    return out
