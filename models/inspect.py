"""A summary of a loaded model: architecture, parameter count, per-tensor precision and bytes."""

from __future__ import annotations

import flax

from cascade.models.model import Model
from cascade.quant.qtensor import QuantizedTensor


def describe_model(model: Model) -> dict:
    flat = flax.traverse_util.flatten_dict(model.params, sep="/",
                                           is_leaf=lambda _, v: isinstance(v, QuantizedTensor))
    rows = []
    for name in sorted(flat, key=_natural_key):
        a = flat[name]
        if isinstance(a, QuantizedTensor):
            scale = f"{a.scale.dtype}" + ("" if a.zero is None else f"+zero {a.zero.dtype}")
            rows.append({"name": name, "shape": list(a.shape), "precision": str(a.spec), "scales": scale,
                         "bytes": int(a.nbytes), "bits_per_value": round(a.bits_per_value, 3)})
        else:
            rows.append({"name": name, "shape": list(a.shape), "precision": str(a.dtype), "scales": None,
                         "bytes": int(a.size * a.dtype.itemsize), "bits_per_value": 8.0 * a.dtype.itemsize})
    tok = model.tokenizer
    return {
        "architecture": model.config.architecture, "format": model.format, "quant": model.quant,
        "params": model.config.n_params, "weight_bytes": sum(r["bytes"] for r in rows),
        "config": model.config.to_dict(),
        "tokenizer": None if tok is None else f"{tok.kind}, {tok.vocab_size} tokens, bos={tok.bos_id}, eos={list(tok.eos_ids)}",
        "tensors": rows,
    }


def _natural_key(name: str):
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
