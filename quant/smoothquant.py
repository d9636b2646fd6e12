"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights before W8A8.

Int8 activations fail on a few input channels whose values are 10-100x the rest (per-token
quantization spends its whole range on them).  SmoothQuant divides each input channel ``j`` by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (the paper's eq. 4)

and multiplies row ``j`` of every weight reading that input by ``s_j``: ``(X / s) @ (diag(s) W)``
is ``X @ W`` in exact arithmetic, and ``alpha`` (the migration strength, 0.5 by default) balances
how hard the two operands become to quantize.  ``max|W_j|`` is taken over every output of every
weight that reads the input (q/k/v share one ``s``; gate/up another).  A dead channel (never
non-zero in calibration) keeps ``s = 1``.

The division is folded into the op that produces the input, so the model stays the same network
(:mod:`cascade.quant.awq`'s folds, exact in float before rounding):

* q/k/v input  -> ``attn_norm``'s scale;       gate/up input -> ``mlp_norm``'s scale;
* o_proj input -> v_proj's output columns (one ``s`` per kv channel, shared by the query heads
  that read it, so ``max|X|`` and ``max|W|`` are reduced over those heads by max);
* down_proj input -> up_proj's output columns (``silu(gate) * up`` is linear in ``up``).

The last two folds scale a weight's output columns, which a per-output-channel int8 weight
absorbs into its scales exactly: smoothing o and down costs v and up nothing.

This module is the pure core on statistics and a block's parameters; the calibration loop that
feeds it is :func:`cascade.models.quantize.quantize_model` (``method="smoothquant"``).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from cascade.quant import awq

DEFAULT_ALPHA = 0.5
FLOOR = 1e-5  # the reference implementation's clamp on both maxima
INPUTS = ("attn", "o", "mlp", "down")  # the four linear inputs of a block, all smoothed by default


def smoothing_scales(act_max, weights: Sequence, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """``s`` (K,) for an input with per-channel ``act_max`` (K,) read by ``weights`` (each (K, n))."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant's alpha must be in [0, 1], got {alpha}")
    a = np.asarray(act_max, np.float64)
    if a.ndim != 1 or not np.isfinite(a).all() or (a < 0).any():
        raise ValueError("activation maxima must be a finite non-negative vector")
    w_max = np.zeros_like(a)
    for w in weights:
        w = np.asarray(w, np.float64)
        if w.ndim != 2 or w.shape[0] != a.shape[0]:
            raise ValueError(f"weight of shape {w.shape} does not read {a.shape[0]} input channels")
        w_max = np.maximum(w_max, np.abs(w).max(axis=1))
    s = np.maximum(a, FLOOR) ** alpha / np.maximum(w_max, FLOOR) ** (1.0 - alpha)
    return np.where(a > 0, s, 1.0)


def max_to_kv(stat, n_heads: int, n_kv_heads: int, head_dim: int) -> np.ndarray:
    """A per-o-input maximum (H * hd,) reduced over the query heads sharing a kv head: (KV * hd,)."""
    stat = np.asarray(stat)
    if stat.shape != (n_heads * head_dim,):
        raise ValueError(f"expected shape ({n_heads * head_dim},), got {stat.shape}")
    return stat.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim).max(axis=1).reshape(-1)


def smooth_block(block, act_max: dict, *, n_heads: int, n_kv_heads: int, head_dim: int,
                 alpha: float = DEFAULT_ALPHA, inputs: Sequence[str] = INPUTS):
    """``block`` (a decoder block's float parameters) with ``inputs`` smoothed; ``act_max`` maps each
    input (``attn``, ``o``, ``mlp``, ``down``) to its per-channel ``max|x|`` on calibration data.
    Returns ``(block', {input: s})``, ``s`` per input channel of the linears reading it."""
    scales = {}
    for name in inputs:
        if name == "attn":
            layers = awq.ATTN_INPUTS
        elif name == "mlp":
            layers = awq.MLP_INPUTS
        elif name in ("o", "down"):
            layers = ("attn/o_proj",) if name == "o" else ("mlp/down_proj",)
        else:
            raise ValueError(f"unknown block input {name!r}; choose from {', '.join(INPUTS)}")
        ws = [np.asarray(awq._get(block, awq._path(layer) + ("kernel",)), np.float32) for layer in layers]
        if name == "o":
            index = awq.kv_head_index(n_heads, n_kv_heads, head_dim)
            w_rows = np.abs(ws[0]).max(axis=1)
            s = smoothing_scales(max_to_kv(act_max[name], n_heads, n_kv_heads, head_dim),
                                 [max_to_kv(w_rows, n_heads, n_kv_heads, head_dim)[:, None]], alpha)
            block = awq.fold_v_into_o(block, jnp.asarray(s, jnp.float32), n_heads, n_kv_heads, head_dim)
            s = s[index]
        else:
            s = smoothing_scales(act_max[name], ws, alpha)
            if name == "down":
                block = awq.fold_up_into_down(block, jnp.asarray(s, jnp.float32))
            else:
                block = awq.fold_norm_scale(block, f"{name}_norm", layers, jnp.asarray(s, jnp.float32))
        scales[name] = s
    return block, scales
