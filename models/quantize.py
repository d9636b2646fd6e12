"""Quantize a loaded model's weights under precision rules (RTN for now), with a report.

The wiring of :func:`quant.quantize_params` into the model layout: linear kernels are
``(in, out)`` and quantized along ``in`` (axis 0); the embedding is ``(vocab, dim)`` and, if a
rule quantizes it, is grouped along ``dim`` (axis 1) so rows can be gathered packed and a tied
head can reuse it.  Already-quantized tensors (a GGUF import) are dequantized first.
"""

from __future__ import annotations

import dataclasses

import jax

from models.model import Model
from quant.qtensor import QuantizedTensor, dequantize
from quant.rtn import QuantReport, quantize_params
from quant.rules import PrecisionRules


def reduction_axis(path: str, shape) -> int:
    return 1 if path.startswith("embed/") else 0


def quantize_model(model: Model, rules, *, progress: bool | None = None) -> tuple[Model, QuantReport]:
    label = rules.strip() if isinstance(rules, str) else None
    rules = PrecisionRules.parse(rules)
    params = jax.tree.map(lambda a: dequantize(a, "float32") if isinstance(a, QuantizedTensor) else a,
                          model.params, is_leaf=lambda a: isinstance(a, QuantizedTensor))
    qparams, report = quantize_params(params, rules, axis=reduction_axis, progress=progress)
    return dataclasses.replace(model, params=qparams, quant=label or rules_text(rules)), report


def rules_text(rules: PrecisionRules) -> str:
    import json

    return json.dumps(rules.to_json(), sort_keys=True)


def weight_bytes(params) -> int:
    """Bytes of every parameter as stored (packed codes + scales + zeros for quantized ones)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, QuantizedTensor))
    return sum(a.nbytes if isinstance(a, QuantizedTensor) else a.size * a.dtype.itemsize for a in leaves)
