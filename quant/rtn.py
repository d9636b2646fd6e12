"""Round-to-nearest (RTN) post-training quantization of a parameter pytree under precision rules.

RTN is the baseline every PTQ paper compares against (GPTQ, AWQ, HQQ): each weight is quantized
independently with :func:`cascade.quant.quantize`, the range chosen by the spec's clip method.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cascade.console import format_table, progress_bar
from cascade.quant.qtensor import QuantizedTensor, dequantize, quantize, validate_input
from cascade.quant.rules import PrecisionRules
from cascade.quant.spec import FloatSpec


def key_path_str(path) -> str:
    """``layers_0/mlp/kernel`` from a pytree key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def relative_error(x, x_hat) -> float:
    """Relative Frobenius error ``||x - x_hat||_F / ||x||_F`` in float64 (0 for a zero tensor)."""
    x = np.asarray(x, np.float64)
    denom = np.linalg.norm(x)
    return float(np.linalg.norm(x - np.asarray(x_hat, np.float64)) / denom) if denom > 0 else 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerReport:
    path: str  # parameter path
    shape: tuple[int, ...]  # logical shape
    spec: str  # precision spec applied, or "unchanged"
    bytes_before: int  # storage before
    bytes_after: int  # storage after (packed values + scales + zero points)
    rel_error: float  # ||W - W_hat||_F / ||W||_F


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantReport:
    layers: tuple[LayerReport, ...]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    def to_json(self) -> dict:
        return {
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "compression": self.bytes_before / max(self.bytes_after, 1),
            "layers": [dataclasses.asdict(r) | {"shape": list(r.shape)} for r in self.layers],
        }

    def table(self) -> str:
        rows = [(r.path, "x".join(map(str, r.shape)) or "()", r.spec, f"{r.bytes_after:,}", f"{r.rel_error:.2e}")
                for r in self.layers]
        lines = [format_table(rows, ("parameter", "shape", "precision", "bytes", "rel err"), align="<<<>>")]
        before, after = self.bytes_before, max(self.bytes_after, 1)
        change = f"{before / after:.2f}x smaller" if before >= after else f"{after / max(before, 1):.2f}x larger"
        lines.append(f"total: {self.bytes_before:,} -> {self.bytes_after:,} bytes ({change})")
        return "\n".join(lines)


def _nbytes(x) -> int:
    return x.nbytes if isinstance(x, QuantizedTensor) else math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def quantize_params(
    params,
    rules: PrecisionRules | str,
    *,
    axis: int | Callable[[str, tuple[int, ...]], int] = 0,
    scale_dtype="float16",
    progress: bool | None = None,
    quantizer: Callable | None = None,
):
    """Apply ``rules`` to every floating-point array leaf of ``params``.

    Returns ``(quantized_params, QuantReport)``: the same pytree with integer-spec leaves
    replaced by :class:`QuantizedTensor` and float-spec leaves cast.  ``axis`` is the
    reduction axis of each weight (0 for Flax ``(in, out)`` kernels) or a function of
    ``(path, shape)``.  Non-float leaves pass through untouched and unreported.
    ``quantizer(path, leaf, spec, axis, scale_dtype) -> QuantizedTensor`` replaces RTN for integer
    specs (HQQ, or the GPTQ/AWQ results of a calibration pass); None is RTN.
    """
    rules = PrecisionRules.parse(rules)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out, rows = [], []
    for path, leaf in progress_bar(leaves, desc="quantize", unit="tensor", enabled=progress, leave=False):
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            out.append(leaf)
            continue
        name = key_path_str(path)
        spec = rules.spec_for(name, leaf.ndim)
        if spec is None:
            new, err = leaf, 0.0
        elif isinstance(spec, FloatSpec):
            try:
                validate_input(leaf, 0, name)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            new = jnp.asarray(leaf).astype(spec.dtype)
            if not bool(jnp.isfinite(new).all()):
                raise ValueError(f"{name}: casting to {spec} overflows (max |w| = {float(np.abs(leaf).max()):.4g})")
            err = relative_error(leaf, new.astype(jnp.float32))
        else:
            ax = axis(name, tuple(leaf.shape)) if callable(axis) else axis
            try:
                if quantizer is None:
                    new = quantize(leaf, spec, axis=ax, scale_dtype=scale_dtype)
                else:
                    new = quantizer(name, leaf, spec, ax, scale_dtype)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            err = relative_error(leaf, dequantize(new, jnp.float32))
        out.append(new)
        rows.append(LayerReport(path=name, shape=tuple(leaf.shape), spec="unchanged" if spec is None else str(spec),
                                bytes_before=_nbytes(leaf), bytes_after=_nbytes(new), rel_error=err))
    return jax.tree_util.tree_unflatten(treedef, out), QuantReport(layers=tuple(rows))
