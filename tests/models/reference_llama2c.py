"""An independent float64 numpy forward pass of a llama2.c checkpoint, written from ``run.c``.

It reads the ``.bin`` itself (layout table in ``shared/data/README.md``) and applies RoPE to
interleaved pairs (2i, 2i+1) as llama2.c does, so it shares nothing with the loaders or the Flax
model (which permutes q/k to rotate-half form).
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits


def read_llama2c(path):
    raw = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.frombuffer(raw[:28], "<i4").tolist()
    data = np.frombuffer(raw[28:], "<f4").astype(np.float64)
    kv_dim = dim * n_kv // n_heads
    shapes = [("emb", (abs(vocab), dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
              ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,))]
    w, at = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = data[at:at + n].reshape(shape)
        at += n
    at += 2 * seq_len * (dim // n_heads) // 2  # freq_cis tables
    w["wcls"] = w["emb"] if vocab > 0 else data[at:at + abs(vocab) * dim].reshape(abs(vocab), dim)
    w["cfg"] = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, vocab=abs(vocab), seq_len=seq_len)
    return w


def _rmsnorm(x, g, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def _rope_interleaved(x, pos, head_size):
    """x (T, heads, hs): rotate pairs (2i, 2i+1) by pos * 10000^(-2i/hs)."""
    i = np.arange(0, head_size, 2)
    freq = 10000.0 ** (-i / head_size)
    ang = pos[:, None] * freq[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def forward(w, tokens):
    """Logits (T, vocab) for one sequence, float64 (BLAS on one thread: these matrices are small,
    and a multi-threaded BLAS on a busy 2-core machine is 5x slower)."""
    with threadpool_limits(1):
        return _forward(w, tokens)


def _forward(w, tokens):
    c = w["cfg"]
    dim, nh, nkv = c["dim"], c["n_heads"], c["n_kv"]
    hs = dim // nh
    t = len(tokens)
    pos = np.arange(t, dtype=np.float64)
    x = w["emb"][np.asarray(tokens)]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for layer in range(c["n_layers"]):
        h = _rmsnorm(x, w["rms_att"][layer])
        q = _rope_interleaved((h @ w["wq"][layer].T).reshape(t, nh, hs), pos, hs)
        k = _rope_interleaved((h @ w["wk"][layer].T).reshape(t, nkv, hs), pos, hs)
        v = (h @ w["wv"][layer].T).reshape(t, nkv, hs)
        kr = np.repeat(k, nh // nkv, axis=1)  # query head h uses K/V head h // (nh // nkv)
        vr = np.repeat(v, nh // nkv, axis=1)
        att = q.transpose(1, 0, 2) @ kr.transpose(1, 2, 0) / np.sqrt(hs) + mask  # (heads, T, T)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        out = (att @ vr.transpose(1, 0, 2)).transpose(1, 0, 2)
        x = x + out.reshape(t, dim) @ w["wo"][layer].T
        h = _rmsnorm(x, w["rms_ffn"][layer])
        g = h @ w["w1"][layer].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return _rmsnorm(x, w["rms_final"]) @ w["wcls"].T


def nll_sum(w, tokens) -> tuple[float, int]:
    logits = forward(w, tokens)[:-1]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])].sum()), len(tokens) - 1
