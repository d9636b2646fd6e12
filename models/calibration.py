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

**Input by input** (:func:`staged_block`, GPTQ's loop).  The same statistics, but the block runs
one linear input at a time over every batch (attn -> o -> mlp -> down), and the layers reading
each input can be quantized before the rest of the block runs: o_proj is calibrated on the
outputs of the quantized q/k/v, and so on (GPTQ's "true sequential" order).  It costs one forward
pass per block instead of two (statistics, then outputs), holding the block's intermediate
activations for the whole calibration set (for SmolLM2-135M at 128 x 512 tokens, about 1.2 GB).

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
from cascade.models.llama import MLP, Attention, Block, Linear, RMSNorm
from cascade.quant import hadamard
from cascade.quant.qtensor import QuantizedTensor, dequantize

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

    @classmethod
    def empty(cls, k: int) -> "InputStats":
        return cls(hessian=np.zeros((k, k)), abs_sum=np.zeros(k), abs_max=np.zeros(k, np.float32), tokens=0,
                   sample=np.zeros((0, k), np.float32))

    def add(self, x, keep_tokens: int, hessian: bool = True) -> None:
        """Accumulate one batch of inputs ``x`` (..., K); ``hessian=False`` leaves ``hessian`` at zero
        (SmoothQuant reads only the maxima, and ``XᵀX`` is most of the cost)."""
        x2 = np.ascontiguousarray(np.asarray(x, np.float32).reshape(-1, self.abs_sum.shape[0]))
        a = np.abs(x2)
        if hessian:
            self.hessian += x2.T @ x2  # float32 per batch (numpy spots x.T @ x and runs BLAS syrk: half the work)
        self.abs_sum += a.sum(0, dtype=np.float64)
        self.abs_max = np.maximum(self.abs_max, a.max(0))
        self.tokens += x2.shape[0]
        room = keep_tokens - self.sample.shape[0]
        if room > 0:
            self.sample = np.concatenate([self.sample, x2[:room]])


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


def _positions(x):
    b, t = x.shape[:2]
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@partial(jax.jit, static_argnames=("cfg",))
def _batch_inputs(block_params, cfg: ModelConfig, x):
    """The block's linear inputs for one batch (its output is not returned, so XLA drops down_proj)."""
    _, seen = _capture_inputs(Block(cfg), {"params": block_params}, x, _positions(x))
    return seen


@partial(jax.jit, static_argnames=("cfg",))
def _block_forward(block_params, cfg: ModelConfig, x):
    out, _ = Block(cfg).apply({"params": block_params}, x, _positions(x), None)
    return out


def batch_size(cfg: ModelConfig, length: int) -> int:
    """Sequences per block call: attention scores (B, H, T, T) and the MLP activations near 16 MB
    (XLA on CPU slows down on larger float buffers: 1 sequence of 512 tokens attends 1.8x faster
    than 5 at a time on SmolLM2-135M)."""
    per_seq = 4 * length * max(cfg.n_heads * length, 4 * cfg.hidden_dim)
    return max(1, (16 << 20) // per_seq)


def _batches(n: int, cfg: ModelConfig, length: int):
    bsz = batch_size(cfg, length)
    return [slice(i, i + bsz) for i in range(0, n, bsz)]


def block_statistics(block_params, cfg: ModelConfig, hidden: np.ndarray, *,
                     keep_tokens: int = DEFAULT_KEEP_TOKENS, hessian: bool = True) -> dict[str, InputStats]:
    """Statistics of every linear input of one block over ``hidden`` (N, T, dim), the hidden
    states entering it, with the block's weights as given (see the module docstring);
    ``hessian=False`` skips ``XᵀX`` (left zero)."""
    n, t, _ = hidden.shape
    acc: dict[str, InputStats] = {}
    for rows in _batches(n, cfg, t):
        seen = _batch_inputs(block_params, cfg, jnp.asarray(hidden[rows], jnp.float32))
        for name, x in seen.items():
            acc.setdefault(name, InputStats.empty(x.shape[-1])).add(x, keep_tokens, hessian)
    return acc


def _absmax(v, rotated: bool):
    v = v.astype(jnp.float32)
    return jnp.max(jnp.abs(hadamard.rotate(v, -1) if rotated else v))


@partial(jax.jit, static_argnames=("cfg", "rotated"))
def _batch_absmax(block_params, cfg: ModelConfig, x, rotated: bool):
    _, seen = _capture_inputs(Block(cfg), {"params": block_params}, x, _positions(x))
    return {name: _absmax(v, rotated) for name, v in seen.items()}


def block_input_absmax(block_params, cfg: ModelConfig, hidden: np.ndarray, *, rotated: bool = False) -> dict[str, float]:
    """``max|x|`` over all of ``hidden`` (N, T, dim) of each linear input of the block (``attn``,
    ``o``, ``mlp``, ``down``): the static per-tensor activation ranges of ``w8a8-static``;
    ``rotated``: of ``x R`` instead (``w8a8-static-had``, :func:`cascade.quant.hadamard.rotate`)."""
    n, t, _ = hidden.shape
    out: dict[str, float] = {}
    for rows in _batches(n, cfg, t):
        for name, m in _batch_absmax(block_params, cfg, jnp.asarray(hidden[rows], jnp.float32), rotated).items():
            out[name] = max(out.get(name, 0.0), float(m))
    return out


@partial(jax.jit, static_argnames=("cfg", "rotated"))
def _norm_absmax(norm_params, cfg: ModelConfig, x, rotated: bool):
    return _absmax(RMSNorm(cfg.norm_eps).apply({"params": norm_params}, x), rotated)


def final_norm_absmax(norm_params, cfg: ModelConfig, hidden: np.ndarray, *, rotated: bool = False) -> float:
    """``max|x|`` of the final norm's output (the LM head's input) over ``hidden`` (N, T, dim)
    (``rotated``: of ``x R``)."""
    n, t, _ = hidden.shape
    return max(float(_norm_absmax(norm_params, cfg, jnp.asarray(hidden[rows], jnp.float32), rotated))
               for rows in _batches(n, cfg, t))


def block_outputs(block_params, cfg: ModelConfig, hidden: np.ndarray) -> np.ndarray:
    """The block's outputs (N, T, dim) for the hidden states ``hidden`` entering it, in batches."""
    n, t, _ = hidden.shape
    return np.concatenate([np.asarray(_block_forward(block_params, cfg, jnp.asarray(hidden[rows], jnp.float32)))
                           for rows in _batches(n, cfg, t)])


# -- one block, input by input ("true sequential") ------------------------------------------------
# The block's forward pass (models/llama.py Block) cut at its four linear inputs.  Each stage runs
# over every calibration batch before the next starts, so the layers reading an input can be
# quantized before the rest of the block runs on their quantized outputs.

def _skipping(layer: str, module, variables, *args):
    """Apply ``module`` with the Linear named ``layer`` not computed (zeros); returns that Linear's input."""
    seen = []

    def interceptor(next_fun, a, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__" and context.module.name == layer:
            seen.append(a[0])
            return jnp.zeros(a[0].shape[:-1] + (context.module.features,), a[0].dtype)
        return next_fun(*a, **kwargs)

    with nn.intercept_methods(interceptor):
        module.apply(variables, *args)
    return seen[0]


@partial(jax.jit, static_argnames=("cfg",))
def _stage_attn(bp, cfg: ModelConfig, h):
    return RMSNorm(cfg.norm_eps).apply({"params": bp["attn_norm"]}, h)


@partial(jax.jit, static_argnames=("cfg",))
def _stage_o(bp, cfg: ModelConfig, x_attn):
    return _skipping("o_proj", Attention(cfg), {"params": bp["attn"]}, x_attn, _positions(x_attn), None)


@partial(jax.jit, static_argnames=("cfg",))
def _stage_mlp(bp, cfg: ModelConfig, h, ctx):
    h = h + Linear(cfg.dim, cfg.o_bias).apply({"params": bp["attn"]["o_proj"]}, ctx)
    return h, RMSNorm(cfg.norm_eps).apply({"params": bp["mlp_norm"]}, h)


@partial(jax.jit, static_argnames=("cfg",))
def _stage_down(bp, cfg: ModelConfig, x_mlp):
    return _skipping("down_proj", MLP(cfg), {"params": bp["mlp"]}, x_mlp)


@partial(jax.jit, static_argnames=("cfg",))
def _stage_out(bp, cfg: ModelConfig, h, act):
    return h + Linear(cfg.dim, cfg.mlp_bias).apply({"params": bp["mlp"]["down_proj"]}, act)


HESSIAN_ROWS = 8192  # rows per float32 XᵀX product (BLAS syrk is slow on a few hundred rows at a time)


def _chunks(values, rows: int):
    """The arrays ``values`` (each (..., K)) regrouped into (about ``rows``, K) chunks, in order."""
    pending, n = [], 0
    for v in values:
        v = v.reshape(-1, v.shape[-1])
        pending.append(v)
        n += v.shape[0]
        if n >= rows:
            yield np.concatenate(pending)
            pending, n = [], 0
    if pending:
        yield np.concatenate(pending)


def staged_block(block_params, cfg: ModelConfig, hidden: np.ndarray, on_input, *,
                 keep_tokens: int = DEFAULT_KEEP_TOKENS):
    """One block over ``hidden`` (N, T, dim), one linear input at a time, in forward order
    (``attn``, ``o``, ``mlp``, ``down``): each input's :class:`InputStats` are collected over all
    batches, then ``on_input(name, stats, block_params)`` returns the block parameters the rest of
    the pass uses (the layers reading that input quantized, say).  One forward pass in all.

    Returns ``(block_params, outputs)``: the last parameters and the block's outputs (N, T, dim)."""
    n, t, _ = hidden.shape
    batches = _batches(n, cfg, t)
    bp = block_params

    def collect(name, values):
        st = InputStats.empty(values[0].shape[-1])
        for chunk in _chunks(values, HESSIAN_ROWS):
            st.add(chunk, keep_tokens)
        return on_input(name, st, bp)

    x_attn = [np.asarray(_stage_attn(bp, cfg, jnp.asarray(hidden[r], jnp.float32))) for r in batches]
    bp = collect("attn", x_attn)
    ctx = [np.asarray(_stage_o(bp, cfg, x)) for x in x_attn]
    del x_attn
    bp = collect("o", ctx)
    staged = [_stage_mlp(bp, cfg, jnp.asarray(hidden[r], jnp.float32), c) for r, c in zip(batches, ctx)]
    del ctx
    h = [np.asarray(s[0]) for s in staged]
    x_mlp = [np.asarray(s[1]) for s in staged]
    del staged
    bp = collect("mlp", x_mlp)
    act = [np.asarray(_stage_down(bp, cfg, x)) for x in x_mlp]
    del x_mlp
    bp = collect("down", act)
    out = np.concatenate([np.asarray(_stage_out(bp, cfg, hh, a)) for hh, a in zip(h, act)])
    return bp, out


def embed_tokens(params, tokens: np.ndarray) -> np.ndarray:
    """The hidden states entering block 0: embedding rows (float32) of ``tokens`` (N, T)."""
    table = params["embed"]["embedding"]
    if isinstance(table, QuantizedTensor):
        table = dequantize(table, "float32")
    return np.asarray(table, np.float32)[tokens]
