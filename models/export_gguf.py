"""Writing a model as a GGUF file that llama.cpp (and everything built on it) runs.

:func:`export_gguf` is the inverse of :func:`cascade.models.loaders.gguf.load_gguf`: what that
loader imports without requantizing, this writer exports without requantizing.  Blocks of 32 run
along a weight's reduction axis, exactly our groups of 32, so each quantized tensor whose spec has
an exact ggml type is written from its stored codes and scales:

* ``int8-g32`` (narrow, -127..127; ``-full`` too)   -> ``Q8_0``: fp16 ``d`` = our scale, int8 ``q``
* ``int4-g32`` (full grid, -8..7; ``-narrow`` too)  -> ``Q4_0``: fp16 ``d`` = our scale, nibble ``q + 8``
* ``int4-g32-asym``                                 -> ``Q4_1``: fp16 ``d`` = our scale, nibble ``q``,
  fp16 ``m = -z * d`` (our zero point ``z``).  ``m`` is rounded to fp16 (round to nearest even, from
  the float64 product): the only change an export makes, at most half an fp16 ulp of ``m`` per
  block (:attr:`TensorExport.max_min_rounding` reports it).  A model imported from a Q4_1 file
  carries ``z = -m/d`` and gets its ``m`` back exactly.
* float specs and float weights -> ``F32``, ``F16`` or ``BF16`` (their own dtype); norms ``F32``.

The range estimator (``-mse``, ``-p99.9``) and ``-a8`` do not change what is stored, so
``int4-g32-mse-a8`` exports as ``Q4_0`` too.  Scales must be float16 (the default
``--scale-dtype``); other scale dtypes are exact only where every scale is an fp16 value.

Any other quantized tensor (per-channel int8, groups of 64 or 128, int3, int2, w8a8, a Hadamard-
rotated weight, bfloat16 scales) has no exact ggml type: it is refused with one line listing the
exportable specs, unless ``requantize`` names a type (``Q8_0``, ``Q4_0``, ``Q4_1``, ``F16``,
``BF16``, ``F32``), which dequantizes it and quantizes it again with llama.cpp's own arithmetic
(``gguf.quants.quantize``); the report gives each such tensor's added error.

Metadata: the architecture (``llama``, for Llama and Mistral models; ``qwen2``), the
hyperparameters and RoPE settings :func:`~cascade.models.loaders.gguf.config_from_gguf` reads (Llama
3 frequency scaling as ``rope_freqs.weight``, as llama.cpp's converter writes it), the tokenizer
(SentencePiece as ``llama`` with scores and piece types, byte-level BPE as ``gpt2`` with merges and
the ``tokenizer.ggml.pre`` name whose pre-tokenizer encodes like the model's own, checked on sample
text), the special tokens, ``add_bos_token``, the chat template, ``general.quantized_by`` and
``general.file_type`` (the type that holds most of the blocks' matrix weights, the embedding and head
not counted, as in llama.cpp's own files: a mixed-precision file says ``MOSTLY_`` that type), plus ``cascade.quant`` (the precision rules) and ``cascade.method``.  Llama
Q/K rows are permuted into ggml's adjacent-pair RoPE layout (``qwen2`` files are not permuted).

The file is written beside its target and renamed onto it when complete
(:func:`cascade.models.files.side_path`): it appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import math
import os

import flax
import numpy as np

from cascade.models import files
from cascade.models.config import ModelConfig, rope_inv_freq
from cascade.models.model import Model
from cascade.quant import packing
from cascade.quant.qtensor import QuantizedTensor, dequantize
from cascade.quant.spec import FloatSpec, IntSpec

# our architecture -> GGUF general.architecture, and whether Q/K rows are stored permuted
GGUF_ARCHITECTURES = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
                      "Qwen2ForCausalLM": ("qwen2", False)}
REQUANTIZE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32")
EXPORTABLE = ("int8-g32 (Q8_0), int4-g32 / int4-g32-full / int4-g32-narrow (Q4_0), int4-g32-asym (Q4_1), "
              "and fp32 / fp16 / bf16 (F32 / F16 / BF16), with any range estimator (-mse, -pN) and -a8")
_FLOAT_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1"}
# text the tokenizer check encodes: spaces, digits, punctuation, contractions, newlines, non-ASCII
CHECK_TEXTS = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside!",
    "  Two  spaces,\ttabs\tand\nnew lines\n\n(in 1984: 3.14159 or 12,345,678?) -- isn't it? We'll see; I'd've gone.",
    "Ünïcödé: café, naïve, 日本語, emoji 🙂, and symbols like ≤ ≥ → ∞ € £.",
    "def f(x):\n    return x**2  # code, CamelCase and snake_case_names\n",
)
# byte-level BPE pre-tokenizers llama.cpp names, tried in this order (the first that encodes the check
# texts exactly as the model's own tokenizer is written)
_PRE_CANDIDATES = ("gpt-2", "smollm", "llama-bpe", "qwen2")


class ExportError(ValueError):
    """The model cannot be written as asked (a spec without an exact GGUF type, no tokenizer, ...)."""


@dataclasses.dataclass
class TensorExport:
    """What happened to one tensor."""

    name: str  # GGUF tensor name
    param: str  # our parameter path
    spec: str  # our precision: a spec, or the float dtype of an unquantized parameter
    type: str  # ggml type written
    shape: tuple[int, ...]  # numpy order, (out, in) for a matrix
    nbytes: int  # bytes of the tensor's data in the file
    requantized: bool = False  # converted by --requantize (not exact)
    rel_rms_error: float | None = None  # requantized: ||deq(new) - ours|| / ||ours||
    max_min_rounding: float | None = None  # Q4_1: largest |fp16(m) - m| over the blocks

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ExportReport:
    path: str
    architecture: str
    file_type: str
    tensors: list[TensorExport]
    tokenizer: dict  # {"model": "gpt2"|"llama", "pre": ..., "tokens": n}
    bytes: int

    @property
    def requantized(self) -> list[TensorExport]:
        return [t for t in self.tensors if t.requantized]

    def to_json(self) -> dict:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        return {"out": self.path, "architecture": self.architecture, "file_type": self.file_type,
                "bytes": self.bytes, "types": counts, "tokenizer": self.tokenizer,
                "requantized": len(self.requantized), "tensors": [t.to_json() for t in self.tensors]}

    def table(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        lines = [f"wrote {self.path} ({self.bytes / 2**20:.2f} MiB, {len(self.tensors)} tensors: "
                 + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")",
                 f"architecture {self.architecture}, general.file_type {self.file_type}, tokenizer "
                 f"{self.tokenizer['model']}" + (f" (pre {self.tokenizer['pre']})" if self.tokenizer.get("pre") else "")
                 + f", {self.tokenizer['tokens']:,} tokens"]
        q41 = [t.max_min_rounding for t in self.tensors if t.max_min_rounding is not None]
        if q41:
            lines.append(f"Q4_1 minimums rounded to fp16: largest change {max(q41):.3g}")
        if self.requantized:
            lines.append("requantized (not exact):")
            width = max(len(t.name) for t in self.requantized)
            for t in self.requantized:
                lines.append(f"  {t.name:<{width}}  {t.spec} -> {t.type}  relative RMS error {t.rel_rms_error:.3e}")
        else:
            lines.append("every tensor written exactly (no requantization)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- types


def exact_type(spec) -> str | None:
    """The ggml type that stores ``spec`` exactly (its codes and fp16 scales as they are), or None."""
    if isinstance(spec, FloatSpec):
        return _FLOAT_TYPES[spec.dtype]
    if not isinstance(spec, IntSpec) or spec.act is not None or spec.rotate:
        return None
    if spec.granularity != "group" or spec.group_size != 32:
        return None
    if spec.bits == 8 and spec.symmetric:
        return "Q8_0"
    if spec.bits == 4:
        return "Q4_0" if spec.symmetric else "Q4_1"
    return None


def unexportable(rules) -> list[str]:
    """The specs of precision ``rules`` (text or :class:`PrecisionRules`) that have no exact GGUF type
    (checked before quantizing, so ``cascade export`` refuses them before the work)."""
    from cascade.quant.rules import PrecisionRules

    parsed = PrecisionRules.parse(rules)
    specs = [parsed.default, *(spec for _, spec in parsed.rules)]
    return list(dict.fromkeys(spec.explicit for spec in specs if spec is not None and exact_type(spec) is None))


def check_requantize(requantize: str | None) -> str | None:
    if requantize is None:
        return None
    t = str(requantize).strip().upper()
    if t not in REQUANTIZE_TYPES:
        raise ExportError(f"--requantize takes one of {', '.join(REQUANTIZE_TYPES)}, got {requantize!r}")
    return t


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rotate-half rows (ours, HF) -> ggml's adjacent-pair RoPE rows: the inverse of
    :func:`cascade.models.llama.unpermute_rope_rows` (llama.cpp's converter's ``permute``)."""
    rows = w.shape[0]
    hd = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, hd // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


# ----------------------------------------------------------------------------- tensors


def _blocks_q8_0(codes, d):
    """codes (rows, cols) int (q), d (rows, nb) float16 -> (rows, nb * 34) uint8."""
    rows, cols = codes.shape
    nb = cols // 32
    out = np.empty((rows, nb, 34), np.uint8)
    out[..., :2] = d.astype("<f2").reshape(rows, nb, 1).view(np.uint8)
    out[..., 2:] = codes.reshape(rows, nb, 32).astype(np.int8).view(np.uint8)
    return out.reshape(rows, nb * 34)


def _nibbles(u):
    """(rows, nb, 32) codes 0..15 -> (rows, nb, 16) bytes: element j low, element j + 16 high (ggml)."""
    return (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)


def _blocks_q4(u, d, m=None):
    """u (rows, cols) codes 0..15, d (rows, nb) float16, m (rows, nb) float16 or None."""
    rows, cols = u.shape
    nb = cols // 32
    head = 2 if m is None else 4
    out = np.empty((rows, nb, head + 16), np.uint8)
    out[..., :2] = d.astype("<f2").reshape(rows, nb, 1).view(np.uint8)
    if m is not None:
        out[..., 2:4] = m.astype("<f2").reshape(rows, nb, 1).view(np.uint8)
    out[..., head:] = _nibbles(u.reshape(rows, nb, 32).astype(np.uint8))
    return out.reshape(rows, nb * (head + 16))


def _rows(a, axis: int):
    """A 2-D array (or its per-group params) in (rows, along-reduction) order."""
    return np.asarray(a) if axis == 1 else np.asarray(a).T


def _fp16_exact(scale, where) -> np.ndarray:
    s = np.asarray(scale)
    h = s.astype(np.float16)
    if not np.array_equal(h.astype(np.float32), s.astype(np.float32)):
        raise ExportError(f"{where}: its scales are {s.dtype}, not all fp16 values, so no GGUF type stores them "
                          f"exactly; quantize with --scale-dtype float16 or pass --requantize TYPE")
    return h


def _exact_quantized(qt: QuantizedTensor, ggml: str, heads, where):
    """(raw uint8 (rows, bytes per row), max |m rounding| or None) of a tensor with an exact type."""
    spec = qt.spec
    if qt.ndim != 2 or qt.stack_shape:
        raise ExportError(f"{where}: a {qt.ndim}-D or stacked quantized tensor cannot be exported")
    k = qt.shape[qt.axis]
    if k % 32:
        raise ExportError(f"{where}: its reduction axis ({k}) is not a multiple of 32 (a ggml block); "
                          f"--requantize F32 writes it as float32, exactly its dequantized values")
    u = np.asarray(packing.unpack_codes(qt.packed, spec.bits, k, qt.axis))  # stored unsigned codes
    u = _rows(u, qt.axis)
    d = _fp16_exact(_rows(qt.scale, qt.axis), where)
    m, rounding = None, None
    if ggml == "Q4_1":
        z = _rows(qt.zero, qt.axis).astype(np.float64)
        exact_m = -z * d.astype(np.float64)
        m = exact_m.astype(np.float16)
        if not np.isfinite(m).all():
            raise ExportError(f"{where}: a block minimum -zero*scale overflows fp16")
        rounding = float(np.max(np.abs(m.astype(np.float64) - exact_m))) if m.size else 0.0
    if heads is not None:
        u, d = permute_rope_rows(u, heads), permute_rope_rows(d, heads)
        m = None if m is None else permute_rope_rows(m, heads)
    if ggml == "Q8_0":
        return _blocks_q8_0(u.astype(np.int32) - spec.code_offset, d), rounding
    return _blocks_q4(u, d, m), rounding


def _float_raw(x: np.ndarray, ggml: str):
    """(array to write, raw dtype or None) of a float tensor in ``ggml`` (F32/F16/BF16)."""
    import gguf

    if ggml == "F32":
        return np.ascontiguousarray(x, np.float32), None
    if ggml == "F16":
        return np.ascontiguousarray(x.astype(np.float16)), None
    return gguf.quants.quantize(np.ascontiguousarray(x, np.float32), gguf.GGMLQuantizationType.BF16), \
        gguf.GGMLQuantizationType.BF16


def _requantized(x: np.ndarray, ggml: str):
    """(raw, raw dtype, relative RMS error) of float32 ``x`` (rows, cols) requantized to ``ggml``."""
    import gguf

    t = gguf.GGMLQuantizationType[ggml]
    if ggml in ("F32", "F16", "BF16"):
        data, raw = _float_raw(x, ggml)
        back = np.asarray(data if raw is None else gguf.quants.dequantize(data, t), np.float64)
    else:
        if x.shape[-1] % 32:
            raise ExportError(f"rows of {x.shape[-1]} values are not whole {ggml} blocks of 32; --requantize F32 "
                              "writes such tensors exactly")
        data, raw = gguf.quants.quantize(np.ascontiguousarray(x, np.float32), t), t
        back = np.asarray(gguf.quants.dequantize(data, t), np.float64)
    ref = x.astype(np.float64)
    norm = float(np.sqrt(np.mean(ref ** 2)))
    err = float(np.sqrt(np.mean((back.reshape(ref.shape) - ref) ** 2)))
    return data, raw, (err / norm if norm > 0 else err)


def tensor_table(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """GGUF tensor name -> (our parameter path, kind): the loader's own table, in llama.cpp's order
    (the embedding, each block in turn, the final norm, the head)."""
    import re

    from cascade.models.loaders.gguf import expected_tensors

    def order(name):
        m = re.match(r"blk\.(\d+)\.", name)
        return (1, int(m.group(1))) if m else (0, 0) if name.startswith("token_embd") else (2, 0)

    table = expected_tensors(cfg)
    return {name: table[name] for name in sorted(table, key=order)}


def _rope_heads(name: str, cfg: ModelConfig, permuted: bool):
    from cascade.models.loaders.gguf import _rope_heads

    return _rope_heads(name, cfg, permuted)


def gguf_tensors(model: Model, requantize: str | None = None, progress=None):
    """Yield ``(name, array, raw_dtype, TensorExport)`` for every tensor of ``model`` in GGUF form."""
    import gguf

    from cascade.console import progress_bar

    cfg = model.config
    arch, permuted = GGUF_ARCHITECTURES[cfg.architecture]
    flat = flax.traverse_util.flatten_dict(model.params, sep="/")
    table = tensor_table(cfg)
    extra = sorted(set(flat) - {p for p, _ in table.values()})
    if extra:
        raise ExportError(f"{model.source}: parameter {extra[0]!r} has no GGUF tensor" + (
            " (a reduced-vocabulary model: llama.cpp has no vocab_map)" if "vocab_map" in extra else ""))
    requantize = check_requantize(requantize)
    for name, (param, kind) in progress_bar(table.items(), desc="export gguf", unit="tensor", enabled=progress):
        a = flat[param]
        heads = _rope_heads(name, cfg, permuted)
        where = f"{name} ({param})"
        if isinstance(a, QuantizedTensor):
            spec = a.spec
            ggml = exact_type(spec)
            if kind in ("norm", "bias"):
                ggml = None  # llama.cpp wants them F32: dequantize (exact up to float32)
            axis_ok = a.ndim == 2 and a.axis == (1 if kind == "embed" else 0)
            if ggml is not None and axis_ok:
                try:
                    raw, rounding = _exact_quantized(a, ggml, heads, where)
                except ExportError:
                    if requantize is None:
                        raise
                else:
                    shape = a.shape if kind == "embed" else a.shape[::-1]
                    yield name, raw, gguf.GGMLQuantizationType[ggml], TensorExport(
                        name, param, spec.explicit, ggml, tuple(shape), raw.nbytes, max_min_rounding=rounding)
                    continue
            x = np.asarray(dequantize(a, "float32"))
            if kind in ("norm", "bias"):
                yield name, x.astype(np.float32), None, TensorExport(name, param, spec.explicit, "F32", x.shape, x.nbytes)
                continue
            if requantize is None:
                why = "" if ggml is None else f" (stored along axis {a.axis}, not its reduction axis)"
                raise ExportError(f"{where}: {spec.explicit} has no exact GGUF type{why}; exportable specs: {EXPORTABLE}; "
                                  f"or pass --requantize {{{','.join(REQUANTIZE_TYPES)}}} to convert it")
            x = x if kind == "embed" else x.T
            if heads is not None:
                x = permute_rope_rows(x, heads)
            data, raw, err = _requantized(x, requantize)
            yield name, data, raw, TensorExport(name, param, spec.explicit, requantize, tuple(x.shape), data.nbytes,
                                                requantized=True, rel_rms_error=err)
            continue
        arr = np.asarray(a)
        dtype = str(arr.dtype)
        if dtype not in _FLOAT_TYPES:
            raise ExportError(f"{where}: dtype {dtype} has no GGUF type")
        x = arr.astype(np.float32)
        if kind == "linear":
            x = x.T
        if heads is not None:
            x = permute_rope_rows(x, heads)
        ggml = "F32" if kind in ("norm", "bias") else _FLOAT_TYPES[dtype]
        data, raw = _float_raw(x, ggml)
        yield name, data, raw, TensorExport(name, param, dtype, ggml, tuple(x.shape), data.nbytes)


# ----------------------------------------------------------------------------- metadata


def _config_keys(w, cfg: ModelConfig, arch: str) -> None:
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_vocab_size(cfg.vocab_size)
    rs = cfg.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs.factor))
    if rs is not None and rs.rope_type == "llama3":  # the factors themselves are rope_freqs.weight
        w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings)
    if cfg.sliding_window is not None:
        w.add_sliding_window(cfg.sliding_window)


def rope_freqs(cfg: ModelConfig) -> np.ndarray | None:
    """Llama 3 RoPE scaling as llama.cpp stores it: per-frequency divisors (``rope_freqs.weight``)."""
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type != "llama3":
        return None
    base = np.asarray(rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None)), np.float64)
    scaled = np.asarray(rope_inv_freq(cfg), np.float64)
    return (base / scaled).astype(np.float32)


def _token_types_hf(backend, n):
    from cascade.models.tokenizer import _CONTROL, _NORMAL, _USER_DEFINED

    types = [_NORMAL] * n
    for i, added in backend.get_added_tokens_decoder().items():
        if 0 <= i < n:
            types[i] = _CONTROL if added.special else _USER_DEFINED
    return types


def _bpe_vocab(tok, where):
    """(tokens in id order, types, merges ["a b"]) of a byte-level BPE ``tokenizers`` backend."""
    import json

    backend = tok._backend
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"{where}: a {model.get('type')} tokenizer.json has no GGUF form here "
                          "(byte-level BPE and SentencePiece are exported)")
    vocab = backend.get_vocab(with_added_tokens=True)
    n = tok.vocab_size
    tokens = [None] * n
    for t, i in vocab.items():
        if 0 <= i < n:
            tokens[i] = t
    if any(t is None for t in tokens):
        raise ExportError(f"{where}: the vocabulary's ids are not contiguous 0..{n - 1}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, _token_types_hf(backend, n), merges


def _sentencepiece_vocab(tok):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(tok._backend.serialized_model_proto())
    tokens = [p.piece for p in m.pieces]
    scores = [float(p.score) for p in m.pieces]
    types = [int(p.type) for p in m.pieces]
    ns = m.normalizer_spec
    return tokens, scores, types, m.trainer_spec, bool(ns.add_dummy_prefix), bool(ns.remove_extra_whitespaces)


def tokenizer_metadata(tok, cfg: ModelConfig, where: str = "tokenizer") -> dict:
    """The ``tokenizer.*`` GGUF keys of ``tok`` (plain Python values), checked: the tokenizer rebuilt
    from them (:meth:`Tokenizer.from_gguf_metadata`) encodes :data:`CHECK_TEXTS` exactly as ``tok``.
    Embedding rows past the tokenizer's vocabulary (Qwen2 pads its embedding) get unused ``[PAD<id>]``
    tokens, as llama.cpp's converter writes them.  The model's end-of-generation ids go to
    ``eos_token_id``, ``eot_token_id`` and ``eom_token_id`` in order (at most three: GGUF has no more)."""
    from cascade.models.tokenizer import _GGUF_PRE, _UNUSED, Tokenizer

    if tok is None:
        raise ExportError(f"{where}: the model has no tokenizer, and a GGUF file needs one (pass --tokenizer FILE)")
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"{where}: the tokenizer has {tok.vocab_size:,} tokens but the model only {cfg.vocab_size:,}")
    meta: dict = {}
    eos = list(dict.fromkeys([*cfg.eos_token_ids, *tok.eos_ids]))[:3]
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else tok.bos_id
    if tok.kind == "sentencepiece":
        tokens, scores, types, ts, add_space, remove_ws = _sentencepiece_vocab(tok)
        meta.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                     "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
                     "tokenizer.ggml.add_space_prefix": add_space,
                     "tokenizer.ggml.remove_extra_whitespaces": remove_ws})
        if ts.unk_id >= 0:
            meta["tokenizer.ggml.unknown_token_id"] = int(ts.unk_id)
        if ts.pad_id >= 0:
            meta["tokenizer.ggml.padding_token_id"] = int(ts.pad_id)
        candidates = (None,)
    else:
        tokens, types, merges = _bpe_vocab(tok, where)
        meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                     "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges})
        own = getattr(tok, "gguf_pre", None)
        candidates = tuple(dict.fromkeys(([own] if own in _GGUF_PRE else []) + list(_PRE_CANDIDATES)))
    if bos is not None:
        meta["tokenizer.ggml.bos_token_id"] = int(bos)
    for key, i in zip(("eos", "eot", "eom"), eos):
        meta[f"tokenizer.ggml.{key}_token_id"] = int(i)
    meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    pad = cfg.vocab_size - tok.vocab_size  # embedding rows past the tokenizer (Qwen2): [PAD<id>], unused, as llama.cpp
    if pad:
        meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], *(f"[PAD{i}]" for i in range(tok.vocab_size,
                                                                                                   cfg.vocab_size))]
        meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], *[_UNUSED] * pad]
        if "tokenizer.ggml.scores" in meta:
            meta["tokenizer.ggml.scores"] = [*meta["tokenizer.ggml.scores"], *[-1e9] * pad]
    want = [tok.encode(t, add_bos=False) for t in CHECK_TEXTS]
    for pre in candidates:
        trial = dict(meta) if pre is None else {**meta, "tokenizer.ggml.pre": pre}
        try:
            rebuilt = Tokenizer.from_gguf_metadata(trial, source=where)
        except ValueError:
            continue
        if [rebuilt.encode(t, add_bos=False) for t in CHECK_TEXTS] == want:
            return trial
    tried = "its SentencePiece vocabulary" if candidates == (None,) else f"pre-tokenizers {', '.join(candidates)}"
    raise ExportError(f"{where}: no GGUF tokenizer description encodes like the model's own tokenizer (tried {tried})")


def _add_value(w, key: str, value) -> None:
    import gguf

    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif key == "tokenizer.ggml.scores":
        w.add_array(key, [float(v) for v in value])
    elif key == "tokenizer.ggml.token_type":
        w.add_key_value(key, [int(v) for v in value], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    else:
        w.add_array(key, list(value))


def _file_type(reports: list[TensorExport]) -> str:
    weights: dict[str, int] = {}
    for t in reports:
        if len(t.shape) == 2 and t.name.startswith("blk."):  # as llama.cpp: the embedding and head may differ
            weights[t.type] = weights.get(t.type, 0) + math.prod(t.shape)
    if not weights:
        return "ALL_F32"
    return _FILE_TYPES[max(weights, key=weights.get)]


# ----------------------------------------------------------------------------- the file


def export_gguf(model: Model, path, *, requantize: str | None = None, overwrite: bool = False,
                name: str | None = None, progress=None) -> ExportReport:
    """Write ``model`` as the GGUF file ``path`` (see the module docstring); returns the report.

    Everything is checked before the file is opened (every tensor encoded, the tokenizer rebuilt
    and compared); the file is written beside ``path`` and renamed onto it when complete, so an
    error or an interrupt leaves no file (and an existing ``path`` untouched)."""
    import gguf

    from cascade import __version__

    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ExportError(f"{path}: is a directory; -o names the .gguf file to write")
    if os.path.exists(path) and not overwrite:
        raise ExportError(f"{path}: already exists (pass --overwrite to replace it)")
    if not os.path.isdir(os.path.dirname(path)):
        raise ExportError(f"{os.path.dirname(path)}: no such directory")
    cfg = model.config
    if cfg.architecture not in GGUF_ARCHITECTURES:
        raise ExportError(f"{model.source}: architecture {cfg.architecture} has no GGUF form here "
                          f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    if cfg.vocab_subset is not None:
        raise ExportError(f"{model.source}: a reduced-vocabulary model (vocab_subset {cfg.vocab_subset}) has no "
                          "GGUF form: llama.cpp has no vocab_map")
    arch, _ = GGUF_ARCHITECTURES[cfg.architecture]
    tok_meta = tokenizer_metadata(model.tokenizer, cfg, where=f"{model.source}: tokenizer")
    tensors = list(gguf_tensors(model, requantize, progress=progress))  # every tensor encoded before writing
    reports = [t for *_, t in tensors]
    freqs = rope_freqs(cfg)
    if freqs is not None:
        reports.append(TensorExport("rope_freqs.weight", "rope_scaling", "float32", "F32", freqs.shape, freqs.nbytes))
        tensors.append(("rope_freqs.weight", freqs, None, reports[-1]))
    file_type = _file_type(reports)

    try:
        with files.atomic_path(path) as tmp:
            w = gguf.GGUFWriter(tmp, arch)
            w.add_name(name or os.path.splitext(os.path.basename(path))[0])
            w.add_quantized_by(f"cascade {__version__}")
            w.add_file_type(int(gguf.LlamaFileType[file_type]))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            if model.quant:
                w.add_string("cascade.quant", model.quant)
            if model.ptq and model.ptq.get("method"):
                w.add_string("cascade.method", str(model.ptq["method"]))
            _config_keys(w, cfg, arch)
            for key, value in tok_meta.items():
                _add_value(w, key, value)
            for tname, data, raw, _ in tensors:
                w.add_tensor(tname, data, raw_dtype=raw)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    except OSError as e:
        raise ExportError(str(e)) from None
    tok_info = {"model": tok_meta["tokenizer.ggml.model"], "pre": tok_meta.get("tokenizer.ggml.pre"),
                "tokens": len(tok_meta["tokenizer.ggml.tokens"])}
    return ExportReport(path=path, architecture=arch, file_type=file_type, tensors=reports, tokenizer=tok_info,
                        bytes=os.path.getsize(path))
