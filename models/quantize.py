"""Quantize a loaded model's weights under precision rules, with a PTQ method, and a report.

Methods (``method=``):

* ``rtn``  round-to-nearest, each tensor on its own (the baseline);
* ``hqq``  half-quadratic optimisation of each group's zero point (or scale), calibration-free
  (:mod:`cascade.quant.hqq`);
* ``gptq`` GPTQ (:mod:`cascade.quant.gptq`) on every linear kernel of the decoder blocks, from
  Hessians collected on calibration text (:mod:`cascade.models.calibration`);
* ``awq``  activation-aware scales folded into the preceding op, then a clipping search
  (:mod:`cascade.quant.awq`), from the same calibration statistics;
* ``awq-gptq`` AWQ's scales, folded as ``awq`` does, then GPTQ (instead of the clipping search) on
  the scaled kernels with the Hessian of the scaled inputs, ``diag(1/s) XᵀX diag(1/s)`` (the two
  are complementary: the AWQ paper reports AWQ + GPTQ below either alone at 2-3 bits).

The calibrated methods run **block by block, sequentially**: block ``i``'s statistics are taken on
the outputs of blocks ``0 .. i-1`` *already quantized*, so each block corrects for the error of
those before it.  ``gptq`` goes further inside a block (``within_block``): it quantizes q/k/v,
then takes o_proj's Hessian behind them, and so on to down_proj
(:func:`cascade.models.calibration.staged_block`).  ``awq`` and ``awq-gptq`` take a whole block's
statistics first, since the v->o fold rescales v after o's input is measured.  Tensors outside
the blocks that a rule quantizes (the embedding, an untied LM
head) get RTN, as the GPTQ and AWQ reference implementations do.

The wiring into the model layout: linear kernels are ``(in, out)`` and quantized along ``in``
(axis 0); the embedding is ``(vocab, dim)`` and, if a rule quantizes it, is grouped along ``dim``
(axis 1) so rows can be gathered packed and a tied head can reuse it.  Already-quantized tensors
(a GGUF import) are dequantized first.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import jax
from tqdm.auto import tqdm

from cascade.models.calibration import INPUT_OF, INPUTS
from cascade.models.model import Model
from cascade.quant.qtensor import QuantizedTensor, dequantize, quantize
from cascade.quant.rtn import QuantReport, key_path_str, quantize_params
from cascade.quant.rules import PrecisionRules, is_rules_path
from cascade.quant.spec import IntSpec

METHODS = ("rtn", "gptq", "awq", "hqq", "awq-gptq")
CALIBRATED = ("gptq", "awq", "awq-gptq")
DAMP_RETRIES = (1.0, 10.0, 100.0)  # dampening multipliers tried when a Hessian is not positive definite


def reduction_axis(path: str, shape) -> int:
    return 1 if path.startswith("embed/") else 0


def quantize_model(model: Model, rules, *, method: str = "rtn", calib=None, damp: float = 0.01,
                   act_order: bool = False, block_size: int = 128, awq_grid: int = 20, scale_dtype="float16",
                   progress: bool | None = None) -> tuple[Model, QuantReport]:
    """Quantize ``model`` under ``rules`` (a spec, inline rules, a rules file or
    :class:`cascade.quant.PrecisionRules`) with ``method``; scales and zero points stored in
    ``scale_dtype``.  ``calib``: a :class:`cascade.models.calibration.CalibrationSet` (GPTQ);
    ``damp``, ``act_order``, ``block_size``: GPTQ settings.  The returned model's ``ptq`` records
    the method, its settings and the calibration recipe."""
    if method not in METHODS:
        raise ValueError(f"unknown PTQ method {method!r}; choose one of {', '.join(METHODS)}")
    if method in CALIBRATED and calib is None:
        raise ValueError(f"{method} needs calibration data (--calib FILE)")
    if method not in CALIBRATED and calib is not None:
        raise ValueError(f"{method} does not use calibration data; drop --calib")
    parsed = PrecisionRules.parse(rules)
    if method in CALIBRATED:
        for i in range(model.config.n_layers):
            for layer in BLOCK_LINEARS:
                spec = parsed.spec_for(f"layers_{i}/{layer}/kernel", 2)
                if isinstance(spec, IntSpec) and spec.granularity == "tensor":
                    raise ValueError(f"{method} does not support per-tensor specs ({spec}, for layers_{i}/{layer}/kernel): "
                                     "use a per-channel or grouped spec, or --method rtn/hqq")
    # keep what the user typed ("int8", "attn=int8,*=int4-g64") unless it names a file: then the rules
    label = rules.strip() if isinstance(rules, str) and not is_rules_path(rules) else rules_text(parsed)
    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731
    stored = {key_path_str(p): _nbytes(a) for p, a in jax.tree_util.tree_flatten_with_path(model.params, is_leaf=is_q)[0]}
    n_quantized = sum(is_q(a) for a in jax.tree.leaves(model.params, is_leaf=is_q))
    if n_quantized:
        warnings.warn(f"re-quantizing {n_quantized} already-quantized tensors from their dequantized values "
                      "(errors compound; the report's bytes_before is the stored size)", stacklevel=2)
    params = jax.tree.map(lambda a: dequantize(a, "float32") if is_q(a) else a, model.params, is_leaf=is_q)
    t0 = time.perf_counter()
    quantizer, settings = None, {}
    if method == "hqq":
        from cascade.quant.hqq import hqq_quantize

        def quantizer(path, leaf, spec, axis, sdt):
            return hqq_quantize(leaf, spec, axis=axis, scale_dtype=sdt)
    elif method in CALIBRATED:
        gptq_settings = {"damp": damp, "act_order": act_order, "block_size": block_size}
        if method == "gptq":
            settings = gptq_settings
            block_fn = gptq_block_quantizer(**gptq_settings, scale_dtype=scale_dtype)
        else:
            settings = {"grid": awq_grid, **(gptq_settings if method == "awq-gptq" else {})}
            block_fn = awq_block_quantizer(model.config, grid=awq_grid, scale_dtype=scale_dtype,
                                           gptq=gptq_settings if method == "awq-gptq" else None)
        params, done = calibrated_blocks(params, model.config, parsed, calib, block_fn, desc=method,
                                         within_block=method == "gptq", progress=progress)

        def quantizer(path, leaf, spec, axis, sdt):
            return done[path] if path in done else quantize(leaf, spec, axis=axis, scale_dtype=sdt)
    qparams, report = quantize_params(params, parsed, axis=reduction_axis, scale_dtype=scale_dtype, progress=progress,
                                      quantizer=quantizer)
    report = QuantReport(layers=tuple(dataclasses.replace(r, bytes_before=stored.get(r.path, r.bytes_before))
                                      for r in report.layers))
    ptq = {"method": method, "source": model.source, "settings": settings, "calibration": None if calib is None else dict(calib.recipe),
           "seconds": round(time.perf_counter() - t0, 3)}
    return dataclasses.replace(model, params=qparams, quant=label, ptq=ptq), report


# the linear layers of a block, in the order the forward pass reads them
BLOCK_LINEARS = tuple(INPUT_OF)


def _get(tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _set(tree: dict, path: str, value) -> dict:
    """A copy of the nested dict ``tree`` with ``path`` replaced (the rest shared)."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = value if not rest else _set(tree[head], rest, value)
    return out


def calibrated_blocks(params, cfg, rules: PrecisionRules, calib, quantize_block, *, desc: str,
                      within_block: bool = False, progress: bool | None = None):
    """The sequential calibration loop shared by GPTQ and AWQ (module docs).

    For each block with an integer-spec kernel, ``quantize_block(name, block, specs, stats)``
    returns ``(block', {layer: QuantizedTensor})``: ``block'`` the block's float parameters as the
    method leaves them (AWQ folds scales into norms and kernels; a fake-quant peer may put its
    dequantized kernels there), ``stats`` the block's
    :func:`cascade.models.calibration.block_statistics`.  The next block's inputs are this block's
    outputs with its kernels quantized.

    ``within_block``: also sequential inside the block (GPTQ): ``quantize_block`` is called once per
    linear input, in forward order, with only the layers reading it and ``{input: stats}``, and the
    stats of each input are taken with the layers before it already quantized
    (:func:`cascade.models.calibration.staged_block`: one forward pass per block, not two).
    Returns ``(params', {parameter path: QuantizedTensor})``.
    """
    from cascade.models import calibration

    hidden = calibration.embed_tokens(params, calib.tokens)
    done: dict[str, QuantizedTensor] = {}
    params = dict(params)
    bar = tqdm(range(cfg.n_layers), desc=desc, unit="block", disable=None if progress is None else not progress,
               leave=False)

    def quantize_into(name, specs, stats):
        """Quantize ``specs``' layers of block ``name``; returns the block the forward pass runs on:
        as the method leaves it, with every kernel quantized so far dequantized in."""
        params[name], quantized = quantize_block(name, params[name], specs, stats)
        done.update({f"{name}/{layer}/kernel": qt for layer, qt in quantized.items()})
        return _with_quantized(params[name], name, done)

    for i in bar:
        name = f"layers_{i}"
        block = params[name]
        specs = {layer: rules.spec_for(f"{name}/{layer}/kernel", 2) for layer in BLOCK_LINEARS}
        specs = {layer: spec for layer, spec in specs.items() if isinstance(spec, IntSpec)}
        if specs and within_block:
            def on_input(group, stats, run_block, name=name, specs=specs):
                group_specs = {layer: specs[layer] for layer in INPUTS[group] if layer in specs}
                if not group_specs:
                    return run_block
                return quantize_into(name, group_specs, {group: stats})

            _, hidden = calibration.staged_block(block, cfg, hidden, on_input)
            continue
        if specs:
            block = quantize_into(name, specs, calibration.block_statistics(block, cfg, hidden))
        if i + 1 < cfg.n_layers:  # the next block sees this block's quantized outputs
            hidden = calibration.block_outputs(block, cfg, hidden)
    return params, done


def _with_quantized(block, name: str, done) -> dict:
    """``block`` with every kernel quantized so far (in ``done``) replaced by its dequantized values."""
    for layer in BLOCK_LINEARS:
        qt = done.get(f"{name}/{layer}/kernel")
        if qt is not None:
            block = _set(block, f"{layer}/kernel", dequantize(qt, "float32"))
    return block


def gptq_block_quantizer(*, damp: float, act_order: bool, block_size: int, scale_dtype):
    """``quantize_block`` for :func:`calibrated_blocks`: GPTQ of each kernel from its input's Hessian."""
    from cascade.quant.gptq import gptq_quantize

    def quantize_block(name, block, specs, stats):
        out = {}
        for layer, spec in specs.items():
            out[layer] = _gptq_retrying(gptq_quantize, _get(block, f"{layer}/kernel"), stats[INPUT_OF[layer]].hessian,
                                        spec, f"{name}/{layer}/kernel", damp=damp, block_size=block_size,
                                        act_order=act_order, scale_dtype=scale_dtype)
        return block, out

    return quantize_block


def awq_block_quantizer(cfg, *, grid: int, scale_dtype, gptq: dict | None = None):
    """``quantize_block`` for :func:`calibrated_blocks`: AWQ scales searched for the four inputs of a
    block (q/k/v, o, gate/up, down; the first integer spec of each group), folded into attn_norm, v,
    mlp_norm and up; then each kernel's clipping search on its scaled inputs and quantization, or,
    with ``gptq`` (damp, act_order, block_size), GPTQ on the scaled kernel with the scaled inputs'
    Hessian ``diag(1/s) XᵀX diag(1/s)``."""
    from cascade.quant.gptq import gptq_quantize
    import numpy as np

    from cascade.quant import awq
    from cascade.quant.qtensor import quantize_with_range

    h, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    o_index = awq.kv_head_index(h, kvh, hd)

    def quantize_block(name, block, specs, stats):
        scaled_inputs, scales = {}, {}
        for group, layers in INPUTS.items():  # the folds touch disjoint axes, so their order does not matter
            st = stats[group]
            x = np.asarray(st.sample, np.float32)
            group_specs = [specs[layer] for layer in layers if layer in specs]
            if not group_specs:
                scaled_inputs[group] = x
                continue
            ws = [_get(block, f"{layer}/kernel") for layer in layers]
            if group == "o":
                s, _ = awq.awq_search_scale(ws, x, awq.reduce_to_kv(st.mean_abs, h, kvh, hd), group_specs[0],
                                            grid=grid, index=o_index, scale_dtype=scale_dtype)
                block = awq.fold_v_into_o(block, s, h, kvh, hd)
                s = np.asarray(s)[o_index]
            else:
                s, _ = awq.awq_search_scale(ws, x, st.mean_abs, group_specs[0], grid=grid, scale_dtype=scale_dtype)
                if group == "down":
                    block = awq.fold_up_into_down(block, s)
                else:
                    block = awq.fold_norm_scale(block, f"{group}_norm", layers, s)
            scales[group] = np.asarray(s, np.float64)
            scaled_inputs[group] = x / np.asarray(s, np.float32)[None, :]
        out = {}
        for layer, spec in specs.items():
            w = _get(block, f"{layer}/kernel")
            if gptq is not None:
                s = scales[INPUT_OF[layer]]
                hessian = stats[INPUT_OF[layer]].hessian / np.outer(s, s)
                out[layer] = _gptq_retrying(gptq_quantize, w, hessian, spec, f"{name}/{layer}/kernel", **gptq,
                                            scale_dtype=scale_dtype)
                continue
            x = scaled_inputs[INPUT_OF[layer]]
            lo, hi = awq.awq_search_clip(w, x, spec, grid=grid, scale_dtype=scale_dtype)
            out[layer] = quantize_with_range(w, spec, lo, hi, axis=0, scale_dtype=scale_dtype)
        return block, out

    return quantize_block


def _gptq_retrying(gptq_quantize, w, h, spec, path: str, *, damp: float, **kw) -> QuantizedTensor:
    """GPTQ with ``damp``, retried with 10x and 100x the dampening if the Hessian is not positive
    definite; a clear error naming the layer after that."""
    tries = [damp] + [max(damp, 0.01) * f for f in DAMP_RETRIES[1:]]
    for d in tries:
        try:
            return gptq_quantize(w, h, spec, damp=d, **kw)
        except ValueError as e:
            if "positive definite" not in str(e):
                raise ValueError(f"{path}: {e}") from None
            last = e
    raise ValueError(f"{path}: {last} (dampening up to {tries[-1]:g} x the mean diagonal tried); "
                     "raise --damp or calibrate on more text") from None


def rules_text(rules: PrecisionRules) -> str:
    import json

    return json.dumps(rules.to_json(), sort_keys=True)


def _nbytes(a) -> int:
    return a.nbytes if isinstance(a, QuantizedTensor) else a.size * a.dtype.itemsize


def weight_bytes(params) -> int:
    """Bytes of every parameter as stored (packed codes + scales + zeros for quantized ones)."""
    return sum(_nbytes(a) for a in jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, QuantizedTensor)))
