"""AWQ on one weight matrix (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration"): the cores, in pure JAX, and the exact folds of the per-channel
scales into a Llama block's parameters, before any model integration.

A Flax kernel ``W`` (K, N) is quantized along ``K`` (axis 0).  A few input channels carry much
larger activations than the rest; their weights matter more, and rounding them with the same
relative error as the others costs the most output error.  AWQ multiplies each input row ``k`` by
``s_k > 1`` for the salient channels before quantizing, and divides the input by the same
``s_k`` (folded, exactly, into the op that produces the input)::

    y = x @ W = (x / s) @ (s[:, None] * W)  ~  (x / s) @ Q(s[:, None] * W)

**Scale search** (:func:`awq_search_scale`, the reference ``auto_scale``): with ``m = mean |x|``
per input channel over the calibration set, for ``alpha = i / grid`` (``i = 0 .. grid-1``)::

    s = max(m ** alpha, 1e-4),   s = s / sqrt(max(s) * min(s))
    loss(alpha) = sum_i || x @ W_i - (x / s) @ Q(W_i * s[:, None]) ||^2

over the kernels ``W_i`` that share the input (q/k/v after ``attn_norm``; gate/up after
``mlp_norm``; o after v; down after up), with ``Q`` round-to-nearest fake quantization in the
spec's format and range estimator, scales stored in ``scale_dtype`` as the real quantizer stores
them.  The best ``alpha`` wins; ``alpha = 0`` is ``s = 1``, plain RTN, so the search never does
worse than RTN on the calibration rows it sees.  (The reference measures the loss on the whole
module's output, e.g. the attention or MLP block; this core uses each linear's own output, the
part that needs no model.)

**Clip search** (:func:`awq_search_clip`, the reference ``auto_clip``): per group, the min-max
range is shrunk by ``1, 1 - 1/grid, ..., 1 - (n-1)/grid`` with ``n = int(max_shrink * grid)``
(20 and 0.5: ratios 1.00 to 0.55), and each (group, output channel) keeps the ratio with the
lowest mean squared error of the group's *partial* output ``x_g @ W_g`` over a subsample of
rows.  Ratio 1 (no clipping) is tried first and only a strictly lower error replaces it.  For AWQ
it is run on the scaled weight ``W * s[:, None]`` with the scaled inputs ``x / s``.

**Folds** (:func:`fold_norm_scale`, :func:`fold_v_into_o`, :func:`fold_up_into_down`): pure
functions over one block's parameter dict (the ``layers_{i}`` subtree of
:mod:`cascade.models.llama`) that move ``1/s`` into the producer of a linear's input and ``s`` into
the linear's kernel rows; each leaves the float block's function unchanged (exact up to float
rounding).  Values are computed in float32 and cast back to each parameter's dtype.

With grouped-query attention the o-projection's input channel ``h * hd + d`` is the attention
average of v channel ``(h // (H // KV)) * hd + d``, so a v->o scale is one value per *v* channel
(KV * hd), repeated for the ``H // KV`` query heads that share it: search it with
``index=kv_head_index(H, KV, hd)`` and ``x_mean_abs=reduce_to_kv(mean |o input|, H, KV, hd)``.
(The reference skips v->o when ``H != KV``.)
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cascade.quant import ranges
from cascade.quant.qtensor import (
    QuantizedTensor, _int_spec, _is_concrete, _scale_dtype, quantize, quantize_with_range, refuse_rotated, validate_input,
)
from cascade.quant.spec import IntSpec

DEFAULT_GRID = 20
DEFAULT_MAX_SHRINK = 0.5
DEFAULT_CLIP_TOKENS = 512
DEFAULT_CLIP_COLUMNS = 256  # output channels per step of the clip search (bounds its memory)
SCALE_FLOOR = 1e-4

ATTN_INPUTS = ("attn/q_proj", "attn/k_proj", "attn/v_proj")  # the linears fed by attn_norm
MLP_INPUTS = ("mlp/gate_proj", "mlp/up_proj")  # the linears fed by mlp_norm


# --------------------------------------------------------------------------- scale search


def awq_scales(x_mean_abs, alpha):
    """``s = max(m ** alpha, 1e-4) / sqrt(max * min)`` (float32); ``alpha = 0`` gives ones."""
    m = jnp.asarray(x_mean_abs, jnp.float32)
    s = jnp.maximum(m ** jnp.asarray(alpha, jnp.float32), SCALE_FLOOR)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def scaled_fake_quant(w, s, spec: IntSpec, sdt=jnp.float16):
    """``Q(W * s[:, None]) / s[:, None]`` in float32: the effective weight once ``1/s`` is folded
    into the input (``Q``: RTN along axis 0 with the spec's range estimator)."""
    s = s.astype(jnp.float32)[:, None]
    scaled = w.astype(jnp.float32) * s
    g = ranges.to_groups(scaled, spec, 0)
    lo, hi = ranges.estimate_range(g, spec)
    scale, zero = ranges.scale_zero_from_range(lo, hi, spec, sdt)
    q = ranges.from_groups(ranges.fake_quant_groups(g, scale, zero, spec), scaled.shape, spec, 0)
    return q / s


def _loss(ws, x, s_full, spec, sdt):
    """``sum_i ||x @ (W_i - Q(W_i s) / s)||^2`` (= ``||x W_i - (x/s) Q(W_i s)||^2``), float32."""
    total = jnp.zeros((), jnp.float32)
    for w in ws:
        err = x @ (w - scaled_fake_quant(w, s_full, spec, sdt))
        total = total + jnp.sum(err * err)
    return total


@partial(jax.jit, static_argnames=("spec", "sdt"))
def awq_scale_loss(ws, x, s, spec: IntSpec, sdt=jnp.float16):
    """The search's loss for one full-length scale vector ``s`` (K,): jitted, ``ws`` a tuple."""
    ws = tuple(w.astype(jnp.float32) for w in ws)
    return _loss(ws, x.astype(jnp.float32), s.astype(jnp.float32), spec, sdt)


@partial(jax.jit, static_argnames=("spec", "grid", "sdt"))
def _search_scale(ws, x, x_mean_abs, index, spec: IntSpec, grid: int, sdt):
    ws = tuple(w.astype(jnp.float32) for w in ws)
    x = x.astype(jnp.float32)
    alphas = jnp.arange(grid, dtype=jnp.float32) / grid

    def loss_at(alpha):
        s = awq_scales(x_mean_abs, alpha)
        return _loss(ws, x, s if index is None else s[index], spec, sdt)

    losses = jax.lax.map(loss_at, alphas)  # a scan: one grid point's products live at a time
    best = jnp.argmin(losses)  # the first minimum, as the reference's strict `<`
    return awq_scales(x_mean_abs, alphas[best]), alphas[best], losses


def awq_search_scale(ws: Sequence, x, x_mean_abs, spec, *, grid: int = DEFAULT_GRID, index=None,
                     scale_dtype="float16"):
    """Grid search of the AWQ scale for the kernels ``ws`` (each (K, N_i)) sharing the input ``x``.

    ``x`` (T, K): calibration inputs (a subsample; float32 is used); ``x_mean_abs``: mean |x| per
    input channel over the whole calibration set, (K,), or (M,) with ``index`` (K,) ints mapping
    each input channel to its entry of a tied scale (e.g. :func:`kv_head_index` for v->o with
    grouped-query attention).  ``spec``: the weights' integer spec; ``scale_dtype``: how the
    quantizer will store scales (the loss simulates it, so ``alpha = 0`` is exactly RTN).

    Returns ``(s, info)``: ``s`` float32 of ``x_mean_abs``'s shape, and ``info`` with ``alpha``
    (the best grid point), ``loss`` (its loss), ``loss_at_alpha0`` (plain RTN's) and ``losses``
    (numpy, one per grid point ``i / grid``).
    """
    spec = _int_spec(spec)
    if isinstance(ws, (jnp.ndarray, np.ndarray)):
        ws = [ws]
    ws = list(ws)
    if not ws:
        raise ValueError("awq_search_scale needs at least one kernel")
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    checked = []
    for i, w in enumerate(ws):
        w, _ = validate_input(w, 0, f"kernel {i}")
        if w.ndim != 2:
            raise ValueError(f"kernel {i} must be 2-D (in, out), got shape {tuple(w.shape)}")
        checked.append(w)
    k = checked[0].shape[0]
    if any(w.shape[0] != k for w in checked):
        raise ValueError(f"kernels must share the input size, got {[tuple(w.shape) for w in checked]}")
    x, _ = validate_input(x, 0, "x")
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be (tokens, {k}), got shape {tuple(x.shape)}")
    m = jnp.asarray(x_mean_abs, jnp.float32)
    if index is not None:
        index = jnp.asarray(index, jnp.int32)
        if index.shape != (k,):
            raise ValueError(f"index must have shape ({k},), got {tuple(index.shape)}")
        if m.ndim != 1 or not bool(((index >= 0) & (index < m.shape[0])).all()):
            raise ValueError("index must map each input channel into x_mean_abs")
    elif m.shape != (k,):
        raise ValueError(f"x_mean_abs must have shape ({k},), got {tuple(m.shape)}")
    if not bool(jnp.isfinite(m).all()) or bool((m < 0).any()):
        raise ValueError("x_mean_abs must be finite and non-negative")
    s, alpha, losses = _search_scale(tuple(checked), x, m, index, spec, grid, _scale_dtype(scale_dtype))
    losses = np.asarray(losses)
    best = int(np.argmin(losses))
    info = {"alpha": float(alpha), "loss": float(losses[best]), "loss_at_alpha0": float(losses[0]),
            "losses": losses}
    return s, info


# --------------------------------------------------------------------------- clip search


def _grouped_inputs(x, spec: IntSpec, k: int):
    """``x`` (T, K) as (T, G, g), zero-padding a short last group (its weights pad with NaN)."""
    n_groups, g, _ = ranges.group_geometry((k, 1), spec, 0)
    if n_groups * g != k:
        x = jnp.pad(x, ((0, 0), (0, n_groups * g - k)))
    return x.reshape(x.shape[0], n_groups, g)


def _clip_block(wg, xg, ratios, spec: IntSpec, sdt):
    """Best range (lo, hi), (G, C) each, for one block of output channels ``wg`` (G, g, C)."""
    lo0, hi0 = jnp.nanmin(wg, axis=1), jnp.nanmax(wg, axis=1)
    if spec.symmetric:
        a = jnp.maximum(-lo0, hi0)
        lo0, hi0 = -a, a
    w0 = jnp.where(jnp.isnan(wg), 0.0, wg)  # padded rows meet zero inputs
    ref = jnp.einsum("tgi,gic->tgc", xg, w0)

    def step(best, ratio):
        best_err, best_ratio = best
        scale, zero = ranges.scale_zero_from_range(ratio * lo0, ratio * hi0, spec, sdt)
        out = jnp.einsum("tgi,gic->tgc", xg, ranges.fake_quant_groups(w0, scale, zero, spec))
        err = jnp.mean((out - ref) ** 2, axis=0)
        better = err < best_err  # strict: ratio 1 (first) is only replaced by a lower error
        return (jnp.where(better, err, best_err), jnp.where(better, ratio, best_ratio)), None

    init = (jnp.full(lo0.shape, jnp.inf, jnp.float32), jnp.ones(lo0.shape, jnp.float32))
    (_, ratio), _ = jax.lax.scan(step, init, ratios)
    return ratio * lo0, ratio * hi0


@partial(jax.jit, static_argnames=("spec", "grid", "n_ratios", "stride", "columns", "sdt"))
def _search_clip(w, x, spec: IntSpec, grid: int, n_ratios: int, stride: int, columns: int, sdt):
    k, n = w.shape
    xg = _grouped_inputs(x.astype(jnp.float32)[::stride], spec, k)  # (T', G, g)
    wg = ranges.to_groups(w.astype(jnp.float32), spec, 0)  # (G, g, N), NaN-padded short last group
    n_pad = -n % columns
    wg = jnp.pad(wg, ((0, 0), (0, 0), (0, n_pad)))  # zero columns: scale 1, no error, dropped below
    blocks = jnp.moveaxis(wg.reshape(wg.shape[0], wg.shape[1], -1, columns), 2, 0)  # (B, G, g, C)
    ratios = 1.0 - jnp.arange(n_ratios, dtype=jnp.float32) / grid
    lo, hi = jax.lax.map(lambda b: _clip_block(b, xg, ratios, spec, sdt), blocks)  # (B, G, C) each
    lo, hi = (jnp.moveaxis(a, 0, 1).reshape(a.shape[1], -1)[:, :n] for a in (lo, hi))
    to_layout = partial(ranges.groups_to_scale_layout, shape=w.shape, spec=spec, axis=0)
    return to_layout(lo), to_layout(hi)


def awq_search_clip(w, x, spec, *, grid: int = DEFAULT_GRID, max_shrink: float = DEFAULT_MAX_SHRINK,
                    n_tokens: int = DEFAULT_CLIP_TOKENS, scale_dtype="float16",
                    columns: int = DEFAULT_CLIP_COLUMNS):
    """Per (group, output channel) clipping range of ``w`` (K, N) minimising the group's partial
    output error on ``x`` (T, K); see the module docs.

    Rows of ``x`` are subsampled as the reference does (every ``T // n_tokens``-th row).  The range
    starts from the min-max of each group (the search replaces the spec's own clip method).
    ``columns`` output channels are searched per step (memory ~ ``tokens * G * columns``).
    Returns ``(lo, hi)`` float32 in the stored scale layout (:func:`cascade.quant.ranges.scale_shape`
    of ``w`` along axis 0), for :func:`cascade.quant.quantize_with_range` (``axis=0``).
    """
    spec = _int_spec(spec)
    w, _ = validate_input(w, 0, "weight")
    if w.ndim != 2:
        raise ValueError(f"the clip search takes a 2-D (in, out) kernel, got shape {tuple(w.shape)}")
    if spec.granularity == "tensor":
        raise ValueError(f"the clip search is per group and output channel; {spec} is per-tensor")
    k, n = w.shape
    x, _ = validate_input(x, 0, "x")
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be (tokens, {k}), got shape {tuple(x.shape)}")
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink}")
    if n_tokens < 1 or columns < 1:
        raise ValueError("n_tokens and columns must be positive")
    n_ratios = max(1, int(max_shrink * grid))
    stride = max(1, x.shape[0] // n_tokens)
    return _search_clip(w, x, spec, grid, n_ratios, stride, min(columns, n), _scale_dtype(scale_dtype))


# --------------------------------------------------------------------------- quantize


def awq_quantize(w, spec, s, lo=None, hi=None, scale_dtype="float16") -> QuantizedTensor:
    """Quantize the SCALED weight ``w * s[:, None]`` along axis 0: with the range ``(lo, hi)`` from
    :func:`awq_search_clip` (run on the scaled weight) if given, else RTN with the spec's range.
    The caller folds ``1/s`` into the op before (so ``dequantize(result) / s[:, None] ~ w``).
    The result dequantizes to ``w``'s dtype by default."""
    refuse_rotated(_int_spec(spec), "AWQ")  # its clip range is searched on the unrotated weight
    w, _ = validate_input(w, 0, "weight")
    s = jnp.asarray(s, jnp.float32)
    if w.ndim != 2 or s.shape != (w.shape[0],):
        raise ValueError(f"s must have shape ({w.shape[0]},) for a 2-D kernel, got {tuple(s.shape)} and {tuple(w.shape)}")
    _check_positive(s)
    scaled = w.astype(jnp.float32) * s[:, None]
    if (lo is None) != (hi is None):
        raise ValueError("give both lo and hi, or neither")
    if lo is None:
        qt = quantize(scaled, spec, axis=0, scale_dtype=scale_dtype)
    else:
        qt = quantize_with_range(scaled, spec, lo, hi, axis=0, scale_dtype=scale_dtype)
    return QuantizedTensor(qt.packed, qt.scale, qt.zero, spec=qt.spec, shape=qt.shape, axis=0, dtype=w.dtype)


# --------------------------------------------------------------------------- folds


def kv_head_index(n_heads: int, n_kv_heads: int, head_dim: int) -> np.ndarray:
    """(H * hd,) ints: o's input channel ``h * hd + d`` -> v's output channel ``(h // (H // KV)) * hd + d``."""
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    per = n_heads // n_kv_heads
    heads = np.arange(n_heads) // per
    return (heads[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)


def reduce_to_kv(stat, n_heads: int, n_kv_heads: int, head_dim: int):
    """A per-o-input statistic (H * hd,) averaged over the query heads sharing a kv head: (KV * hd,)."""
    stat = jnp.asarray(stat, jnp.float32)
    if stat.shape != (n_heads * head_dim,):
        raise ValueError(f"expected shape ({n_heads * head_dim},), got {tuple(stat.shape)}")
    return stat.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim).mean(axis=1).reshape(-1)


def _path(p) -> tuple[str, ...]:
    return tuple(p.split("/")) if isinstance(p, str) else tuple(p)


def _get(tree, path):
    for key in path:
        if key not in tree:
            raise ValueError(f"block has no parameter {'/'.join(path)}")
        tree = tree[key]
    return tree


def _set(tree, path, value):
    """A copy of ``tree`` (dicts copied along ``path`` only) with ``value`` at ``path``."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
    return out


def _has(tree, path) -> bool:
    for key in path:
        if not hasattr(tree, "keys") or key not in tree:
            return False
        tree = tree[key]
    return True


def _check_positive(s):
    if _is_concrete(s) and not bool((jnp.isfinite(s) & (s > 0)).all()):
        raise ValueError("AWQ scales must be finite and positive")


def _scale_param(block, path, factor, axis: int):
    """``block`` with the parameter at ``path`` multiplied by ``factor`` along ``axis`` (float32 math)."""
    a = _get(block, path)
    if isinstance(a, QuantizedTensor):
        raise ValueError(f"{'/'.join(path)} is already quantized; fold AWQ scales before quantizing")
    if a.shape[axis] != factor.shape[0]:
        raise ValueError(f"{'/'.join(path)} has {a.shape[axis]} entries along axis {axis}, scale has {factor.shape[0]}")
    shape = [1] * a.ndim
    shape[axis] = -1
    dtype = a.dtype
    return _set(block, path, (jnp.asarray(a, jnp.float32) * factor.reshape(shape)).astype(dtype))


def _scale_vec(s, name="s"):
    s = jnp.asarray(s, jnp.float32)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(s.shape)}")
    _check_positive(s)
    return s


def fold_norm_scale(block, norm: str, linears: Sequence, s):
    """Divide the RMSNorm ``norm``'s scale by ``s`` (dim,) and multiply the kernel rows of each
    linear it feeds (paths such as ``"attn/q_proj"``) by ``s``; biases are unchanged.  Returns a new
    block dict (the input is not modified)."""
    s = _scale_vec(s)
    block = _scale_param(block, (norm, "scale"), 1.0 / s, 0)
    for lin in linears:
        block = _scale_param(block, _path(lin) + ("kernel",), s, 0)
    return block


def fold_v_into_o(block, s, n_heads: int, n_kv_heads: int, head_dim: int):
    """Divide v_proj's output columns (and bias) by ``s`` (KV * hd,) and multiply o_proj's input
    rows by ``s`` repeated for the query heads sharing each kv head (:func:`kv_head_index`)."""
    s = _scale_vec(s)
    if s.shape != (n_kv_heads * head_dim,):
        raise ValueError(f"s must have shape ({n_kv_heads * head_dim},) (one per v channel), got {tuple(s.shape)}")
    block = _scale_param(block, ("attn", "v_proj", "kernel"), 1.0 / s, 1)
    if _has(block, ("attn", "v_proj", "bias")):
        block = _scale_param(block, ("attn", "v_proj", "bias"), 1.0 / s, 0)
    return _scale_param(block, ("attn", "o_proj", "kernel"), s[kv_head_index(n_heads, n_kv_heads, head_dim)], 0)


def fold_up_into_down(block, s):
    """Divide up_proj's output columns (and bias) by ``s`` (ffn,) and multiply down_proj's input
    rows by ``s``: ``down(silu(gate) * up / s * s)`` is unchanged."""
    s = _scale_vec(s)
    block = _scale_param(block, ("mlp", "up_proj", "kernel"), 1.0 / s, 1)
    if _has(block, ("mlp", "up_proj", "bias")):
        block = _scale_param(block, ("mlp", "up_proj", "bias"), 1.0 / s, 0)
    return _scale_param(block, ("mlp", "down_proj", "kernel"), s, 0)
