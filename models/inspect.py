"""A summary of a loaded model: architecture, parameter count, per-tensor precision and bytes."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from cascade.models.model import Model
from cascade.quant import dequant_matmul
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
                         "bytes": int(a.nbytes), "bits_per_value": round(a.bits_per_value, 3),
                         "matmul": matmul_backend(a, tied_head=model.config.tie_embeddings)})
        else:
            rows.append({"name": name, "shape": list(a.shape), "precision": str(a.dtype), "scales": None,
                         "bytes": int(a.size * a.dtype.itemsize), "bits_per_value": 8.0 * a.dtype.itemsize,
                         "matmul": None})

    tok = model.tokenizer
    return {
        "architecture": model.config.architecture, "format": model.format, "quant": model.quant, "ptq": model.ptq,
        "params": model.config.n_params, "weight_bytes": sum(r["bytes"] for r in rows),
        "config": model.config.to_dict(),
        "tokenizer": None if tok is None else f"{tok.kind}, {tok.vocab_size} tokens, bos={tok.bos_id}, eos={list(tok.eos_ids)}",
        "matmul_backends": _count(r["matmul"] for r in rows),
        "tensors": rows,
    }


def matmul_backends(model: Model) -> dict[str, int]:
    """``{backend name: number of quantized weights it serves}`` in a decode step of ``model``
    (``cascade inspect``, ``generate --json``, ``run --json`` and the benchmarks report it)."""
    leaves = jax.tree.leaves(model.params, is_leaf=lambda a: isinstance(a, QuantizedTensor))
    return _count(matmul_backend(a, tied_head=model.config.tie_embeddings)
                  for a in leaves if isinstance(a, QuantizedTensor))


def _count(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        if name:
            out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def matmul_backend(w: QuantizedTensor, *, tied_head: bool, rows: int = 1, dtype=jnp.float32) -> str | None:
    """The dequant-matmul backend that serves quantized ``w`` in a decode step (``rows`` input
    rows), or None for a tensor no matmul reads (an untied embedding, which is only gathered)."""
    if len(w.shape) != 2 or w.stack_shape:
        return None
    transposed = w.axis == 1  # an embedding (vocab, dim) quantized along dim: read as the tied head
    if transposed and not tied_head:
        return None
    if w.spec.act is not None:  # w8a8: quantized activations and an integer dot, outside the registry
        from cascade.quant.activations import BACKEND

        return BACKEND
    x = jax.ShapeDtypeStruct((rows, w.shape[w.axis]), jnp.dtype(dtype))
    if w.spec.a8:  # int8 activations per block: the integer kernel or its XLA reference
        try:
            return dequant_matmul.a8_backend(x, w, transposed=transposed)
        except ValueError:
            return None
    try:
        return dequant_matmul.select_backend(x, w, transposed=transposed).name
    except ValueError:
        return None


def _natural_key(name: str):
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
