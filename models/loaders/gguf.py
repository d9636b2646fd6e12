"""GGUF (llama.cpp) checkpoints: read and validate the file, translate it to a :class:`Model`.

* :func:`read_gguf` parses the header with the ``gguf`` package (``gguf.GGUFReader``) and checks
  what that reader leaves unchecked: magic and version, every tensor's ggml type, that its row
  length is a whole number of blocks, that its data offset is aligned, and that its data lies
  inside the file (a truncated file is an error naming the first tensor that runs past the end).
* :func:`config_from_gguf` maps ``general.architecture = llama`` (and ``qwen2``) metadata to a
  :class:`ModelConfig`; anything the decoder does not implement is an :class:`UnsupportedModelError`.
* :func:`load_gguf` maps llama.cpp tensor names to the :mod:`cascade.models.llama` parameter tree.

Layout.  GGUF lists dims fastest-first, so an ``(out, in)`` Hugging Face weight has GGUF dims
``[in, out]``; we report shapes in numpy (row-major) order, ``(out, in)``, and transpose kernels
to ``(in, out)``.  llama.cpp's converter permutes the Q and K rows (weights and biases) of
``llama`` models for ggml's adjacent-pair RoPE; we undo that with
:func:`cascade.models.llama.unpermute_rope_rows` (``qwen2`` files are stored unpermuted, rotate-half).

Quantized weights are imported without requantizing (``dequantize=False``): ggml blocks of 32
run along ``in``, exactly our groups along the reduction axis, so

* ``Q8_0`` (fp16 ``d``, 32 int8 ``q``; ``x = d*q``)           -> ``int8-g32``, scale ``d``
* ``Q4_0`` (fp16 ``d``, 32 nibbles ``q``; ``x = d*(q-8)``)    -> ``int4-g32``, codes ``q-8``, scale ``d``
* ``Q4_1`` (fp16 ``d``, fp16 ``m``, nibbles; ``x = d*q + m``) -> ``int4-g32-asym``, codes ``q``,
  scale ``d`` (float16), zero ``z = -m/d`` (float32; ``float16(-z*d) == m`` for every block).
  A block with ``d == 0`` (all values equal ``m``) is stored as codes 0, scale 1, zero ``-m``.

Q8_0 and Q4_0 dequantize bit-exactly as ``gguf.quants.dequantize`` does; Q4_1 to float32
rounding.  Linear weights become :class:`cascade.quant.QuantizedTensor` of shape ``(in, out)`` along
axis 0; the token embedding stays ``(vocab, dim)`` quantized along axis 1 (a tied head reuses
it).  Every other type (F16, BF16, Q5_x, K-quants, I-quants, ...) is dequantized to float32 with
``gguf.quants.dequantize`` (with a warning for the lossy quantized ones); ``dequantize=True``
makes every tensor float32.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections import Counter
from typing import Any

import flax
import gguf
import jax.numpy as jnp
import numpy as np

from cascade.models.config import ConfigValueError, ModelConfig, RopeScaling, UnsupportedModelError, rope_inv_freq
from cascade.models.llama import param_shapes, unpermute_rope_rows
from cascade.models.model import Model
from cascade.quant.packing import pack_codes
from cascade.quant.qtensor import QuantizedTensor
from cascade.quant.spec import parse_spec

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4

# general.architecture -> (Hugging Face class, whether Q/K rows are stored permuted for ggml's
# adjacent-pair RoPE).  llama.cpp's converter writes Mistral 7B-style models as "llama"; qwen2
# uses ggml's NEOX (rotate-half) RoPE and is stored unpermuted.
ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}

# ggml types imported as QuantizedTensor without requantizing: type -> our precision spec
IMPORTED_TYPES = {"Q8_0": "int8-g32", "Q4_0": "int4-g32", "Q4_1": "int4-g32-asym"}
_FLOAT_TYPES = ("F32", "F16", "F64")

# llama.cpp per-layer tensor name -> (our module path inside layers_{i}, kind)
_LAYER_TENSORS = {
    "attn_q": ("attn/q_proj", "linear"), "attn_k": ("attn/k_proj", "linear"),
    "attn_v": ("attn/v_proj", "linear"), "attn_output": ("attn/o_proj", "linear"),
    "ffn_gate": ("mlp/gate_proj", "linear"), "ffn_up": ("mlp/up_proj", "linear"),
    "ffn_down": ("mlp/down_proj", "linear"),
    "attn_norm": ("attn_norm", "norm"), "ffn_norm": ("mlp_norm", "norm"),
}


class _HeaderError(ValueError):
    """A GGUF structural problem found while the reader parses; the message is complete."""


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type: str  # ggml type name: "F32", "F16", "Q4_1", "Q6_K", ...
    shape: tuple[int, ...]  # numpy (row-major) order: the GGUF dims reversed, e.g. (out, in)
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclasses.dataclass
class GGUFFile:
    path: str
    version: int
    alignment: int
    metadata: dict[str, Any]  # key -> Python value (strings decoded, arrays as lists)
    tensors: dict[str, GGUFTensorInfo]  # in file order
    _data: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def tensor_data(self, name: str) -> np.ndarray:
        """The tensor as stored (a read-only view of the file): F32/F16/F64 as floats of
        ``info.shape``; block types as uint8 ``(*shape[:-1], bytes per row)``."""
        return self._data[name]


class _CheckedReader(gguf.GGUFReader):
    """``gguf.GGUFReader`` with bounds-checked reads (a truncated header is an error, not a
    silently short array) and tensor checks that name the tensor before the reader maps it.
    It overrides two internal hooks of the reader (``_get``, ``_build_tensors``; gguf 0.17-0.19)."""

    def __init__(self, path):
        self._path = str(path)
        super().__init__(path)

    def _get(self, offset, dtype, count=1, override_order=None):
        # A plain ndarray view: slicing np.memmap is several times slower on big vocabularies.
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        end = int(offset) + np.dtype(dtype).itemsize * count
        if end > plain.shape[0]:
            raise _HeaderError(f"{self._path}: truncated GGUF file: the header needs bytes up to {end} "
                               f"but the file has {plain.shape[0]}")
        arr = plain[int(offset):end].view(dtype)
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _build_tensors(self, start_offs, fields):
        size = self.data.shape[0]
        for field in fields:
            _, name_data, n_dims, dims, raw_type, rel_offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            where = f"{self._path}: tensor {name!r}"
            try:
                qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
            except ValueError:
                raise _HeaderError(f"{where}: unknown ggml type id {int(raw_type[0])}") from None
            if qtype not in gguf.GGML_QUANT_SIZES:
                raise _HeaderError(f"{where}: ggml type {qtype.name} has no known block size")
            dims_l = [int(d) for d in dims]
            if not 1 <= int(n_dims[0]) <= GGML_MAX_DIMS:
                raise _HeaderError(f"{where}: {int(n_dims[0])} dims (GGUF allows 1 to {GGML_MAX_DIMS})")
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if dims_l[0] % block:
                raise _HeaderError(f"{where}: row length {dims_l[0]} (GGUF dims {dims_l}) is not a multiple of "
                                   f"the {qtype.name} block size {block}")
            nbytes = math.prod(dims_l) // block * type_size
            start = int(start_offs) + int(rel_offset[0])
            if int(rel_offset[0]) % self.alignment:
                raise _HeaderError(f"{where}: data offset {int(rel_offset[0])} is not a multiple of the "
                                   f"alignment {self.alignment}")
            if start + nbytes > size:
                raise _HeaderError(f"{where}: data [{start}, {start + nbytes}) runs past the end of the file "
                                   f"({size} bytes); the file is truncated")
        super()._build_tensors(start_offs, fields)


def read_gguf(path) -> GGUFFile:
    """Parse and validate a GGUF file (metadata and tensor directory; data stays memory-mapped)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; expected a .gguf file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0 and int.from_bytes(head[4:8], "big") in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: unsupported GGUF version {version} (supported: "
                         f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    try:
        reader = _CheckedReader(path)
    except _HeaderError:
        raise
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError/UnicodeError on bad headers
        raise ValueError(f"{path}: malformed GGUF file ({type(e).__name__}: {' '.join(str(e).split())})") from None

    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's pseudo-fields (version, counts)
            continue
        try:
            metadata[key] = field.contents()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: metadata key {key!r} holds a string that is not valid UTF-8") from None
    tensors, data = {}, {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensorInfo(name=t.name, type=t.tensor_type.name, shape=shape,
                                         offset=int(t.data_offset), nbytes=int(t.n_bytes))
        data[t.name] = t.data
    size = reader.data.shape[0]
    for info in tensors.values():  # also checked before the reader maps the data; kept as a guard
        if info.offset + info.nbytes > size:
            raise ValueError(f"{path}: tensor {info.name!r} runs past the end of the file; the file is truncated")
    return GGUFFile(path=path, version=version, alignment=int(reader.alignment), metadata=metadata,
                    tensors=tensors, _data=data)


# ----------------------------------------------------------------------------- config


def _f32(x) -> float:
    """A float32 metadata value as its shortest float32 decimal (1e-05, not 9.999999747e-06);
    a value that is not a float32 (a FLOAT64 key) is kept as it is."""
    x = float(x)
    return float(str(np.float32(x))) if math.isfinite(x) and float(np.float32(x)) == x else x


def config_from_gguf(meta, source: str = "<gguf>", tensor_names=None) -> ModelConfig:
    """Translate GGUF metadata to a :class:`ModelConfig`.

    ``meta`` is the metadata dict (or a :class:`GGUFFile`, which also supplies ``tensor_names``).
    ``tensor_names`` decides what the metadata does not say: a tied head (no ``output.weight``)
    and Llama attention / MLP biases; without it the head is untied and there are no Llama biases.
    """
    if isinstance(meta, GGUFFile):
        tensor_names = meta.tensors if tensor_names is None else tensor_names
        meta = meta.metadata
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        hint = " (llama.cpp stores Mistral 7B-style models as 'llama')" if str(arch).startswith("mistral") else ""
        raise UnsupportedModelError(f"{source}: unsupported GGUF architecture {arch!r}{hint}; "
                                    f"supported: {', '.join(ARCHITECTURES)}")
    hf_arch, _ = ARCHITECTURES[arch]
    names = set(tensor_names) if tensor_names is not None else None

    def get(key, kind=int, default=None, required=False):
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise ValueError(f"{source}: missing required metadata key {full!r}")
            return default
        v = meta[full]
        if kind is int and isinstance(v, list):  # per-layer arrays (e.g. head_count): must be uniform
            if not v or any(x != v[0] for x in v):
                raise UnsupportedModelError(f"{source}: {full} varies per layer ({v[:8]}...); not supported")
            v = v[0]
        ok = (isinstance(v, int) and not isinstance(v, bool)) if kind is int else \
            (isinstance(v, (int, float)) and not isinstance(v, bool)) if kind is float else isinstance(v, kind)
        if not ok:
            raise ValueError(f"{source}: metadata key {full!r} should be {kind.__name__}, got {v!r}")
        return v

    if get("expert_count", default=0):
        raise UnsupportedModelError(f"{source}: mixture-of-experts GGUF ({arch}.expert_count = "
                                    f"{get('expert_count')}) is not supported")
    dim = get("embedding_length", required=True)
    n_heads = get("attention.head_count", required=True)
    n_kv = get("attention.head_count_kv", default=n_heads)
    if n_heads <= 0 or (dim % n_heads and get("attention.key_length") is None):
        raise ValueError(f"{source}: embedding_length {dim} is not a multiple of head_count {n_heads}")
    head_dim = get("attention.key_length", default=dim // n_heads if n_heads else 0)
    v_len = get("attention.value_length", default=head_dim)
    if v_len != head_dim:
        raise UnsupportedModelError(f"{source}: value_length {v_len} != key_length {head_dim} is not supported")
    rope_dims = get("rope.dimension_count", default=head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(f"{source}: partial RoPE ({arch}.rope.dimension_count = {rope_dims}, "
                                    f"head_dim = {head_dim}) is not supported")
    try:
        rope_scaling = _rope_scaling(arch, get, source)
    except ConfigValueError as e:
        raise ValueError(f"{source}: {e} ({arch}.rope.scaling.factor)") from None
    vocab = get("vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ValueError(f"{source}: no {arch}.vocab_size and no tokenizer.ggml.tokens to take it from")
        vocab = len(tokens)
    window = None
    if arch == "llama" and get("attention.sliding_window") is not None:
        window = get("attention.sliding_window")
        hf_arch = "MistralForCausalLM"
    has = (lambda n: n in names) if names is not None else (lambda n: False)
    llama_like = arch == "llama"

    def token_id(key):  # llama.cpp ignores special-token ids outside the vocabulary
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab else None

    fields = dict(
        architecture=hf_arch,
        vocab_size=vocab,
        dim=dim,
        hidden_dim=get("feed_forward_length", required=True),
        n_layers=get("block_count", required=True),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon", float, required=True)),
        rope_theta=_f32(get("rope.freq_base", float, default=10000.0)),
        rope_scaling=rope_scaling,
        max_seq_len=get("context_length", required=True),
        tie_embeddings=names is not None and "output.weight" not in names,
        qkv_bias=not llama_like or has("blk.0.attn_q.bias"),
        o_bias=llama_like and has("blk.0.attn_output.bias"),
        mlp_bias=llama_like and has("blk.0.ffn_up.bias"),
        sliding_window=window,
        bos_token_id=token_id("bos"),
        eos_token_ids=tuple(dict.fromkeys(i for i in map(token_id, ("eos", "eot", "eom")) if i is not None)),
    )
    try:
        return ModelConfig(**fields)
    except ConfigValueError as e:  # a value out of range: name the metadata key it came from
        key = _GGUF_KEYS.get(e.field)
        raise ValueError(f"{source}: {e}" + (f" ({arch}.{key})" if key else "")) from None
    except ValueError as e:  # ModelConfig's own checks (e.g. n_heads not a multiple of n_kv_heads)
        raise ValueError(f"{source}: {e}") from None


# our ModelConfig field -> its GGUF metadata key (after "<arch>."), for messages
_GGUF_KEYS = {"vocab_size": "vocab_size", "dim": "embedding_length", "hidden_dim": "feed_forward_length",
              "n_layers": "block_count", "n_heads": "attention.head_count", "n_kv_heads": "attention.head_count_kv",
              "head_dim": "attention.key_length", "norm_eps": "attention.layer_norm_rms_epsilon",
              "rope_theta": "rope.freq_base", "max_seq_len": "context_length",
              "sliding_window": "attention.sliding_window", "rope_scaling.factor": "rope.scaling.factor"}


def _rope_scaling(arch, get, source) -> RopeScaling | None:
    kind = get("rope.scaling.type", str, default=None)
    factor = get("rope.scaling.factor", float, default=None)
    legacy = get("rope.scale_linear", float, default=None)  # pre-2024 llama.cpp key
    if kind in (None, "none"):
        if legacy is not None and legacy != 1.0:
            return RopeScaling(rope_type="linear", factor=_f32(legacy))
        return None
    if kind == "linear":
        factor = factor if factor is not None else legacy
        if factor is None or factor <= 0:
            raise ValueError(f"{source}: linear RoPE scaling needs a positive {arch}.rope.scaling.factor, got {factor!r}")
        return RopeScaling(rope_type="linear", factor=_f32(factor))
    raise UnsupportedModelError(f"{source}: unsupported RoPE scaling type {kind!r} ({arch}.rope.scaling.type); "
                                "supported: none, linear")


def _llama3_from_rope_freqs(cfg: ModelConfig, freqs: np.ndarray, meta, source) -> RopeScaling | None:
    """``rope_freqs.weight`` holds per-frequency divisors (llama.cpp's form of Llama 3.1 scaling).
    All ones is no scaling; otherwise it must match Llama 3 scaling with the standard low/high
    frequency factors (1, 4), or the model is unsupported."""
    freqs = np.asarray(freqs, np.float64).reshape(-1)
    if freqs.shape != (cfg.head_dim // 2,):
        raise ValueError(f"{source}: tensor 'rope_freqs.weight' has {freqs.size} values, expected {cfg.head_dim // 2}")
    if np.all(freqs == 1.0):
        return None
    if not (freqs > 0).all():
        raise ValueError(f"{source}: tensor 'rope_freqs.weight' holds RoPE frequency factors <= 0 "
                         f"(min {freqs.min():g}); they must be positive")
    if cfg.rope_scaling is not None:
        raise UnsupportedModelError(f"{source}: rope_freqs.weight together with {cfg.rope_scaling.rope_type} "
                                    "RoPE scaling is not supported")
    base = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    target = base / freqs
    orig = meta.get("llama.rope.scaling.original_context_length")
    for original in dict.fromkeys([orig if isinstance(orig, int) else 8192, 8192]):
        rs = RopeScaling(rope_type="llama3", factor=_f32(freqs.max()), low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=original)
        if np.allclose(rope_inv_freq(dataclasses.replace(cfg, rope_scaling=rs)), target, rtol=1e-5, atol=0):
            return rs
    raise UnsupportedModelError(f"{source}: tensor 'rope_freqs.weight' holds RoPE frequency factors that do not "
                                "match Llama 3 scaling (low_freq_factor 1, high_freq_factor 4); not supported")


# ----------------------------------------------------------------------------- tensors


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """llama.cpp tensor name -> (our parameter path, kind) for every parameter of ``cfg``.
    Kinds: "embed" (vocab, dim), "linear" (stored (out, in) -> kernel (in, out)), "bias", "norm"."""
    out = {"token_embd.weight": ("embed/embedding", "embed"), "output_norm.weight": ("final_norm/scale", "norm")}
    if not cfg.tie_embeddings:
        out["output.weight"] = ("lm_head/kernel", "linear")
    biases = {"attn_q": cfg.qkv_bias, "attn_k": cfg.qkv_bias, "attn_v": cfg.qkv_bias, "attn_output": cfg.o_bias,
              "ffn_gate": cfg.mlp_bias, "ffn_up": cfg.mlp_bias, "ffn_down": cfg.mlp_bias}
    for i in range(cfg.n_layers):
        for short, (module, kind) in _LAYER_TENSORS.items():
            if kind == "norm":
                out[f"blk.{i}.{short}.weight"] = (f"layers_{i}/{module}/scale", "norm")
                continue
            out[f"blk.{i}.{short}.weight"] = (f"layers_{i}/{module}/kernel", "linear")
            if biases[short]:
                out[f"blk.{i}.{short}.bias"] = (f"layers_{i}/{module}/bias", "bias")
    return out


def _rope_heads(name: str, cfg: ModelConfig, permuted: bool) -> int | None:
    """Heads whose rows to unpermute for this tensor (Q: n_heads, K: n_kv_heads), or None."""
    if not permuted:
        return None
    m = re.fullmatch(r"blk\.\d+\.attn_([qk])\.(weight|bias)", name)
    if not m:
        return None
    return cfg.n_heads if m.group(1) == "q" else cfg.n_kv_heads


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """Two bytes at ``start`` of every block, as float16 (blocks on the last axis)."""
    return np.ascontiguousarray(raw[..., start:start + 2]).view(np.float16)[..., 0]


def _decode_blocks(raw: np.ndarray, ggml_type: str, rows: int, cols: int):
    """Storage codes (rows, cols) uint8 in our convention, scale (rows, nb) float16, zero or None.

    Storage codes are the unsigned codes our packing stores: Q8_0 ``q + 128``, Q4_0 the raw
    nibble (``(q - 8) + 8``), Q4_1 the raw nibble.  ggml nibble order: byte j of a block holds
    element j (low nibble) and element j + 16 (high nibble).
    """
    nb = cols // 32
    bytes_per_block = raw.shape[-1] // nb
    blocks = raw.reshape(rows, nb, bytes_per_block)
    d = _f16(blocks, 0)
    if ggml_type == "Q8_0":
        codes = blocks[..., 2:34] ^ np.uint8(0x80)  # int8 two's complement + 128 == flip the sign bit
        return codes.reshape(rows, cols), d, None
    qs = blocks[..., 2:18] if ggml_type == "Q4_0" else blocks[..., 4:20]
    codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)  # (rows, nb, 32)
    m = _f16(blocks, 2) if ggml_type == "Q4_1" else None
    return codes.reshape(rows, cols), d, m


def _import_quantized(raw, info: GGUFTensorInfo, kind, heads, where) -> QuantizedTensor | None:
    """A Q8_0 / Q4_0 / Q4_1 tensor as a QuantizedTensor (no requantization); None if a Q4_1 block
    minimum would not be recoverable exactly (the caller then dequantizes)."""
    spec = parse_spec(IMPORTED_TYPES[info.type])
    rows, cols = info.shape
    codes, d, m = _decode_blocks(raw, info.type, rows, cols)
    bad = ~np.isfinite(d) if m is None else ~(np.isfinite(d) & np.isfinite(m))
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} block(s) with a NaN/Inf scale or minimum")
    zero = None
    scale = d
    if m is not None:  # Q4_1: x = d*q + m = (q - z) * d with z = -m/d
        dead = d == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = (-(m.astype(np.float64) / d.astype(np.float64))).astype(np.float32)
        if dead.any():  # all values equal m: codes 0, scale 1, zero -m is exact
            scale = np.where(dead, np.float16(1), d)
            zero = np.where(dead, -m.astype(np.float32), zero)
            codes = np.where(np.repeat(dead, 32, axis=1), np.uint8(0), codes)
        recovered = (-(zero.astype(np.float64) * scale.astype(np.float64))).astype(np.float16)
        if not np.array_equal(recovered, m):  # cannot happen for finite blocks; kept as a guard
            return None
    if heads is not None:
        codes, scale = unpermute_rope_rows(codes, heads), unpermute_rope_rows(scale, heads)
        zero = None if zero is None else unpermute_rope_rows(zero, heads)
    if kind == "linear":  # (out, in) -> kernel (in, out), groups along axis 0
        codes, scale, zero = codes.T, scale.T, None if zero is None else zero.T
        shape, axis = (cols, rows), 0
    else:  # embedding (vocab, dim), groups along the model dim
        shape, axis = (rows, cols), 1
    packed = pack_codes(jnp.asarray(np.ascontiguousarray(codes)), spec.bits, axis)
    return QuantizedTensor(packed, jnp.asarray(np.ascontiguousarray(scale), jnp.float16),
                           None if zero is None else jnp.asarray(np.ascontiguousarray(zero), jnp.float32),
                           spec=spec, shape=shape, axis=axis, dtype="float32")


def _to_float32(raw, info: GGUFTensorInfo, where) -> np.ndarray:
    if info.type in _FLOAT_TYPES:
        x = np.asarray(raw).astype(np.float32)
    else:
        if info.type.startswith("I"):  # I8/I16/I32/I64: not weights
            raise UnsupportedModelError(f"{where}: integer tensor type {info.type} is not supported for weights")
        try:
            x = gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType[info.type])
        except NotImplementedError:
            raise UnsupportedModelError(f"{where}: ggml type {info.type} cannot be dequantized "
                                        f"(gguf {getattr(gguf, '__version__', '')} has no numpy implementation)") from None
        x = np.asarray(x, np.float32).reshape(info.shape)
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: {int((~np.isfinite(x)).sum())} NaN/Inf value(s)")
    return x


def _convert(f: GGUFFile, name: str, kind: str, heads, dequantize: bool, lossy: Counter):
    info = f.tensors[name]
    where = f"{f.path}: tensor {name!r}"
    raw = f.tensor_data(name)
    if not dequantize and info.type in IMPORTED_TYPES and kind in ("linear", "embed"):
        qt = _import_quantized(raw, info, kind, heads, where)
        if qt is not None:
            return qt
        warnings.warn(f"{where}: {info.type} blocks not exactly representable; dequantized to float32", stacklevel=3)
    elif not dequantize and info.type not in _FLOAT_TYPES + ("BF16",):
        lossy[info.type] += 1
    x = _to_float32(raw, info, where)
    if heads is not None:
        x = unpermute_rope_rows(x, heads)
    if kind == "linear":
        x = x.T
    return jnp.asarray(np.ascontiguousarray(x), jnp.float32)


def load_gguf(path, *, dequantize: bool = False, tokenizer: bool = True):
    """Load a llama-architecture GGUF file as a :class:`cascade.models.model.Model` (format ``"gguf"``).

    Q8_0 / Q4_0 / Q4_1 weights become :class:`cascade.quant.QuantizedTensor` without requantizing
    (``dequantize=False``); everything else is float32.  All-or-nothing: every tensor is checked
    and converted before the model is returned.  ``tokenizer``: read the embedded tokenizer (a
    file without ``tokenizer.ggml.model`` has none: the model's tokenizer is None).
    """
    path = os.fspath(path)
    f = read_gguf(path)
    cfg = config_from_gguf(f.metadata, source=path, tensor_names=f.tensors)
    _, permuted = ARCHITECTURES[f.metadata["general.architecture"]]
    expected = expected_tensors(cfg)
    shapes = param_shapes(cfg)
    assert set(shapes) == {p for p, _ in expected.values()}, "tensor table out of sync with models.llama"

    for name, info in f.tensors.items():
        if name not in expected and name != "rope_freqs.weight":
            raise UnsupportedModelError(f"{path}: unexpected tensor {name!r} ({info.type}, shape {info.shape}); "
                                        f"it is not part of the {cfg.architecture} decoder this loader implements")
    missing = [n for n in expected if n not in f.tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{path}: missing tensor {missing[0]!r} (for {expected[missing[0]][0]}){more}")
    for name, (param, kind) in expected.items():
        info = f.tensors[name]
        want = shapes[param]
        got = info.shape[::-1] if kind == "linear" else info.shape
        if got != want:
            stored = want[::-1] if kind == "linear" else want
            raise ValueError(f"{path}: tensor {name!r} has shape {info.shape} (numpy order; GGUF dims "
                             f"{list(info.shape[::-1])}), expected {stored} for {param}")

    if "rope_freqs.weight" in f.tensors:
        info = f.tensors["rope_freqs.weight"]
        freqs = _to_float32(f.tensor_data("rope_freqs.weight"), info, f"{path}: tensor 'rope_freqs.weight'")
        rs = _llama3_from_rope_freqs(cfg, freqs, f.metadata, path)
        if rs is not None:
            cfg = dataclasses.replace(cfg, rope_scaling=rs)

    lossy: Counter = Counter()
    flat = {param: _convert(f, name, kind, _rope_heads(name, cfg, permuted), dequantize, lossy)
            for name, (param, kind) in expected.items()}
    if lossy:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(lossy.items()))
        warnings.warn(f"{path}: {sum(lossy.values())} tensor(s) in types without a lossless import ({kinds}) "
                      "were dequantized to float32", stacklevel=2)
    params = flax.traverse_util.unflatten_dict(flat, sep="/")

    tok = None
    if tokenizer and "tokenizer.ggml.model" in f.metadata:
        from cascade.models.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf_metadata(f.metadata, source=path)
    return Model(config=cfg, params=params, tokenizer=tok, source=path, format="gguf", quant=None)
