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


def _input_layers(name: str) -> tuple[str, ...]:
    if name == "attn":
        return awq.ATTN_INPUTS
    if name == "mlp":
        return awq.MLP_INPUTS
    if name in ("o", "down"):
        return ("attn/o_proj",) if name == "o" else ("mlp/down_proj",)
    raise ValueError(f"unknown block input {name!r}; choose from {', '.join(INPUTS)}")


def _kernels(block, name: str) -> list[np.ndarray]:
    return [np.asarray(awq._get(block, awq._path(layer) + ("kernel",)), np.float32) for layer in _input_layers(name)]


def input_scales(block, name: str, act_max, alpha: float, *, n_heads: int, n_kv_heads: int, head_dim: int):
    """``(s_fold, s)`` for block input ``name`` at migration strength ``alpha``: ``s`` one scale per
    input channel of the linears reading it, ``s_fold`` what the fold takes (for ``o``, one per kv
    channel, ``s`` being its expansion over the query heads; otherwise ``s`` itself)."""
    ws = _kernels(block, name)
    if name == "o":
        w_rows = np.abs(ws[0]).max(axis=1)
        s_kv = smoothing_scales(max_to_kv(act_max, n_heads, n_kv_heads, head_dim),
                                [max_to_kv(w_rows, n_heads, n_kv_heads, head_dim)[:, None]], alpha)
        return s_kv, s_kv[awq.kv_head_index(n_heads, n_kv_heads, head_dim)]
    s = smoothing_scales(act_max, ws, alpha)
    return s, s


def fold_input(block, name: str, s_fold, *, n_heads: int, n_kv_heads: int, head_dim: int):
    """``block`` with input ``name`` divided by ``s_fold`` and the linears reading it multiplied (module docs)."""
    s_fold = jnp.asarray(s_fold, jnp.float32)
    if name == "o":
        return awq.fold_v_into_o(block, s_fold, n_heads, n_kv_heads, head_dim)
    if name == "down":
        return awq.fold_up_into_down(block, s_fold)
    return awq.fold_norm_scale(block, f"{name}_norm", _input_layers(name), s_fold)


def smooth_block(block, act_max: dict, *, n_heads: int, n_kv_heads: int, head_dim: int,
                 alpha: "float | dict" = DEFAULT_ALPHA, inputs: Sequence[str] = INPUTS):
    """``block`` (a decoder block's float parameters) with ``inputs`` smoothed; ``act_max`` maps each
    input (``attn``, ``o``, ``mlp``, ``down``) to its per-channel ``max|x|`` on calibration data;
    ``alpha`` one migration strength, or one per input (``{input: alpha}``, e.g. from
    :func:`search_alphas`).  Returns ``(block', {input: s})``, ``s`` per input channel of the
    linears reading it."""
    heads = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    scales = {}
    for name in inputs:
        _input_layers(name)  # an unknown input is an error before its statistics are looked up
        a = alpha[name] if isinstance(alpha, dict) else alpha
        s_fold, s = input_scales(block, name, act_max[name], a, **heads)
        block = fold_input(block, name, s_fold, **heads)
        scales[name] = s
    return block, scales


# ``--alpha auto``: the migration strengths tried for each input of each block
ALPHA_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.3, 0.35, ..., 0.95
SEARCH_TOKENS = 1024  # calibration rows each input's search scores (the first rows kept)


def w8a8_error(x, ws: Sequence, specs: Sequence, scale_dtype="float16") -> float:
    """``sum_l ||x @ W_l - W8A8(x, W_l)||^2`` over the linears ``ws`` reading ``x`` (rows, K), each
    quantized as its ``spec`` (a ``w8a8`` or ``w8a8-static`` :class:`IntSpec`) deploys it: the
    weight by the library's quantizer, ``x`` per row or with one scale ``max|x| / 127`` for the
    tensor (a static scale measured on these rows).  A ``-had`` spec quantizes ``x R`` and the rotated
    weight: the quantized ``x R`` is rotated back (``Rᵀ``) to multiply the dequantized weight."""
    from cascade.quant import dequantize, hadamard, quantize
    from cascade.quant.activations import ACT_QMAX, quantize_activations, token_scales

    x = jnp.asarray(x, jnp.float32)
    err = 0.0
    for w, spec in zip(ws, specs):
        w = jnp.asarray(w, jnp.float32)
        if spec.act is None:
            raise ValueError(f"w8a8_error measures a W8A8 spec, got {spec}")
        xr = hadamard.rotate(x, -1) if spec.rotate else x
        if spec.act == "static":
            amax = jnp.max(jnp.abs(xr))
            sx = jnp.where(amax > 0, amax / ACT_QMAX, 1.0)
        else:
            sx = token_scales(xr)
        wq = dequantize(quantize(w, spec, axis=0, scale_dtype=scale_dtype), "float32")
        xq = quantize_activations(xr, sx).astype(jnp.float32) * sx
        if spec.rotate:
            xq = hadamard.unrotate(xq, -1)
        err += float(jnp.sum(jnp.square(xq @ wq - x @ w)))
    return err


def search_alphas(block, act_max: dict, samples: dict, specs: dict, *, n_heads: int, n_kv_heads: int,
                  head_dim: int, grid: Sequence[float] = ALPHA_GRID, scale_dtype="float16"):
    """Per-input migration strengths for one block: for each input read by a W8A8 linear (``specs``:
    ``{layer: IntSpec}``), the ``alpha`` of ``grid`` whose smoothing gives the smallest
    :func:`w8a8_error` of those linears on ``samples[input]`` (rows of that input in the float
    model; smoothing divides them by ``s`` and multiplies the weights' rows by it, exact in float).
    A layer not in ``specs`` (kept at another precision) does not count; an input none of whose
    layers is W8A8 is left out.  Returns ``{input: alpha}``, ``{input: {alpha: error}}``."""
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
        raise ValueError(f"the alpha grid must be non-empty values in [0, 1], got {tuple(grid)}")
    heads = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    best, errors = {}, {}
    for name in INPUTS:
        layers = [(i, layer) for i, layer in enumerate(_input_layers(name))
                  if layer in specs and getattr(specs[layer], "act", None) is not None]
        if not layers:
            continue
        ws = _kernels(block, name)
        x = np.asarray(samples[name], np.float32).reshape(-1, ws[0].shape[0])
        errors[name] = {}
        for a in grid:
            _, s = input_scales(block, name, act_max[name], a, **heads)
            s = s.astype(np.float32)
            errors[name][a] = w8a8_error(x / s[None, :], [ws[i] * s[:, None] for i, _ in layers],
                                         [specs[layer] for _, layer in layers], scale_dtype)
        best[name] = min(errors[name], key=errors[name].get)
    return best, errors
