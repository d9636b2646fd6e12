"""Model configuration for the Llama family (Llama 2/3, Mistral, Qwen2, llama2.c, GGUF ``llama``).

One frozen dataclass describes every supported decoder; loaders translate their own formats
(Hugging Face ``config.json``, the llama2.c header, GGUF metadata) into it, and an unsupported
architecture or option is a :class:`UnsupportedModelError` that names it.
"""

from __future__ import annotations

import dataclasses
import json
import math

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class UnsupportedModelError(ValueError):
    """The checkpoint asks for an architecture or option this decoder does not implement."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (``rope_type = "llama3"``), or plain ``linear``."""

    rope_type: str  # "llama3" or "linear"
    factor: float  # context extension factor
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / low_freq_factor are scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3: the pre-extension context


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

    def __post_init__(self):
        for name in ("vocab_size", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"model config: {name} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"model config: sliding_window must be positive, got {self.sliding_window}")

    @property
    def n_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, h, kv = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = d * h + 2 * d * kv + h * d + (h + 2 * kv if self.qkv_bias else 0) + (d if self.o_bias else 0)
        mlp = 3 * d * self.hidden_dim + ((2 * self.hidden_dim + d) if self.mlp_bias else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * (attn + mlp + 2 * d) + d + head

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
        return out


def _get(hf: dict, *names, default=None):
    for n in names:
        if n in hf and hf[n] is not None:
            return hf[n]
    return default


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict; anything we do not implement is an error."""
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
    dim = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    head_dim = _get(hf, "head_dim", default=None) or dim // n_heads
    rope = _rope_scaling_from_hf(hf.get("rope_scaling"), source)
    theta = hf.get("rope_theta")
    if theta is None and isinstance(hf.get("rope_parameters"), dict):  # transformers >= 5 layout
        theta = hf["rope_parameters"].get("rope_theta")
        if rope is None:
            rope = _rope_scaling_from_hf(hf["rope_parameters"], source)
    eos = hf.get("eos_token_id", 2)
    eos = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    llama_bias = arch == "LlamaForCausalLM" and bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window") if arch == "MistralForCausalLM" else None
    return ModelConfig(
        architecture=arch,
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        hidden_dim=int(hf["intermediate_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(_get(hf, "num_key_value_heads", default=n_heads)),
        head_dim=int(head_dim),
        norm_eps=float(_get(hf, "rms_norm_eps", default=1e-6)),
        rope_theta=float(theta if theta is not None else 10000.0),
        rope_scaling=rope,
        max_seq_len=int(_get(hf, "max_position_embeddings", default=2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or llama_bias,
        o_bias=llama_bias,
        mlp_bias=arch == "LlamaForCausalLM" and bool(hf.get("mlp_bias", False)),
        sliding_window=int(window) if window else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
    )


def _rope_scaling_from_hf(rs, source) -> RopeScaling | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(rope_type="llama3", factor=float(rs["factor"]),
                           low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                           high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                           original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)))
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(rs["factor"]))
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
