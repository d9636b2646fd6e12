"""The Llama-family decoder in Flax (Llama 2/3, Mistral, Qwen2, llama2.c).

Pre-norm blocks: RMSNorm -> grouped-query attention with RoPE -> residual; RMSNorm -> SwiGLU
MLP -> residual; final RMSNorm -> LM head (tied to the embedding or not).  It follows the
Hugging Face ``modeling_llama.py`` numerics (RMSNorm in float32, rotate-half RoPE), so weights
in Hugging Face layout load as they are; loaders for interleaved-RoPE formats (llama2.c, GGUF)
permute q/k to this layout (:func:`unpermute_rope_rows`).

Parameter tree (``kernel`` is ``(in, out)``, the Hugging Face ``weight`` transposed; any
kernel may be a :class:`cascade.quant.QuantizedTensor` quantized along axis 0, any tensor may be
float32/bfloat16/float16)::

    embed/embedding                (vocab, dim)    may be a QuantizedTensor along axis 1
    layers_{i}/attn_norm/scale     (dim,)
    layers_{i}/attn/{q,k,v,o}_proj/kernel  (dim, H*hd) (dim, KV*hd) (dim, KV*hd) (H*hd, dim)
    layers_{i}/attn/{q,k,v}_proj/bias      when qkv_bias; o_proj/bias when o_bias
    layers_{i}/mlp_norm/scale      (dim,)
    layers_{i}/mlp/{gate,up,down}_proj/kernel  (dim, ffn) (dim, ffn) (ffn, dim)
    final_norm/scale               (dim,)
    lm_head/kernel                 (dim, vocab)    absent when tie_embeddings
    vocab_map                      (vocab,) int32  only with vocab_subset (then vocab = vocab_subset rows)

A reduced-vocabulary model (``cfg.vocab_subset``: a draft that proposes only frequent tokens,
FR-Spec) speaks the full vocabulary at its boundary: a token id reads the row ``vocab_map`` gives
it (tokens not in the map read the row whose entry is -1), and its logits come back over all
``vocab_size`` tokens with ``-inf`` outside the map, so its distribution is exactly zero there.

The network only: the KV cache (its buffers, writes and cached attention) is
:mod:`cascade.models.kv_cache`, the attention arithmetic :mod:`cascade.models.attention`.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cascade import quant
from cascade.quant import dequant_matmul
from cascade.models.attention import attention
from cascade.models.config import ModelConfig, rope_inv_freq
from cascade.models.kv_cache import KVCache, LayerKV, cached_attention
from cascade.quant.qtensor import QuantizedTensor





def _param(module: nn.Module, name: str, init, shape, dtype=jnp.float32):
    """``module.param`` that also accepts a QuantizedTensor (Flax's shape check would reject it)."""
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init, shape, dtype)


class Linear(nn.Module):
    """``y = x @ kernel (+ bias)`` through :func:`cascade.quant.matmul`: float or quantized kernel."""

    features: int
    use_bias: bool = False
    parallel: str | None = None  # "column" / "row": its Megatron role under a tensor-parallel mesh

    @nn.compact
    def __call__(self, x):
        kernel = _param(self, "kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
        y = quant.matmul(x, kernel if isinstance(kernel, QuantizedTensor) else kernel.astype(x.dtype),
                         parallel=self.parallel)
        if self.use_bias:
            y = y + _param(self, "bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
        return y


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale``, computed in float32 (Zhang & Sennrich 2019)."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y.astype(x.dtype) * scale.astype(x.dtype)).astype(x.dtype)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE (Su et al. 2021, Hugging Face layout): x (B, T, heads, hd), positions (B, T)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # (B, T, hd/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)






def fused_projections(module: nn.Module, names, x, use_bias: bool, parallel: str):
    """The outputs of ``module``'s Linear submodules ``names`` (q/k/v, gate/up) in one kernel call
    when their kernels fuse (:func:`cascade.quant.dequant_matmul.fuses`: int8/int4 weights of one
    kind on the native kernel, with float or -a8 activations; each result exactly its own
    matmul's); None otherwise (and while initializing), and the Linear modules run them one by one."""
    if module.is_initializing():
        return None
    params = module.variables.get("params", {})
    if not all(n in params and "kernel" in params[n] for n in names):
        return None
    kernels = [params[n]["kernel"] for n in names]
    if not all(isinstance(k, QuantizedTensor) for k in kernels) or not dequant_matmul.fuses(x, kernels):
        return None
    ys = dequant_matmul.matmul_many(x, kernels, parallel=parallel)
    if use_bias:
        ys = [y + params[n]["bias"].astype(y.dtype) for y, n in zip(ys, names)]
    return ys


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, layer_cache):
        """``layer_cache``: None (plain causal attention) or ``(LayerKV, lengths, n_new, spec)``."""
        cfg = self.cfg
        b, t, _ = x.shape
        fused = fused_projections(self, ("q_proj", "k_proj", "v_proj"), x, cfg.qkv_bias, "column")
        if fused is None:
            fused = [Linear(cfg.n_heads * cfg.head_dim, cfg.qkv_bias, "column", name="q_proj")(x),
                     Linear(cfg.n_kv_heads * cfg.head_dim, cfg.qkv_bias, "column", name="k_proj")(x),
                     Linear(cfg.n_kv_heads * cfg.head_dim, cfg.qkv_bias, "column", name="v_proj")(x)]
        q = fused[0].reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = fused[1].reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = fused[2].reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        inv_freq = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if layer_cache is None:
            out, new_cache = attention(q, k, v, positions, positions, cfg.sliding_window), None
        else:
            layer, lengths, n_new, spec = layer_cache
            out, new_cache = cached_attention(q, k, v, positions, layer, lengths, n_new, spec, cfg.sliding_window)
        return Linear(cfg.dim, cfg.o_bias, "row", name="o_proj")(out), new_cache


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        fused = fused_projections(self, ("gate_proj", "up_proj"), x, cfg.mlp_bias, "column")
        if fused is None:
            fused = [Linear(cfg.hidden_dim, cfg.mlp_bias, "column", name="gate_proj")(x),
                     Linear(cfg.hidden_dim, cfg.mlp_bias, "column", name="up_proj")(x)]
        gate, up = fused
        return Linear(cfg.dim, cfg.mlp_bias, "row", name="down_proj")(jax.nn.silu(gate) * up)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, layer_cache):
        h, new_cache = Attention(self.cfg, name="attn")(RMSNorm(self.cfg.norm_eps, name="attn_norm")(x), positions, layer_cache)
        x = x + h
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg.norm_eps, name="mlp_norm")(x))
        return x, new_cache


def embed_lookup(table, tokens, dtype):
    """Rows of the embedding table; a quantized table (grouped along axis 1) is gathered packed."""
    if isinstance(table, QuantizedTensor):
        if table.axis != 1:
            raise ValueError("a quantized embedding must be quantized along axis 1 (the model dim)")
        rows = QuantizedTensor(table.packed[tokens], table.scale[tokens],
                               None if table.zero is None else table.zero[tokens],
                               spec=table.spec, shape=tokens.shape + table.shape[1:], axis=tokens.ndim, dtype=table.dtype)
        return quant.dequantize(rows, dtype)
    return table[tokens].astype(dtype)


class Transformer(nn.Module):
    """The decoder.  ``__call__(tokens, positions, cache, n_new, last_only)``.

    * ``cache=None``: a plain causal forward over ``tokens`` (B, T) at ``positions`` (B, T).
    * with a :class:`KVCache`: tokens are written at ``cache.lengths`` onward (their positions
      must be ``lengths[b] + arange(T)``); ``n_new`` (B,) says how many of the T are real per row
      (right padding), and the new lengths are ``lengths + n_new``.
    * ``last_only``: return logits only at each row's last real token, (B, V), instead of (B, T, V).
    """

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32  # activation dtype

    @nn.compact
    def __call__(self, tokens, positions, cache: KVCache | None = None, n_new=None, last_only: bool = False):
        cfg = self.cfg
        table = _EmbedTable(cfg, name="embed")()
        vocab_map = None
        if cfg.vocab_subset:
            vocab_map = self.param("vocab_map", lambda key, shape: jnp.arange(shape[0], dtype=jnp.int32) - 1,
                                   (cfg.vocab_subset,))
            tokens = subset_rows(vocab_map, tokens, cfg.vocab_size)
        x = embed_lookup(table, tokens, self.dtype)
        b, t = tokens.shape
        n_new = jnp.full((b,), t, jnp.int32) if n_new is None else n_new
        new_layers = []
        for i in range(cfg.n_layers):
            layer_cache = None
            if cache is not None:
                layer = LayerKV(*(getattr(cache, f)[i] if getattr(cache, f) else () for f in LayerKV._fields))
                layer_cache = (layer, cache.lengths, n_new, cache.spec)
            x, c = Block(cfg, name=f"layers_{i}")(x, positions, layer_cache)
            new_layers.append(c)
        x = RMSNorm(cfg.norm_eps, name="final_norm")(x)
        if last_only:
            x = jnp.take_along_axis(x, (n_new - 1)[:, None, None], axis=1)[:, 0]
        if cfg.tie_embeddings:
            logits = tied_head(x, table)
        else:
            logits = Linear(cfg.rows, parallel="column", name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if vocab_map is not None:
            logits = full_vocab_logits(vocab_map, logits, cfg.vocab_size)
        if cache is None:
            return logits, None
        buffers = {f: tuple(getattr(c, f) for c in new_layers) if getattr(cache, f) else () for f in LayerKV._fields}
        return logits, KVCache(**buffers, lengths=cache.lengths + n_new, spec=cache.spec)


class _EmbedTable(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self):
        return _param(self, "embedding", nn.initializers.normal(0.02), (self.cfg.rows, self.cfg.dim))


def subset_rows(vocab_map, tokens, vocab_size: int):
    """The embedding row each token id reads in a reduced-vocabulary model: its index in
    ``vocab_map``, or the row whose entry is -1 for a token not in it."""
    rows = jnp.arange(vocab_map.shape[0], dtype=jnp.int32)
    other = jnp.argmin(vocab_map).astype(jnp.int32)  # the -1 row (the map's only negative entry)
    index = jnp.full((vocab_size,), other, jnp.int32).at[jnp.where(vocab_map >= 0, vocab_map, vocab_size)].set(
        rows, mode="drop")
    return index[tokens]


def full_vocab_logits(vocab_map, logits, vocab_size: int):
    """Logits over the subset's rows (..., rows) -> over the whole vocabulary (..., vocab_size):
    each row's logit at its token id, ``-inf`` everywhere else (the -1 row's logit is dropped), so
    softmax gives exactly zero probability to every token the model cannot propose."""
    out = jnp.full(logits.shape[:-1] + (vocab_size,), -jnp.inf, logits.dtype)
    return out.at[..., jnp.where(vocab_map >= 0, vocab_map, vocab_size)].set(logits, mode="drop")


def tied_head(x, table):
    """Logits ``x @ E^T`` for a tied head (E float, or quantized along the model dim)."""
    return quant.matmul_t(x, table, parallel="column")  # the vocabulary split; reads a quantized table in place (no transposed copy of its codes)


def init_params(cfg: ModelConfig, key, dtype=jnp.float32):
    """Random parameters (normal(0.02) weights, unit norms) in the layout above."""
    model = Transformer(cfg)
    tokens = jnp.zeros((1, 2), jnp.int32)
    params = jax.jit(model.init)(key, tokens, jnp.zeros((1, 2), jnp.int32))["params"]
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def param_shapes(cfg: ModelConfig) -> dict:
    """The expected ``{path: shape}`` of every parameter, for loaders to check against."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    flat = flax.traverse_util.flatten_dict(shapes, sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved-pair RoPE rows (Meta/llama2.c/GGUF: pairs (2i, 2i+1)) -> rotate-half rows (HF).

    ``w`` is (n_heads * head_dim, ...) in (out, in) order; the same permutation as
    ``convert_llama_weights_to_hf.permute``.  Row permutations keep GGUF blocks (along ``in``) intact.
    """
    rows = w.shape[0]
    hd = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
