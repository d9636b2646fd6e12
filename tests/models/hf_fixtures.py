"""Tiny random Hugging Face checkpoints written with ``transformers`` (CPU torch), for parity tests."""

from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

VARIANTS = {
    # GQA, untied head, Llama 3.1 RoPE scaling, theta != 10000
    "llama3": ("LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=50000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # tied head, attention biases (q/k/v/o)
    "llama-tied-bias": ("LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True)),
    # Mistral with a sliding window shorter than the test sequences
    "mistral": ("MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=8)),
    # Qwen2: q/k/v biases, tied head
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
}


def make_hf_model(kind: str, directory, seed: int = 0, **overrides):
    """Build a random model of ``kind``, save it with ``save_pretrained`` (safetensors), return it."""
    arch, extra = VARIANTS[kind]
    extra = {**extra, **overrides}
    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "MistralForCausalLM": transformers.MistralConfig,
                  "Qwen2ForCausalLM": transformers.Qwen2Config}[arch]
    config = config_cls(**{**TINY, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random biases / norm scales so those code paths matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory), safe_serialization=True)
    return model
