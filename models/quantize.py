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
  are complementary: the AWQ paper reports AWQ + GPTQ below either alone at 2-3 bits);
* ``autoround`` learned rounding and clipping (:mod:`cascade.quant.autoround`), trained by signed
  gradient descent on each block's output error against the float block;
* ``smoothquant`` SmoothQuant's per-channel smoothing (:mod:`cascade.quant.smoothquant`) of each
  block's four linear inputs, folded into attn_norm, v, mlp_norm and up, then RTN: the method for
  ``w8a8`` (int8 activations), where it moves activation outliers into the weights.

**Static activation scales.**  A ``w8a8-static`` weight needs the scale of its int8 inputs.  After
any method has quantized the weights, :func:`calibrate_act_scales` runs the quantized model over
the calibration set block by block and sets each such weight's ``act_scale`` to ``max|x| / 127`` of
its input (one scale per matrix), measured with the blocks before it already deployed as they will
run (static activations included).  So every method takes calibration data when the rules name
``w8a8-static``, RTN too.

The calibrated methods run **block by block, sequentially**: block ``i``'s statistics are taken on
the outputs of blocks ``0 .. i-1`` *already quantized*, so each block corrects for the error of
those before it.  ``gptq`` goes further inside a block (``within_block``): it quantizes q/k/v,
then takes o_proj's Hessian behind them, and so on to down_proj
(:func:`cascade.models.calibration.staged_block`).  ``awq`` and ``awq-gptq`` take a whole block's
statistics first, since the v->o fold rescales v after o's input is measured.  ``autoround``
(``targets``) also carries the float model's hidden states: block ``i`` is trained so that, on the
quantized model's inputs, it reproduces the float block's outputs on the float model's inputs (the
reference's ``enable_quanted_input``).  Tensors outside
the blocks that a rule quantizes (the embedding, an untied LM
head) get RTN, as the GPTQ and AWQ reference implementations do.

The wiring into the model layout: linear kernels are ``(in, out)`` and quantized along ``in``
(axis 0); the embedding is ``(vocab, dim)`` and, if a rule quantizes it, is grouped along ``dim``
(axis 1) so rows can be gathered packed and a tied head can reuse it.  Already-quantized tensors
(a GGUF import) are dequantized first.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from functools import lru_cache, partial

import jax
import jax.numpy as jnp

from cascade.console import progress_bar
from cascade.models.calibration import INPUT_OF, INPUTS
from cascade.models.model import Model
from cascade.quant.qtensor import QuantizedTensor, dequantize, quantize
from cascade.quant.rtn import QuantReport, key_path_str, quantize_params
from cascade.quant.rules import PrecisionRules
from cascade.quant.spec import IntSpec

METHODS = ("rtn", "gptq", "awq", "hqq", "awq-gptq", "autoround", "smoothquant")
CALIBRATED = ("gptq", "awq", "awq-gptq", "autoround", "smoothquant")
# what ``method=None`` picks (:func:`choose_method`), from the measurements in docs/guides/ptq.md
# ("Defaults"): with calibration text AWQ's scales then GPTQ, each group's range searched for the
# lowest squared error (``-mse``); without it round to nearest (HQQ measured worse on SmolLM2)
DEFAULT_CALIBRATED = "awq-gptq"
DEFAULT_CALIBRATED_CLIP = "mse"
DEFAULT_UNCALIBRATED = "rtn"
DAMP_RETRIES = (1.0, 10.0, 100.0)  # dampening multipliers tried when a Hessian is not positive definite


def reduction_axis(path: str, shape) -> int:
    return 1 if path.startswith("embed/") else 0


def choose_method(rules, shapes: dict, *, calibrated: bool, tied: bool = False,
                  where: str = "the model") -> tuple[str, PrecisionRules, str]:
    """The default PTQ method for ``rules`` on a model with ``shapes`` (``method=None``):
    ``(method, rules, why)``.  With calibration text: :data:`DEFAULT_CALIBRATED` with every
    weight-only integer spec's min-max range replaced by the ``-mse`` search (a range estimator:
    the stored format is the same), or ``smoothquant`` when the rules quantize activations
    (``w8a8``), or ``rtn`` when a spec is one the calibrated methods cannot produce (per-tensor,
    ``-had``); without: :data:`DEFAULT_UNCALIBRATED`.  ``why`` says which case, for the output."""
    parsed = PrecisionRules.parse(rules)
    if not calibrated:
        return DEFAULT_UNCALIBRATED, parsed, "the default without calibration text"
    specs = [s for _, s in parsed.rules] + ([parsed.default] if parsed.default is not None else [])
    if not any(isinstance(s, IntSpec) for s in specs):
        return "rtn", parsed, "rtn: the rules quantize nothing to integers, so there is nothing to calibrate"
    if any(isinstance(s, IntSpec) and s.act is not None for s in specs):
        method, why = "smoothquant", "the default with calibration text for w8a8 rules"
    else:
        method, why = DEFAULT_CALIBRATED, f"the default with calibration text ({DEFAULT_CALIBRATED_CLIP} ranges)"

        def searched(spec):
            if isinstance(spec, IntSpec) and spec.act is None and spec.clip == "minmax":
                return dataclasses.replace(spec, clip=DEFAULT_CALIBRATED_CLIP)
            return spec
        parsed = dataclasses.replace(parsed, rules=tuple((p, searched(s)) for p, s in parsed.rules),
                                     default=None if parsed.default is None else searched(parsed.default))
    try:
        check_quantize(parsed, shapes, method=method, tied=tied, where=where)
    except ValueError as e:
        return "rtn", PrecisionRules.parse(rules), f"rtn: {method}, the default with calibration text, cannot ({e})"
    return method, parsed, why


def quantize_model(model: Model, rules, *, method: str | None = None, calib=None, damp: float = 0.01,
                   act_order: bool = False, block_size: int = 128, awq_grid: int = 20, iters: int | None = None,
                   lr: float | None = None, batch: int | None = None, alpha: "float | str | None" = None,
                   ranges: dict | None = None,
                   scale_dtype="float16", progress: bool | None = None) -> tuple[Model, QuantReport]:
    """Quantize ``model`` under ``rules`` (a spec, inline rules, a rules file or
    :class:`cascade.quant.PrecisionRules`) with ``method`` (None: :func:`choose_method` picks it from
    the rules and whether ``calib`` is given); scales and zero points stored in ``scale_dtype``.  ``calib``: a :class:`cascade.models.calibration.CalibrationSet` (GPTQ);
    ``damp``, ``act_order``, ``block_size``: GPTQ settings; ``iters``, ``lr``, ``batch``: AutoRound's
    steps per block (default 200), initial rate (default ``1 / iters``) and calibration sequences
    per step (default 8); ``alpha``: SmoothQuant's migration strength (default 0.5), or ``"auto"``:
    chosen per input of each block from :data:`cascade.quant.smoothquant.ALPHA_GRID` by the W8A8
    output error on calibration rows (:func:`cascade.quant.smoothquant.search_alphas`).  Rules naming
    ``w8a8-static`` need ``calib`` with any method (the activation scales are measured on it).
    ``ranges``: ``{path: (lo, hi)}`` in the stored scale's layout, a given range per matrix instead
    of the spec's estimate (RTN only: QAT's learned clipping).  The returned model's ``ptq`` records the method, its settings and the calibration recipe."""
    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731
    shapes = {key_path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(model.params, is_leaf=is_q)[0]}
    chosen = None
    if method is None and ranges:
        method, chosen = "rtn", "given ranges are quantized with rtn"
    elif method is None:
        method, rules, chosen = choose_method(rules, shapes, calibrated=calib is not None,
                                              tied=model.config.tie_embeddings, where=model.source or "the model")
    parsed = check_quantize(rules, shapes, method=method, tied=model.config.tie_embeddings,
                            where=model.source or "the model")
    static = static_act_paths(model.params, parsed)
    if chosen and not (method in CALIBRATED or static):
        calib = None  # the default fell back to a method that reads no calibration data
    if calib is None and (method in CALIBRATED or static):
        why = method if method in CALIBRATED else f"{static[0]} (w8a8-static: its activation scale)"
        raise ValueError(f"{why} needs calibration data (--calib FILE)")
    if calib is not None and not (method in CALIBRATED or static):
        raise ValueError(f"{method} does not use calibration data; drop --calib")
    if method != "autoround" and (iters, lr, batch) != (None, None, None):
        raise ValueError(f"iters, lr and batch are settings of autoround, not of {method}")
    if method != "smoothquant" and alpha is not None:
        raise ValueError(f"alpha is a setting of smoothquant, not of {method}")
    if isinstance(alpha, str) and alpha != "auto":
        raise ValueError(f"SmoothQuant's alpha is a number in [0, 1] or 'auto', got {alpha!r}")
    if ranges and method != "rtn":
        raise ValueError(f"given ranges are quantized with rtn, not {method}")
    # the rules with every grid written out ("int3-g32-full", "attn=int8,*=int4-g64-full"; JSON text
    # when inline rules cannot say them): what quantize prints and the checkpoint records
    label = parsed.text()
    stored = {key_path_str(p): _nbytes(a) for p, a in jax.tree_util.tree_flatten_with_path(model.params, is_leaf=is_q)[0]}
    n_quantized = sum(is_q(a) for a in jax.tree.leaves(model.params, is_leaf=is_q))
    if n_quantized:
        warnings.warn(f"re-quantizing {n_quantized} already-quantized tensors from their dequantized values "
                      "(errors compound; the report's bytes_before is the stored size)", stacklevel=2)
    params = jax.tree.map(lambda a: dequantize(a, "float32") if is_q(a) else a, model.params, is_leaf=is_q)
    t0 = time.perf_counter()
    quantizer, settings = None, {}
    if ranges:
        from cascade.quant.qtensor import quantize_with_range

        def with_range(path, leaf, spec, axis, sdt):
            if path not in ranges:
                return quantize(leaf, spec, axis=axis, scale_dtype=sdt)
            return quantize_with_range(leaf, spec, *ranges[path], axis=axis, scale_dtype=sdt)
        quantizer = with_range
    elif method == "hqq":
        from cascade.quant.hqq import hqq_quantize

        def quantizer(path, leaf, spec, axis, sdt):
            return hqq_quantize(leaf, spec, axis=axis, scale_dtype=sdt)
    elif method in CALIBRATED:
        gptq_settings = {"damp": damp, "act_order": act_order, "block_size": block_size}
        if method == "gptq":
            settings = gptq_settings
            block_fn = gptq_block_quantizer(**gptq_settings, scale_dtype=scale_dtype)
        elif method == "smoothquant":
            from cascade.quant import smoothquant

            chosen: dict = {}
            settings = {"alpha": smoothquant.DEFAULT_ALPHA if alpha is None else alpha if alpha == "auto" else float(alpha)}
            if alpha == "auto":
                settings.update(grid=list(smoothquant.ALPHA_GRID), alphas=chosen)  # filled in block by block
            block_fn = smoothquant_block_quantizer(model.config, alpha=settings["alpha"], scale_dtype=scale_dtype,
                                                   chosen=chosen)
        elif method == "autoround":
            from cascade.quant import autoround

            settings = {"iters": autoround.DEFAULT_ITERS if iters is None else iters, "lr": lr,
                        "batch": autoround.DEFAULT_BATCH if batch is None else batch, "seed": calib.recipe["seed"]}
            block_fn = autoround_block_quantizer(model.config, **settings, scale_dtype=scale_dtype)
        else:
            settings = {"grid": awq_grid, **(gptq_settings if method == "awq-gptq" else {})}
            block_fn = awq_block_quantizer(model.config, grid=awq_grid, scale_dtype=scale_dtype,
                                           gptq=gptq_settings if method == "awq-gptq" else None)
        params, done = calibrated_blocks(params, model.config, parsed, calib, block_fn, desc=method,
                                         within_block=method == "gptq", targets=method == "autoround",
                                         hessian=method != "smoothquant", progress=progress,
                                         keep_tokens=smoothquant.SEARCH_TOKENS if settings.get("alpha") == "auto" else None)

        def quantizer(path, leaf, spec, axis, sdt):
            return done[path] if path in done else quantize(leaf, spec, axis=axis, scale_dtype=sdt)
    qparams, report = quantize_params(params, parsed, axis=reduction_axis, scale_dtype=scale_dtype, progress=progress,
                                      quantizer=quantizer)
    if static:
        qparams = calibrate_act_scales(qparams, model.config, calib, progress=progress)
    report = QuantReport(layers=tuple(dataclasses.replace(r, bytes_before=stored.get(r.path, r.bytes_before),
                                                          bytes_after=_nbytes(_get(qparams, r.path)))
                                      for r in report.layers))
    ptq = {"method": method, "source": model.source, "settings": settings, "calibration": None if calib is None else dict(calib.recipe),
           "seconds": round(time.perf_counter() - t0, 3), **({"default": chosen} if chosen else {})}
    return dataclasses.replace(model, params=qparams, quant=label, ptq=ptq), report


# the linear layers of a block, in the order the forward pass reads them
BLOCK_LINEARS = tuple(INPUT_OF)
_BLOCK_KERNEL = re.compile(r"layers_([0-9]+)/(" + "|".join(map(re.escape, BLOCK_LINEARS)) + ")/kernel")


def check_quantize(rules, shapes: dict, *, method: str = "rtn", tied: bool = False,
                   where: str = "the model") -> PrecisionRules:
    """Every check of quantizing a model with ``shapes`` (``{parameter path: shape}``, e.g.
    :func:`cascade.models.llama.param_shapes` of its config) under ``rules`` with ``method`` that
    needs neither its weights nor calibration data: the method exists, every rule decides some
    parameter (:meth:`cascade.quant.PrecisionRules.check_used`: a typo is refused, not ignored),
    and the method can produce every spec the rules give.  :func:`quantize_model` runs it before
    any work; ``cascade quantize`` runs it from the model's config before loading the model.
    Returns the parsed rules; a ValueError says what is wrong."""
    if method not in METHODS:
        raise ValueError(f"unknown PTQ method {method!r}; choose one of {', '.join(METHODS)}")
    parsed = PrecisionRules.parse(rules)
    parsed.check_used(((path, len(shape)) for path, shape in shapes.items()), where)
    specs = {path: parsed.spec_for(path, len(shape)) for path, shape in shapes.items()}
    ints = {path: spec for path, spec in specs.items() if isinstance(spec, IntSpec)}
    if method not in ("rtn", "smoothquant"):
        for path, spec in ints.items():
            if spec.rotate:
                raise ValueError(f"{method} cannot produce {spec} weights (stored Hadamard-rotated; "
                                 f"{path}): use --method rtn or smoothquant for them")
    embed = ints.get("embed/embedding")
    if embed is not None and embed.act == "static":
        head = ", and here the tied LM head," if tied else ""
        raise ValueError(f"embed/embedding is a lookup{head} not a linear layer: w8a8-static applies to linear layers; "
                         "use w8a8 (per-token activations) or a weight-only spec for it")
    if method in CALIBRATED:  # the block kernels, in forward order
        blocks = sorted((int(m.group(1)), BLOCK_LINEARS.index(m.group(2)), path) for path in ints
                        if (m := _BLOCK_KERNEL.fullmatch(path)))
        for _, _, path in blocks:
            spec = ints[path]
            if spec.granularity == "tensor":
                raise ValueError(f"{method} does not support per-tensor specs ({spec}, for {path}): "
                                 "use a per-channel or grouped spec, or --method rtn/hqq")
    return parsed


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
                      within_block: bool = False, targets: bool = False, hessian: bool = True,
                      progress: bool | None = None, keep_tokens: int | None = None):
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

    ``targets``: ``stats`` is ``(x, y)`` instead: ``x`` (N, T, dim) the hidden states entering the
    block in the model quantized so far, ``y`` the float block's outputs on the float model's
    hidden states (AutoRound's reconstruction target).
    ``hessian=False``: the statistics without ``XᵀX`` (SmoothQuant needs only the maxima).
    ``keep_tokens``: input rows kept per input in ``stats`` (default AWQ's search rows with
    ``hessian``, none without).  Returns ``(params', {parameter path: QuantizedTensor})``.
    """
    from cascade.models import calibration

    hidden = calibration.embed_tokens(params, calib.tokens)
    hidden_float = hidden if targets else None
    if keep_tokens is None:  # AWQ's search rows; SmoothQuant at a fixed alpha needs none
        keep_tokens = calibration.DEFAULT_KEEP_TOKENS if hessian else 0
    keep = keep_tokens
    done: dict[str, QuantizedTensor] = {}
    params = dict(params)
    bar = progress_bar(range(cfg.n_layers), desc=desc, unit="block", enabled=progress, leave=False)

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
        if targets:
            target = calibration.block_outputs(block, cfg, hidden_float)
            if specs:
                block = quantize_into(name, specs, (hidden, target))
            hidden_float = target
        elif specs:
            block = quantize_into(name, specs, calibration.block_statistics(block, cfg, hidden, keep_tokens=keep,
                                                                            hessian=hessian))
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


def smoothquant_block_quantizer(cfg, *, alpha: "float | str", scale_dtype, chosen: dict | None = None):
    """``quantize_block`` for :func:`calibrated_blocks`: SmoothQuant's scales for the block's four
    inputs from their per-channel ``max|x|``, folded (:func:`cascade.quant.smoothquant.smooth_block`),
    then RTN of each integer-spec kernel.  ``alpha="auto"``: each input's strength searched on the
    kept input rows (:func:`cascade.quant.smoothquant.search_alphas`; inputs with no W8A8 reader
    keep the default), recorded in ``chosen[block name]``."""
    from cascade.quant import smoothquant

    heads = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)

    def quantize_block(name, block, specs, stats):
        act_max = {k: st.abs_max for k, st in stats.items()}
        a = alpha
        if alpha == "auto":
            best, _ = smoothquant.search_alphas(block, act_max, {k: st.sample for k, st in stats.items()}, specs,
                                                **heads, scale_dtype=scale_dtype)
            a = {k: best.get(k, smoothquant.DEFAULT_ALPHA) for k in smoothquant.INPUTS}
            if chosen is not None:
                chosen[name] = {k: float(v) for k, v in best.items()}
        block, _ = smoothquant.smooth_block(block, act_max, alpha=a, **heads)
        return block, {layer: quantize(_get(block, f"{layer}/kernel"), spec, axis=0, scale_dtype=scale_dtype)
                       for layer, spec in specs.items()}

    return quantize_block


def static_act_paths(params, rules: PrecisionRules) -> list[str]:
    """The parameter paths that ``rules`` quantize as ``w8a8-static`` (they need activation scales)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda a: isinstance(a, QuantizedTensor))[0]:
        name = key_path_str(path)
        spec = rules.spec_for(name, len(leaf.shape))
        if isinstance(spec, IntSpec) and spec.act == "static":
            out.append(name)
    return out


def needs_calibration(method: str, rules, params) -> bool:
    """Whether quantizing ``params`` under ``rules`` with ``method`` reads calibration data."""
    return method in CALIBRATED or bool(static_act_paths(params, PrecisionRules.parse(rules)))


def calibrate_act_scales(params, cfg, calib, *, progress: bool | None = None):
    """``params`` with every ``w8a8-static`` kernel's ``act_scale`` set to ``max|x| / 127`` of its
    input over ``calib`` (module docstring; ``max|x R| / 127`` for ``w8a8-static-had``): block by block, each block's inputs measured with its
    own static weights run per token (their scales are what is being measured) and the blocks
    before it exactly as deployed."""
    from cascade.models import calibration
    from cascade.quant.activations import ACT_QMAX
    from cascade.quant.qtensor import with_act_scale

    def is_static(a):
        return isinstance(a, QuantizedTensor) and a.spec.act == "static"

    def as_dynamic(a):
        if not is_static(a):
            return a
        return QuantizedTensor(a.packed, a.scale, a.zero, spec=dataclasses.replace(a.spec, act="dynamic"),
                               shape=a.shape, axis=a.axis, dtype=a.dtype)

    def input_absmax(found: dict, qt, measure):  # max|x|, or max|x R| for a -had weight (each measured once)
        key = bool(qt.spec.rotate)
        if key not in found:
            found[key] = measure(key)
        return found[key]

    params = dict(params)
    hidden = calibration.embed_tokens(params, calib.tokens)
    bar = progress_bar(range(cfg.n_layers), desc="activation scales", unit="block", enabled=progress, leave=False)
    for i in bar:
        name = f"layers_{i}"
        block = params[name]
        if any(is_static(a) for a in jax.tree.leaves(block, is_leaf=is_static)):
            found: dict = {}
            dynamic = jax.tree.map(as_dynamic, block, is_leaf=is_static)
            for layer in BLOCK_LINEARS:
                qt = _get(block, f"{layer}/kernel")
                if is_static(qt):
                    amax = input_absmax(found, qt, lambda r: calibration.block_input_absmax(dynamic, cfg, hidden, rotated=r))
                    block = _set(block, f"{layer}/kernel", with_act_scale(qt, _act_scale(amax[INPUT_OF[layer]], ACT_QMAX)))
            params[name] = block
        hidden = calibration.block_outputs(block, cfg, hidden)
    head = params.get("lm_head", {}).get("kernel")
    if is_static(head):
        amax = input_absmax({}, head, lambda r: calibration.final_norm_absmax(params["final_norm"], cfg, hidden, rotated=r))
        params["lm_head"] = {**params["lm_head"], "kernel": with_act_scale(head, _act_scale(amax, ACT_QMAX))}
    return params


def _act_scale(amax, qmax: int) -> float:
    amax = float(amax)
    return amax / qmax if amax > 0 else 1.0


def autoround_block_quantizer(cfg, *, iters: int, lr: float | None, batch: int, seed: int, scale_dtype):
    """``quantize_block`` for :func:`calibrated_blocks` with ``targets``: AutoRound's rounding and
    clipping of all the block's integer-spec kernels together, ``iters`` signed-gradient steps on
    the mean squared error between the block's output (kernels fake-quantized, on the quantized
    model's inputs) and the float block's, ``batch`` calibration sequences drawn at random per step
    (:mod:`cascade.quant.autoround`)."""
    import numpy as np

    from cascade.quant import autoround

    rng = np.random.default_rng(seed)

    def quantize_block(name, block, specs, data):
        x, y = data
        kernels = {layer: _get(block, f"{layer}/kernel") for layer in specs}
        layers = tuple((layer, specs[layer], tuple(kernels[layer].shape)) for layer in specs)
        state = {layer: autoround.init(kernels[layer], specs[layer]) for layer in specs}
        consts = {layer: c for layer, (c, _) in state.items()}
        params = {layer: p for layer, (_, p) in state.items()}
        n = x.shape[0]
        rows = min(batch, n)

        def batches(i):
            pick = np.sort(rng.choice(n, rows, replace=False))
            return jnp.asarray(x[pick]), jnp.asarray(y[pick])

        def step(p, xy, lr_t):
            return _autoround_step(p, consts, block, *xy, lr_t, cfg, layers, micro_batch(rows))

        best, _ = autoround.minimize(step, params, batches, iters=iters, lr=lr)
        out = {layer: autoround.finalize(consts[layer], best[layer], spec, shape, scale_dtype=scale_dtype,
                                         dtype=kernels[layer].dtype) for layer, spec, shape in layers}
        return block, out

    return quantize_block


MICRO_BATCH = 2  # sequences per forward/backward inside a step: keeps attention buffers small


def micro_batch(rows: int) -> int:
    """Sequences per micro-batch for a step on ``rows`` sequences: the largest divisor of ``rows``
    up to :data:`MICRO_BATCH`.  The step's gradient is the sum over micro-batches, so the result
    does not depend on it; the speed does (XLA on CPU slows down on buffers above ~16 MB, and one
    sequence's attention scores at ctx 512 are 4-8 MB here: 1.2-1.4x faster a step than 8 at once,
    measured on stories260K and default-large)."""
    return max(c for c in range(1, min(rows, MICRO_BATCH) + 1) if rows % c == 0)


@partial(jax.jit, static_argnames=("cfg", "layers", "chunk"))
def _autoround_step(params, consts, block, x, y, lr, cfg, layers, chunk=MICRO_BATCH):
    """One AutoRound step on a block: (loss at ``params``, ``params`` after a signed step).  The
    loss is the mean squared error over all of ``x``'s rows, its gradient accumulated over
    micro-batches of ``chunk`` sequences (a ``lax.scan``)."""
    from cascade.models.calibration import _positions
    from cascade.models.llama import Block
    from cascade.quant import autoround

    def loss(p, xc, yc):
        b = block
        for layer, spec, shape in layers:
            b = _set(b, f"{layer}/kernel", autoround.kernel(consts[layer], p[layer], spec, shape))
        out, _ = Block(cfg).apply({"params": b}, xc, _positions(xc), None)
        err = out.astype(jnp.float32) - yc
        return jnp.sum(err * err)

    def accumulate(carry, xy):
        total, grads = carry
        value, g = jax.value_and_grad(loss)(params, *xy)
        return (total + value, jax.tree.map(jnp.add, grads, g)), None

    if x.shape[0] % chunk:
        raise ValueError(f"{x.shape[0]} sequences do not split into micro-batches of {chunk}")
    n = x.shape[0] // chunk
    xs = x.reshape(n, chunk, *x.shape[1:])
    ys = y.reshape(n, chunk, *y.shape[1:])
    zero = (jnp.float32(0.0), jax.tree.map(jnp.zeros_like, params))
    (total, grads), _ = jax.lax.scan(accumulate, zero, (xs, ys))
    # sign(sum of gradients) == sign(gradient of the mean): the step is the unchunked one's.
    return total / y.size, {layer: autoround.signsgd_update(params[layer], grads[layer], lr) for layer in params}


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


def quantize_with_method(model: Model, rules, *, method: str | None = None, calib=None, damp: float = 0.01,
                         act_order: bool = False, iters: int | None = None, batch: int | None = None,
                         alpha: "float | str | None" = None, scale_dtype="float16",
                         progress: bool | None = None) -> tuple[Model, QuantReport]:
    """:func:`quantize_model` with ``method``, handed only what it reads: ``calib`` only when the
    method or a ``w8a8-static`` rule calibrates (:func:`needs_calibration`), ``damp``/``act_order``
    only to the GPTQ-based methods, ``iters``/``batch`` only to autoround and ``alpha`` only to
    smoothquant (where ``None`` keeps the method's default).  One call for every caller that takes a
    method and its settings as options (the CLI, the benches,
    :func:`cascade.models.workflow.auto_mixed_precision`).  ``method=None``: the default
    (:func:`choose_method`, with ``calib`` when given)."""
    if method is None:
        return quantize_model(model, rules, calib=calib, scale_dtype=scale_dtype, progress=progress)
    extra = {"damp": damp, "act_order": act_order} if method in ("gptq", "awq-gptq") else {}
    if method == "autoround":
        extra.update({k: v for k, v in (("iters", iters), ("batch", batch)) if v is not None})
    if method == "smoothquant" and alpha is not None:
        extra["alpha"] = alpha
    uses_calib = needs_calibration(method, rules, model.params)
    return quantize_model(model, rules, method=method, calib=calib if uses_calib else None, scale_dtype=scale_dtype,
                          progress=progress, **extra)


@lru_cache(maxsize=64)
def config_param_shapes(cfg) -> tuple:
    """``(path, shape)`` of every parameter of ``cfg`` (traced once per config: a budget check plans
    several times)."""
    from cascade.models.llama import param_shapes

    return tuple(param_shapes(cfg).items())


@lru_cache(maxsize=4096)
def quantized_nbytes(shape: tuple, spec, axis: int, scale_dtype: str) -> int:
    """Bytes of a ``shape`` tensor quantized under ``spec`` (traced with ``jax.eval_shape``, never
    allocated; cached, since a model repeats a few shapes and a budget check plans several times)."""
    return jax.eval_shape(partial(quantize, spec=spec, axis=axis, scale_dtype=scale_dtype),
                          jax.ShapeDtypeStruct(shape, jnp.float32)).nbytes


def planned_weight_bytes(cfg, rules, *, scale_dtype="float16") -> int:
    """Bytes of a model's weights after quantizing under ``rules`` (what :func:`quantize_model`
    stores), from the config alone: each parameter's shape and the spec its rule gives it (codes,
    scales and zero points of an integer spec; the cast of a float spec; float32 for a parameter no
    rule touches, as quantization leaves a dequantized import)."""
    from cascade.quant.spec import FloatSpec

    parsed = PrecisionRules.parse(rules)
    total = 0
    for path, shape in config_param_shapes(cfg):
        spec = parsed.spec_for(path, len(shape))
        n = math.prod(shape)
        if spec is None:
            total += 4 * n
        elif isinstance(spec, FloatSpec):
            total += n * spec.bits // 8
        else:
            total += quantized_nbytes(tuple(shape), spec, reduction_axis(path, shape), str(scale_dtype))
    return total


def _nbytes(a) -> int:
    return a.nbytes if isinstance(a, QuantizedTensor) else a.size * a.dtype.itemsize


def weight_bytes(params) -> int:
    """Bytes of every parameter as stored (packed codes + scales + zeros for quantized ones)."""
    return sum(_nbytes(a) for a in jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, QuantizedTensor)))


SOURCE_A8 = "source-a8"  # `--quant source-a8`: the loaded codes as they are, with int8 activations


def source_a8(model: Model) -> Model:
    """``model`` as loaded with every int8 and int4 weight it holds run with int8 activations per
    block (its spec gains ``-a8``; the codes, scales and bytes are unchanged): a GGUF Q4_0/Q4_1/Q8_0
    import then computes exactly llama.cpp's integer arithmetic for those types.  Other weights
    (float, 2/3-bit, w8a8) stay as they are; a model with no int8/int4 weight is a ValueError."""
    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731
    changed = 0

    def mark(a):
        nonlocal changed
        if not is_q(a) or a.spec.act is not None or a.spec.bits not in (4, 8) or a.spec.a8:
            return a
        changed += 1
        return QuantizedTensor(a.packed, a.scale, a.zero, a.act_scale, spec=dataclasses.replace(a.spec, a8=True),
                               shape=a.shape, axis=a.axis, dtype=a.dtype)

    params = jax.tree.map(mark, model.params, is_leaf=is_q)
    if not changed and not any(is_q(a) and a.spec.a8 for a in jax.tree.leaves(model.params, is_leaf=is_q)):
        raise ValueError(f"{SOURCE_A8}: {model.source} holds no int8 or int4 weight to run with int8 activations")
    quant = f"{model.quant}-a8" if model.quant and not str(model.quant).endswith("-a8") else model.quant
    return dataclasses.replace(model, params=params, quant=quant or SOURCE_A8)
