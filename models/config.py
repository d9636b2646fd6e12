"""Model configuration for the Llama family (Llama 2/3, Mistral, Qwen2, llama2.c, GGUF ``llama``).

One frozen dataclass describes every supported decoder; loaders translate their own formats
(Hugging Face ``config.json``, the llama2.c header, GGUF metadata) into it, and an unsupported
architecture or option is a :class:`UnsupportedModelError` that names it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MAX_SIZE = 2**31 - 1  # sizes, token ids and positions are int32 in the model


class UnsupportedModelError(ValueError):
    """The checkpoint asks for an architecture or option this decoder does not implement."""


class ConfigValueError(ValueError):
    """A hyperparameter out of its range (``field``: our name, e.g. ``norm_eps``); loaders add the
    name their format gives it (:meth:`named`)."""

    def __init__(self, field: str, value, need: str):
        self.field, self.value, self.need = field, value, need
        super().__init__(f"model config: {field} must be {need}, got {value!r}")

    def named(self, key: str | None) -> str:
        """The message with the format's own name for the field (``rms_norm_eps = nan: ...``)."""
        if key is None or key == self.field:
            return f"{self.field} must be {self.need}, got {self.value!r}"
        return f"{key} = {self.value!r}: {self.field} must be {self.need}"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _require(ok: bool, field: str, value, need: str) -> None:
    if not ok:
        raise ConfigValueError(field, value, need)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (``rope_type = "llama3"``), or plain ``linear``."""

    rope_type: str  # "llama3" or "linear"
    factor: float  # context extension factor
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / low_freq_factor are scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3: the pre-extension context

    def __post_init__(self):
        _require(self.rope_type in ("llama3", "linear"), "rope_scaling.rope_type", self.rope_type, "'llama3' or 'linear'")
        _require(_is_real(self.factor) and self.factor > 0, "rope_scaling.factor", self.factor, "a finite number > 0")
        if self.rope_type == "llama3":
            for name in ("low_freq_factor", "high_freq_factor"):
                v = getattr(self, name)
                _require(_is_real(v) and v > 0, f"rope_scaling.{name}", v, "a finite number > 0")
            _require(self.high_freq_factor > self.low_freq_factor, "rope_scaling.high_freq_factor",
                     self.high_freq_factor, f"greater than low_freq_factor ({self.low_freq_factor!r})")
            v = self.original_max_position_embeddings
            _require(_is_int(v) and 0 < v <= MAX_SIZE, "rope_scaling.original_max_position_embeddings", v,
                     "a positive integer below 2**31")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    architecture: str = "LlamaForCausalLM"  # Hugging Face class name this config corresponds to
    vocab_size: int  # rows of the token embedding
    dim: int  # hidden size (HF hidden_size)
    hidden_dim: int  # MLP inner size (HF intermediate_size)
    n_layers: int  # decoder blocks
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention when < n_heads)
    head_dim: int  # per-head size (usually dim // n_heads)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: RopeScaling | None = None  # Llama 3 style frequency scaling
    max_seq_len: int = 2048  # positions the model was trained for
    tie_embeddings: bool = False  # LM head shares the token embedding
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2; Llama attention_bias)
    o_bias: bool = False  # output projection has a bias (Llama attention_bias)
    mlp_bias: bool = False  # gate/up/down have biases (Llama mlp_bias)
    sliding_window: int | None = None  # Mistral v0.1: each query sees at most this many keys
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    # a draft that reads and proposes only some of its tokenizer's vocab_size tokens (FR-Spec): the
    # rows of its embedding and head; params["vocab_map"] gives each row's token id, -1 for the one
    # row every other token reads as (its logit is never proposed).  None: all vocab_size tokens.
    vocab_subset: int | None = None

    def __post_init__(self):
        """Every value checked (finite, in range, consistent): each loader builds one of these, so a
        broken config is refused here, whatever its format, before any weight is read."""
        _require(self.architecture in ARCHITECTURES, "architecture", self.architecture, f"one of {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
            v = getattr(self, name)
            _require(_is_int(v) and 0 < v <= MAX_SIZE, name, v, "a positive integer below 2**31")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        _require(_is_real(self.norm_eps) and 0 < self.norm_eps < 1, "norm_eps", self.norm_eps, "a finite number in (0, 1)")
        _require(_is_real(self.rope_theta) and self.rope_theta > 1, "rope_theta", self.rope_theta, "a finite number > 1")
        _require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling), "rope_scaling",
                 self.rope_scaling, "None or a RopeScaling")
        for name in ("tie_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false")
        w = self.sliding_window
        _require(w is None or (_is_int(w) and 0 < w <= MAX_SIZE), "sliding_window", w, "a positive integer or None")
        ids = f"a token id in [0, vocab_size={self.vocab_size})"
        b = self.bos_token_id
        _require(b is None or (_is_int(b) and 0 <= b < self.vocab_size), "bos_token_id", b, ids + " or None")
        if isinstance(self.eos_token_ids, list):  # to_dict() writes a list; the config stays hashable
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        _require(isinstance(self.eos_token_ids, tuple), "eos_token_ids", self.eos_token_ids, "a tuple of token ids")
        for e in self.eos_token_ids:
            _require(_is_int(e) and 0 <= e < self.vocab_size, "eos_token_ids", e, ids)
        v = self.vocab_subset
        _require(v is None or (_is_int(v) and 1 < v <= self.vocab_size), "vocab_subset", v,
                 f"None or an integer in [2, vocab_size={self.vocab_size}]")

    @property
    def rows(self) -> int:
        """Rows of the token embedding (and of the LM head): ``vocab_subset`` or ``vocab_size``."""
        return self.vocab_subset or self.vocab_size

    @property
    def n_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, h, kv = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = d * h + 2 * d * kv + h * d + (h + 2 * kv if self.qkv_bias else 0) + (d if self.o_bias else 0)
        mlp = 3 * d * self.hidden_dim + ((2 * self.hidden_dim + d) if self.mlp_bias else 0)
        head = 0 if self.tie_embeddings else self.rows * d
        return self.rows * d + self.n_layers * (attn + mlp + 2 * d) + d + head

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", (2,)))
        return cls(**d)

    def to_hf_dict(self) -> dict:
        """A Hugging Face ``config.json`` for this model (``LlamaForCausalLM`` unless Qwen2/Mistral)."""
        model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
        out = {
            "architectures": [self.architecture], "model_type": model_type[self.architecture],
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
        }
        if self.architecture == "LlamaForCausalLM":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if self.architecture == "MistralForCausalLM":
            out["sliding_window"] = self.sliding_window
        if self.rope_scaling is not None:
            out["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        if self.vocab_subset is not None:  # cascade's own key (a reduced-vocabulary draft)
            out["vocab_subset"] = self.vocab_subset
        return out


def _get(hf: dict, *names, default=None):
    for n in names:
        if n in hf and hf[n] is not None:
            return hf[n]
    return default


# our field -> its config.json key, for messages
HF_KEYS = {"dim": "hidden_size", "hidden_dim": "intermediate_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
           "max_seq_len": "max_position_embeddings", "eos_token_ids": "eos_token_id",
           "tie_embeddings": "tie_word_embeddings"}


def _int(v, key: str) -> int:
    """A config.json integer (an integral float such as 4096.0 too); anything else names the key."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if not _is_int(v):
        raise ValueError(f"{key} must be an integer, got {v!r}")
    return int(v)


def _num(v, key: str) -> float:
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise ValueError(f"{key} must be a number, got {v!r}")
    return float(v)


def _flag(v, key: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false, got {v!r}")
    return v


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict; anything we do not implement is an error, and
    a value of the wrong type or out of range a ValueError naming its key."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM"}.get(hf.get("model_type"), None)
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: unsupported architecture {arch or hf.get('model_type')!r}; supported: {', '.join(ARCHITECTURES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{source}: unsupported hidden_act {act!r} (the Llama family uses silu)")
    if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: Qwen2 use_sliding_window=true (per-layer sliding window) is not supported")
    try:
        dim = _int(hf["hidden_size"], "hidden_size")
        n_heads = _int(hf["num_attention_heads"], "num_attention_heads")
        head_dim = _get(hf, "head_dim", default=None)
        head_dim = _int(head_dim, "head_dim") if head_dim is not None else dim // n_heads if n_heads > 0 else n_heads
        rope = _rope_scaling_from_hf(hf.get("rope_scaling"), source)
        theta = hf.get("rope_theta")
        if theta is None and isinstance(hf.get("rope_parameters"), dict):  # transformers >= 5 layout
            theta = hf["rope_parameters"].get("rope_theta")
            if rope is None:
                rope = _rope_scaling_from_hf(hf["rope_parameters"], source)
        eos = hf.get("eos_token_id", 2)
        eos = tuple(_int(e, "eos_token_id") for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        llama_bias = arch == "LlamaForCausalLM" and _flag(hf.get("attention_bias", False), "attention_bias")
        window = hf.get("sliding_window") if arch == "MistralForCausalLM" else None
        bos = hf.get("bos_token_id")
        return ModelConfig(
            architecture=arch,
            vocab_size=_int(hf["vocab_size"], "vocab_size"),
            dim=dim,
            hidden_dim=_int(hf["intermediate_size"], "intermediate_size"),
            n_layers=_int(hf["num_hidden_layers"], "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=_int(_get(hf, "num_key_value_heads", default=n_heads), "num_key_value_heads"),
            head_dim=head_dim,
            norm_eps=_num(_get(hf, "rms_norm_eps", default=1e-6), "rms_norm_eps"),
            rope_theta=_num(theta if theta is not None else 10000.0, "rope_theta"),
            rope_scaling=rope,
            max_seq_len=_int(_get(hf, "max_position_embeddings", default=2048), "max_position_embeddings"),
            tie_embeddings=_flag(hf.get("tie_word_embeddings", False), "tie_word_embeddings"),
            qkv_bias=arch == "Qwen2ForCausalLM" or llama_bias,
            o_bias=llama_bias,
            mlp_bias=arch == "LlamaForCausalLM" and _flag(hf.get("mlp_bias", False), "mlp_bias"),
            sliding_window=None if window is None else _int(window, "sliding_window"),
            bos_token_id=None if bos is None else _int(bos, "bos_token_id"),
            eos_token_ids=eos,
            vocab_subset=None if hf.get("vocab_subset") is None else _int(hf["vocab_subset"], "vocab_subset"),
        )
    except ConfigValueError as e:
        raise ValueError(e.named(HF_KEYS.get(e.field, e.field))) from None


def _rope_scaling_from_hf(rs, source) -> RopeScaling | None:
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"rope_scaling must be an object, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(rope_type="llama3", factor=_num(rs["factor"], "rope_scaling.factor"),
                           low_freq_factor=_num(rs.get("low_freq_factor", 1.0), "rope_scaling.low_freq_factor"),
                           high_freq_factor=_num(rs.get("high_freq_factor", 4.0), "rope_scaling.high_freq_factor"),
                           original_max_position_embeddings=_int(rs.get("original_max_position_embeddings", 8192),
                                                                 "rope_scaling.original_max_position_embeddings"))
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=_num(rs["factor"], "rope_scaling.factor"))
    raise UnsupportedModelError(f"{source}: unsupported rope_scaling type {kind!r} (supported: llama3, linear)")


def rope_inv_freq(cfg: ModelConfig):
    """Inverse RoPE frequencies (head_dim // 2,) in float64, with Llama 3 scaling if configured.

    Llama 3.1 (Meta's ``apply_scaling``): wavelengths longer than ``original / low_freq_factor``
    are divided by ``factor``; shorter than ``original / high_freq_factor`` are kept; in between
    they are blended smoothly.
    """
    import numpy as np

    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return inv / rs.factor
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    wl = 2 * math.pi / inv
    smooth = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    mid = (1 - smooth) * inv / rs.factor + smooth * inv
    return np.where(wl > low_wl, inv / rs.factor, np.where(wl < high_wl, inv, mid))


def load_hf_config(path) -> ModelConfig:
    with open(path, encoding="utf-8") as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        return config_from_hf(hf, str(path))
    except UnsupportedModelError:
        raise
    except KeyError as e:
        raise ValueError(f"{path}: missing required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad value in config ({' '.join(str(e).split())})") from None
