"""Calibration for accurate PTQ (GPTQ, AWQ): sampled text, and per-layer input statistics.

**Sampling** (:func:`calibration_tokens`).  The file is split into documents at lines holding only
``<|endoftext|>`` (as ``cascade eval`` reads text).  Documents are shuffled with ``seed``,
tokenized in that order (BOS first when the tokenizer adds one) and concatenated into one stream
until it holds ``samples * length`` tokens, which are cut into ``samples`` sequences of ``length``
tokens (the GPTQ/qwix recipe on concatenated text: no padding, sequences may span documents).
The recipe (file sha256, samples, length, seed, tokens) is recorded with the quantized model.

**Statistics** (:func:`block_statistics`).  One decoder block at a time, over the calibration
hidden states entering it, in batches: for every linear layer's *input* ``x`` (tokens, K) it
accumulates the Hessian ``XᵀX`` (float32 per batch, summed in float64), the per-input-channel
sum and max of ``|x|`` and the token count, plus the first ``keep_tokens`` input rows (AWQ's
search data).  Layers that read the same input (q/k/v after ``attn_norm``; gate/up after
``mlp_norm``) share one entry, so memory is bounded by one block's statistics: for each of the
four inputs ``K x K`` floats plus ``keep_tokens x K``.

``tests/models/test_calibration.py`` checks the statistics against a direct numpy computation on
the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cascade.models.config import ModelConfig
from cascade.models.evaluation import split_documents
from cascade.models.llama import Block, Linear

DEFAULT_SAMPLES = 128
DEFAULT_LENGTH = 512
MIN_SAMPLES, MAX_SAMPLES = 32, 1024
DEFAULT_KEEP_TOKENS = 4096

# The four inputs of a block's linear layers, and the layers that read each.
INPUTS = {"attn": ("attn/q_proj", "attn/k_proj", "attn/v_proj"), "o": ("attn/o_proj",),
          "mlp": ("mlp/gate_proj", "mlp/up_proj"), "down": ("mlp/down_proj",)}
INPUT_OF = {layer: name for name, layers in INPUTS.items() for layer in layers}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationSet:
    tokens: np.ndarray  # (samples, length) int32
    recipe: dict  # file, sha256, samples, length, seed, documents used

    @property
    def samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])


def calibration_tokens(tokenizer, path: str, *, samples: int = DEFAULT_SAMPLES, length: int = DEFAULT_LENGTH,
                       seed: int = 0, max_len: int | None = None) -> CalibrationSet:
    """``samples`` sequences of ``length`` tokens sampled from the text file ``path`` (see the module
    docstring).  ``max_len``: the model context (``length`` must not exceed it)."""
    if not MIN_SAMPLES <= samples <= MAX_SAMPLES:
        raise ValueError(f"calibration samples must be in [{MIN_SAMPLES}, {MAX_SAMPLES}], got {samples}")
    if length < 2:
        raise ValueError(f"calibration length must be at least 2 tokens, got {length}")
    if max_len is not None and length > max_len:
        raise ValueError(f"calibration length {length} exceeds the model context ({max_len})")
    if tokenizer is None:
        raise ValueError("calibration needs the model's tokenizer (pass --tokenizer for a llama2.c .bin)")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ValueError(f"calibration file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"calibration file {path} is a directory") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"calibration file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = split_documents(text)
    if not docs:
        raise ValueError(f"calibration file {path} is empty")
    order = np.random.default_rng(seed).permutation(len(docs))
    need = samples * length
    stream: list[int] = []
    used = 0
    for i in order:
        stream.extend(tokenizer.encode(docs[i]))
        used += 1
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"calibration file {path} holds {len(stream):,} tokens; {samples} samples of {length} "
                         f"tokens need {need:,} (use fewer --calib-samples, a shorter --calib-len or more text)")
    tokens = np.asarray(stream[:need], np.int32).reshape(samples, length)
    recipe = {"file": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "samples": samples, "length": length,
              "seed": int(seed), "documents": used}
    return CalibrationSet(tokens=tokens, recipe=recipe)


@dataclasses.dataclass
class InputStats:
    """Accumulated statistics of one linear-layer input (K features)."""

    hessian: np.ndarray  # (K, K) float64: sum of x x^T over tokens
    abs_sum: np.ndarray  # (K,) float64: sum of |x|
    abs_max: np.ndarray  # (K,) float32: max of |x|
    tokens: int  # rows seen
    sample: np.ndarray  # (<= keep_tokens, K) float32: the first input rows

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.tokens, 1)


def _capture_inputs(block: nn.Module, variables, x, positions):
    """Run ``block`` and return (output, {input name: the (B, T, K) input of its linear layers})."""
    seen: dict[str, jnp.ndarray] = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            layer = "/".join(context.module.path[-2:])
            seen.setdefault(INPUT_OF[layer], args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out, _ = block.apply(variables, x, positions, None)
    return out, seen


@partial(jax.jit, static_argnames=("cfg", "keep"))
def _batch_stats(block_params, cfg: ModelConfig, x, keep: int):
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out, seen = _capture_inputs(Block(cfg), {"params": block_params}, x, positions)
    stats = {}
    for name, inp in seen.items():
        x2 = inp.reshape(-1, inp.shape[-1]).astype(jnp.float32)
        stats[name] = (x2.T @ x2, jnp.abs(x2).sum(0), jnp.abs(x2).max(0), x2[:keep])
    return out, stats


@partial(jax.jit, static_argnames=("cfg",))
def _block_forward(block_params, cfg: ModelConfig, x):
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out, _ = Block(cfg).apply({"params": block_params}, x, positions, None)
    return out


def batch_size(cfg: ModelConfig, length: int) -> int:
    """Sequences per block call: attention scores (B, H, T, T) and the MLP activations near 64 MB."""
    per_seq = 4 * length * max(cfg.n_heads * length, 4 * cfg.hidden_dim)
    return max(1, (64 << 20) // per_seq)


def block_statistics(block_params, cfg: ModelConfig, hidden: np.ndarray, *,
                     keep_tokens: int = DEFAULT_KEEP_TOKENS) -> dict[str, InputStats]:
    """Statistics of every linear input of one block over ``hidden`` (N, T, dim), the hidden
    states entering it (see the module docstring)."""
    n, t, _ = hidden.shape
    bsz = batch_size(cfg, t)
    acc: dict[str, InputStats] = {}
    for i in range(0, n, bsz):
        x = jnp.asarray(hidden[i:i + bsz], jnp.float32)
        rows = x.shape[0] * t
        _, stats = _batch_stats(block_params, cfg, x, keep_tokens)
        for name, (h, s, m, sample) in stats.items():
            h, s, m = (np.asarray(a) for a in (h, s, m))
            sample = np.asarray(sample[: max(0, keep_tokens - (acc[name].sample.shape[0] if name in acc else 0))])
            if name not in acc:
                acc[name] = InputStats(hessian=h.astype(np.float64), abs_sum=s.astype(np.float64), abs_max=m,
                                       tokens=rows, sample=sample)
            else:
                a = acc[name]
                a.hessian += h
                a.abs_sum += s
                a.abs_max = np.maximum(a.abs_max, m)
                a.tokens += rows
                if sample.shape[0]:
                    a.sample = np.concatenate([a.sample, sample])
    return acc


def block_outputs(block_params, cfg: ModelConfig, hidden: np.ndarray) -> np.ndarray:
    """The block's outputs (N, T, dim) for the hidden states ``hidden`` entering it, in batches."""
    n, t, _ = hidden.shape
    bsz = batch_size(cfg, t)
    return np.concatenate([np.asarray(_block_forward(block_params, cfg, jnp.asarray(hidden[i:i + bsz], jnp.float32)))
                           for i in range(0, n, bsz)])


def embed_tokens(params, tokens: np.ndarray) -> np.ndarray:
    """The hidden states entering block 0: embedding rows (float32) of ``tokens`` (N, T)."""
    table = params["embed"]["embedding"]
    return np.asarray(table, np.float32)[tokens]
