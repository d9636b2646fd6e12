"""llama2.c checkpoints (Karpathy's ``run.c`` "legacy" version-0 format) with a SentencePiece
``tokenizer.model``.

Header: 7 little-endian int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len`` (negative ``vocab_size``: an unshared classifier follows the weights), then float32
arrays in PyTorch ``(out, in)`` layout, each kind for all layers together: token embedding,
rms_att, wq, wk, wv, wo, rms_ffn, w1 (gate), w2 (down), w3 (up), rms_final, freq_cis real and
imag (``seq_len x head_dim/2`` each, skipped: RoPE is recomputed), [wcls].

llama2.c applies RoPE to interleaved pairs (2i, 2i+1), as Meta's code does; q and k rows are
permuted here to the rotate-half layout of our (Hugging Face) model.
"""

from __future__ import annotations

import os

import numpy as np

from cascade.models.config import ModelConfig
from cascade.models.llama import unpermute_rope_rows
from cascade.models.loaders.common import build_params, linear_from_torch
from cascade.models.model import Model

HEADER_BYTES = 7 * 4


def read_header(path) -> tuple[ModelConfig, bool]:
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path}: too short for a llama2.c header ({len(raw)} bytes)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(v) for v in np.frombuffer(raw, "<i4"))
    shared = vocab > 0
    if min(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len) <= 0 or dim % n_heads or n_heads % n_kv:
        raise ValueError(f"{path}: not a llama2.c checkpoint (implausible header "
                         f"dim={dim} hidden_dim={hidden} n_layers={n_layers} n_heads={n_heads} n_kv_heads={n_kv} "
                         f"vocab_size={vocab} seq_len={seq_len})")
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=abs(vocab), dim=dim, hidden_dim=hidden,
                      n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=dim // n_heads,
                      norm_eps=1e-5, rope_theta=10000.0, max_seq_len=seq_len, tie_embeddings=shared,
                      bos_token_id=1, eos_token_ids=(2,))
    return cfg, shared


def _layout(cfg: ModelConfig, shared: bool):
    """(name, shape) of every stored array, in file order."""
    d, h, L, kv = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_kv_heads * cfg.head_dim
    half = cfg.head_dim // 2
    out = [("token_embedding", (cfg.vocab_size, d)), ("rms_att", (L, d)), ("wq", (L, d, d)), ("wk", (L, kv, d)),
           ("wv", (L, kv, d)), ("wo", (L, d, d)), ("rms_ffn", (L, d)), ("w1", (L, h, d)), ("w2", (L, d, h)),
           ("w3", (L, h, d)), ("rms_final", (d,)), ("freq_cis_real", (cfg.max_seq_len, half)),
           ("freq_cis_imag", (cfg.max_seq_len, half))]
    if not shared:
        out.append(("wcls", (cfg.vocab_size, d)))
    return out


def load_llama2c(path, *, tokenizer_path=None) -> Model:
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    cfg, shared = read_header(path)
    layout = _layout(cfg, shared)
    n_floats = sum(int(np.prod(s)) for _, s in layout)
    size = os.path.getsize(path)
    want = HEADER_BYTES + 4 * n_floats
    if size != want:
        what = "truncated" if size < want else "longer than its header implies"
        raise ValueError(f"{path}: file is {what} ({size} bytes; the header implies {want})")
    data = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES)
    arrays, at = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        arrays[name] = data[at:at + n].reshape(shape)
        at += n
    flat = {"embed/embedding": arrays["token_embedding"], "final_norm/scale": arrays["rms_final"]}
    for i in range(cfg.n_layers):
        p = f"layers_{i}"
        flat[f"{p}/attn_norm/scale"] = arrays["rms_att"][i]
        flat[f"{p}/mlp_norm/scale"] = arrays["rms_ffn"][i]
        flat[f"{p}/attn/q_proj/kernel"] = linear_from_torch(unpermute_rope_rows(arrays["wq"][i], cfg.n_heads))
        flat[f"{p}/attn/k_proj/kernel"] = linear_from_torch(unpermute_rope_rows(arrays["wk"][i], cfg.n_kv_heads))
        flat[f"{p}/attn/v_proj/kernel"] = linear_from_torch(arrays["wv"][i])
        flat[f"{p}/attn/o_proj/kernel"] = linear_from_torch(arrays["wo"][i])
        flat[f"{p}/mlp/gate_proj/kernel"] = linear_from_torch(arrays["w1"][i])
        flat[f"{p}/mlp/down_proj/kernel"] = linear_from_torch(arrays["w2"][i])
        flat[f"{p}/mlp/up_proj/kernel"] = linear_from_torch(arrays["w3"][i])
    if not shared:
        flat["lm_head/kernel"] = linear_from_torch(arrays["wcls"])
    flat = {k: np.array(v) for k, v in flat.items()}  # own the memory (not views of the file buffer)
    params = build_params(flat, cfg, path)
    tok = None
    tokenizer_path = tokenizer_path or _default_tokenizer(path)
    if tokenizer_path is not None:
        from cascade.models.tokenizer import Tokenizer

        tok = Tokenizer.from_file(tokenizer_path, bos_id=cfg.bos_token_id, eos_ids=cfg.eos_token_ids)
        if tok.vocab_size != cfg.vocab_size:
            raise ValueError(f"{tokenizer_path}: tokenizer has {tok.vocab_size} tokens but {path} has vocab_size {cfg.vocab_size}")
    return Model(config=cfg, params=params, tokenizer=tok, source=path, format="llama2c")


def _default_tokenizer(path) -> str | None:
    """A ``tokenizer.model`` or ``tok*.model`` beside the checkpoint, if exactly one is there."""
    folder = os.path.dirname(os.path.abspath(path))
    cands = [f for f in sorted(os.listdir(folder)) if f.endswith(".model") and (f == "tokenizer.model" or f.startswith("tok"))]
    if "tokenizer.model" in cands:
        return os.path.join(folder, "tokenizer.model")
    return os.path.join(folder, cands[0]) if len(cands) == 1 else None
