"""Quantize a loaded model's weights under precision rules (RTN for now), with a report.

The wiring of :func:`cascade.quant.quantize_params` into the model layout: linear kernels are
``(in, out)`` and quantized along ``in`` (axis 0); the embedding is ``(vocab, dim)`` and, if a
rule quantizes it, is grouped along ``dim`` (axis 1) so rows can be gathered packed and a tied
head can reuse it.  Already-quantized tensors (a GGUF import) are dequantized first.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax

from cascade.models.model import Model
from cascade.quant.qtensor import QuantizedTensor, dequantize
from cascade.quant.rtn import QuantReport, key_path_str, quantize_params
from cascade.quant.rules import PrecisionRules, is_rules_path


def reduction_axis(path: str, shape) -> int:
    return 1 if path.startswith("embed/") else 0


def quantize_model(model: Model, rules, *, scale_dtype="float16", progress: bool | None = None) -> tuple[Model, QuantReport]:
    """RTN-quantize ``model`` under ``rules`` (a spec, inline rules, a rules file or
    :class:`cascade.quant.PrecisionRules`); scales and zero points stored in ``scale_dtype``."""
    parsed = PrecisionRules.parse(rules)
    # keep what the user typed ("int8", "attn=int8,*=int4-g64") unless it names a file: then the rules
    label = rules.strip() if isinstance(rules, str) and not is_rules_path(rules) else rules_text(parsed)
    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731
    stored = {key_path_str(p): _nbytes(a) for p, a in jax.tree_util.tree_flatten_with_path(model.params, is_leaf=is_q)[0]}
    n_quantized = sum(is_q(a) for a in jax.tree.leaves(model.params, is_leaf=is_q))
    if n_quantized:
        warnings.warn(f"re-quantizing {n_quantized} already-quantized tensors from their dequantized values "
                      "(errors compound; the report's bytes_before is the stored size)", stacklevel=2)
    params = jax.tree.map(lambda a: dequantize(a, "float32") if is_q(a) else a, model.params, is_leaf=is_q)
    qparams, report = quantize_params(params, parsed, axis=reduction_axis, scale_dtype=scale_dtype, progress=progress)
    report = QuantReport(layers=tuple(dataclasses.replace(r, bytes_before=stored.get(r.path, r.bytes_before))
                                      for r in report.layers))
    return dataclasses.replace(model, params=qparams, quant=label), report


def rules_text(rules: PrecisionRules) -> str:
    import json

    return json.dumps(rules.to_json(), sort_keys=True)


def _nbytes(a) -> int:
    return a.nbytes if isinstance(a, QuantizedTensor) else a.size * a.dtype.itemsize


def weight_bytes(params) -> int:
    """Bytes of every parameter as stored (packed codes + scales + zeros for quantized ones)."""
    return sum(_nbytes(a) for a in jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, QuantizedTensor)))
