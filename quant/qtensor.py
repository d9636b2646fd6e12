"""The quantized tensor type, and quantize / dequantize.

Affine quantization as in Jacob et al. 2018 ("Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference")::

    q     = clip(round(x / s) + z, qmin, qmax)
    x_hat = (q - z) * s

Symmetric specs have ``z = 0`` and either all ``2**b`` levels ``[-2**(b-1), 2**(b-1) - 1]``
(the full grid, the default at 2-4 bits: int4 -8..7, int3 -4..3, int2 -2..1; scale
``absmax / (qmax + 0.5)``, as qwix) or the narrow range ``[-(2**(b-1) - 1), 2**(b-1) - 1]``
(``-narrow``, the default at 8 bits: int8 +-127; scale ``absmax / qmax``);
asymmetric specs use ``[0, 2**b - 1]`` and an integer zero point stored as a float.  Scale and zero point are stored in ``scale_dtype``
(float16 by default, as GGUF does; float32 and bfloat16 are allowed) with one entry per group.
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cascade.quant import hadamard, packing, ranges
from cascade.quant.spec import IntSpec, Spec, parse_spec

SCALE_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}


@jax.tree_util.register_pytree_node_class
class QuantizedTensor:
    """A tensor stored as packed integer codes plus per-group scales (and zero points).

    Leaves (arrays): ``packed`` (uint8, codes packed along ``axis``, see :mod:`cascade.quant.packing`),
    ``scale`` and ``zero`` (float, shape :func:`cascade.quant.ranges.scale_shape`; ``zero`` is None for
    symmetric specs), and ``act_scale`` (a float32 scalar: the static scale of the matmul's int8
    input activations, ``w8a8-static`` only, measured on calibration text; None otherwise).  Static metadata: ``spec``, logical ``shape``, reduction ``axis`` and the
    float ``dtype`` that :func:`dequantize` returns by default.  As a pytree it passes through
    ``jit``, ``vmap`` (leaves gain a leading axis, metadata stays per-slice), ``tree_map`` and
    orbax save/restore.
    """

    def __init__(self, packed, scale, zero, act_scale=None, *, spec: IntSpec, shape, axis: int, dtype: str = "float32"):
        self.packed = packed
        self.scale = scale
        self.zero = zero
        self.act_scale = act_scale
        self.spec = spec
        self.shape = tuple(int(d) for d in shape)
        self.axis = int(axis)
        self.dtype = str(jnp.dtype(dtype))

    def tree_flatten(self):
        return (self.packed, self.scale, self.zero, self.act_scale), (self.spec, self.shape, self.axis, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        spec, shape, axis, dtype = aux
        return cls(*children, spec=spec, shape=shape, axis=axis, dtype=dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading dims of a stack of tensors (``jax.tree.map(jnp.stack, ...)``); () for one."""
        return tuple(self.packed.shape[: len(self.packed.shape) - self.ndim])

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed codes + scales + zero points (+ the activation scale) of the whole stack."""
        return sum(_nbytes(a) for a in (self.packed, self.scale, self.zero, self.act_scale) if a is not None)

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.nbytes / (self.size * math.prod(self.stack_shape))

    def dequantize(self, dtype=None) -> jnp.ndarray:
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.spec}, shape={self.shape}, axis={self.axis}, nbytes={self.nbytes})"


def _nbytes(a) -> int:
    return math.prod(a.shape) * jnp.dtype(a.dtype).itemsize


def storage_nbytes(shape, spec: Spec, axis: int = 0, scale_dtype="float16") -> int:
    """Documented storage formula: packed codes + (1 or 2) * n_groups * itemsize(scale_dtype).

    For an int spec: ``ceil(k / L) * B * (size / k)`` bytes of codes (L, B from
    :data:`cascade.quant.packing.RUNS`, k the reduction-axis length) plus one scale per group (and one
    zero point per group if asymmetric), plus 4 bytes of activation scale for ``w8a8-static``.  For a
    float spec: ``size * bits / 8``.
    """
    spec = parse_spec(spec)
    shape = tuple(int(d) for d in shape)
    if not shape or min(shape) <= 0:
        raise ValueError(f"shape must be non-empty with positive dims, got {shape}")
    if not isinstance(spec, IntSpec):
        return math.prod(shape) * spec.bits // 8
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} is out of range for shape {shape}")
    scale_dtype = _scale_dtype(scale_dtype)
    axis %= len(shape)
    k = shape[axis]
    codes = packing.packed_length(k, spec.bits) * (math.prod(shape) // k)
    n_params = math.prod(ranges.scale_shape(shape, spec, axis))
    act = 4 if spec.act == "static" else 0
    return codes + n_params * jnp.dtype(scale_dtype).itemsize * (1 if spec.symmetric else 2) + act


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate_input(x, axis: int, name: str = "tensor") -> tuple[jnp.ndarray, int]:
    """Checks shared by every quantizer: floating, non-empty, valid axis, finite values."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got a scalar")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for {name} of rank {x.ndim}")
    if _is_concrete(x) and not bool(jnp.isfinite(x).all()):
        n_bad = int((~jnp.isfinite(x)).sum())
        raise ValueError(f"{name} has {n_bad} NaN/Inf value(s); cannot quantize non-finite data")
    return jnp.asarray(x), axis % x.ndim


def _scale_dtype(scale_dtype):
    try:
        name = str(jnp.dtype(scale_dtype))
    except TypeError:
        name = str(scale_dtype)
    if name not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {name}")
    return SCALE_DTYPES[name]


@partial(jax.jit, static_argnames=("spec", "axis", "scale_dtype"))
def _params_from_data(x, spec: IntSpec, axis: int, scale_dtype):
    lo, hi = ranges.estimate_range(ranges.to_groups(x.astype(jnp.float32), spec, axis), spec)
    return ranges.scale_zero_from_range(lo, hi, spec, scale_dtype)


@partial(jax.jit, static_argnames=("spec", "axis"))
def _encode(x, scale_g, zero_g, spec: IntSpec, axis: int):
    """Packed codes from a tensor and per-group (G, R) params; params in the stored layout."""
    q = ranges.quantize_groups(ranges.to_groups(x.astype(jnp.float32), spec, axis), scale_g, zero_g, spec)
    return _pack_groups(q, scale_g, zero_g, x.shape, spec, axis)


def quantize(x, spec: Spec | str, *, axis: int = 0, scale_dtype="float16") -> QuantizedTensor:
    """Round-to-nearest quantization of ``x`` along ``axis`` with the range from ``spec.clip``
    (a ``-had`` spec quantizes ``x`` rotated along ``axis``: :mod:`cascade.quant.hadamard`)."""
    spec = _int_spec(spec)
    x, axis = validate_input(x, axis)
    dtype, x = x.dtype, _rotated(x, spec, axis)
    sdt = _scale_dtype(scale_dtype)
    scale_g, zero_g = _params_from_data(x, spec, axis, sdt)
    return _assemble(x, spec, axis, scale_g, zero_g, dtype)


def _rotated(x, spec: IntSpec, axis: int):
    """``x`` as a ``-had`` spec stores it (rotated along the reduction axis, float32), else unchanged."""
    return hadamard.rotate(x, axis) if spec.rotate else x


def quantize_with_range(x, spec: Spec | str, lo, hi, *, axis: int = 0, scale_dtype="float16") -> QuantizedTensor:
    """Quantize with a given range (e.g. from an activation observer or a learned clip).

    ``lo`` and ``hi`` are scalars or arrays of the stored scale's shape
    (:func:`cascade.quant.ranges.scale_shape`); values outside the range are clipped.  A zero-width
    range (a dead channel seen as all zeros in calibration) gets scale 1.  With a ``-had`` spec the
    range is that of the rotated tensor (what is stored).
    """
    spec = _int_spec(spec)
    x, axis = validate_input(x, axis)
    dtype, x = x.dtype, _rotated(x, spec, axis)
    sdt = _scale_dtype(scale_dtype)
    shape = ranges.scale_shape(x.shape, spec, axis)
    try:
        lo, hi = (jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for v in (lo, hi))
    except (ValueError, TypeError):
        raise ValueError(f"range bounds must be scalars or broadcast to the scale shape {shape}") from None
    if _is_concrete(lo) and _is_concrete(hi):
        if not bool(jnp.isfinite(lo).all() & jnp.isfinite(hi).all()):
            raise ValueError("quantization range has NaN/Inf bounds")
        if bool((lo > hi).any()):
            raise ValueError("quantization range has lo > hi")
    lo = ranges.scale_layout_to_groups(lo, spec, axis)
    hi = ranges.scale_layout_to_groups(hi, spec, axis)
    scale_g, zero_g = ranges.scale_zero_from_range(lo, hi, spec, sdt)
    return _assemble(x, spec, axis, scale_g, zero_g, dtype)


def _assemble(x, spec, axis, scale_g, zero_g, dtype=None) -> QuantizedTensor:
    """The tensor with codes ``round(x / s) + z``; ``x`` is what is stored (already rotated for a
    ``-had`` spec), ``dtype`` the float type :func:`dequantize` returns (default ``x``'s)."""
    check_scales(scale_g, x, spec, zero_g=zero_g, stacklevel=4)
    packed, scale, zero = _encode(x, scale_g, zero_g, spec, axis)
    return QuantizedTensor(packed, scale, zero, spec=spec, shape=x.shape, axis=axis, dtype=dtype or x.dtype)


@partial(jax.jit, static_argnames=("shape", "spec", "axis"))
def _pack_groups(q, scale_g, zero_g, shape, spec: IntSpec, axis: int):
    codes = ranges.from_groups(q, shape, spec, axis).astype(jnp.int32) + spec.code_offset
    to_layout = partial(ranges.groups_to_scale_layout, shape=shape, spec=spec, axis=axis)
    zero = None if zero_g is None else to_layout(zero_g)
    return packing.pack_codes(codes, spec.bits, axis), to_layout(scale_g), zero


def from_grouped_codes(q, scale_g, zero_g, *, spec: IntSpec, shape, axis: int, dtype="float32") -> QuantizedTensor:
    """A tensor from codes a method chose itself: ``q`` the integers on the grouped view (G, g, R)
    (:func:`cascade.quant.ranges.to_groups`), ``scale_g`` / ``zero_g`` the (G, R) params as stored.

    (HQQ and AutoRound pick codes that :func:`quantize`'s encoder, ``round(x / s) + z``, would not:
    a real zero point, a learned rounding.)  Not for ``-had`` specs: their codes are of the rotated
    tensor, which these methods do not see."""
    refuse_rotated(spec, "codes chosen by a method (HQQ, AutoRound)")
    packed, scale, zero = _pack_groups(q, scale_g, zero_g, tuple(int(d) for d in shape), spec, axis)
    return QuantizedTensor(packed, scale, zero, spec=spec, shape=shape, axis=axis, dtype=dtype)


# Largest usable scale: codes are computed as x * (1 / s), and a larger s has a reciprocal below
# float32's smallest normal, which XLA flushes to zero on CPU (every code would be the zero point).
MAX_SCALE = float(2.0 ** 126)


def check_scales(scale_g, x, spec, *, zero_g=None, stacklevel: int = 3) -> None:
    """The scale checks (and messages) of :func:`quantize` for params a method computed itself:
    non-finite scales are an error, scales below the smallest normal of their dtype a warning
    (on the host: the scales are concrete here, and numpy spares a compile of each check).
    Values too large for float32 arithmetic (a scale above :data:`MAX_SCALE`, or a grid end
    ``(qmin - z) * s`` / ``(qmax - z) * s`` beyond float32's range: their codes would dequantize
    to 0 or inf) are an error that says so; it is not the scale dtype's fault then."""
    if not _is_concrete(scale_g):  # traced (under jit): nothing to check yet
        return
    s = np.asarray(scale_g).astype(np.float32)
    max_x = float(jnp.abs(x).max())
    if not np.isfinite(s).all() and jnp.finfo(scale_g.dtype).max < jnp.finfo(jnp.float32).max:
        raise ValueError(
            f"scales overflow {scale_g.dtype} (max |x| = {max_x:.4g}); "
            "store scales in float32 (scale_dtype='float32', or --scale-dtype float32 on the command line)"
        )
    s64 = s.astype(np.float64)
    z = 0.0 if zero_g is None else np.asarray(zero_g).astype(np.float64)
    ends = np.maximum(np.abs((spec.qmin - z) * s64), np.abs((spec.qmax - z) * s64))
    if not np.isfinite(s).all() or (s64 > MAX_SCALE).any() or (ends > float(jnp.finfo(jnp.float32).max)).any():
        raise ValueError(
            f"values too large to quantize as {spec} (max |x| = {max_x:.4g}): its scales exceed what float32 "
            "arithmetic can encode and decode, whatever the scale dtype; scale the tensor down (its values are "
            "far outside any weight's range) or keep it in a float type"
        )
    if scale_g.dtype != jnp.float32:
        tiny = float(jnp.finfo(scale_g.dtype).smallest_normal)
        if (s < tiny).any():
            warnings.warn(f"some {spec} scales are below the smallest normal {scale_g.dtype} ({tiny:.3g}) and lose "
                          "precision; store scales in float32 for such small weights (scale_dtype='float32', or "
                          "--scale-dtype float32 on the command line)", stacklevel=stacklevel)


def refuse_rotated(spec, who: str) -> None:
    """A clear error for a method that cannot quantize a ``-had`` (rotated) spec."""
    if isinstance(spec, IntSpec) and spec.rotate:
        raise ValueError(f"{who} cannot produce {spec} weights (stored Hadamard-rotated): quantize them with "
                         "--method rtn or smoothquant")


def check_unstacked(qt: QuantizedTensor) -> None:
    if qt.stack_shape:
        raise ValueError(f"QuantizedTensor is a stack of {qt.stack_shape} tensors of shape {qt.shape}; "
                         "map over the stack with jax.vmap or index one slice")


def _int_spec(spec) -> IntSpec:
    spec = parse_spec(spec)
    if not isinstance(spec, IntSpec):
        raise ValueError(f"{spec} is a float spec; quantize takes an integer spec (cast float types instead)")
    return spec


def codes(qt: QuantizedTensor) -> jnp.ndarray:
    """The integers ``q`` (storage offset removed, zero point not subtracted), int32, logical shape."""
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"codes takes a QuantizedTensor, got {type(qt).__name__}")
    u = packing.unpack_codes(qt.packed, qt.spec.bits, qt.shape[qt.axis], qt.axis)
    return u - qt.spec.code_offset


@partial(jax.jit, static_argnames=("dtype",))
def _dequantize(qt: QuantizedTensor, dtype):
    spec, axis = qt.spec, qt.axis
    qg = ranges.to_groups(codes(qt).astype(jnp.float32), spec, axis)
    s = ranges.scale_layout_to_groups(qt.scale, spec, axis)
    z = None if qt.zero is None else ranges.scale_layout_to_groups(qt.zero, spec, axis)
    x = ranges.from_groups(ranges.dequantize_groups(qg, s, z), qt.shape, spec, axis)
    return (hadamard.unrotate(x, axis) if spec.rotate else x).astype(dtype)


def dequantize(qt: QuantizedTensor, dtype=None) -> jnp.ndarray:
    """``x_hat = (q - z) * s`` in ``dtype`` (default: the dtype the tensor was quantized from); for a
    ``-had`` spec rotated back (:func:`cascade.quant.hadamard.unrotate`), the weight it stands for."""
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"dequantize takes a QuantizedTensor, got {type(qt).__name__}")
    check_unstacked(qt)
    try:
        dtype = jnp.dtype(dtype or qt.dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dequantize returns a floating dtype, got {dtype}")
    return _dequantize(qt, str(dtype))


def transpose(qt: QuantizedTensor) -> QuantizedTensor:
    """The transpose of a 2-D quantized tensor, without touching the codes: packing runs along
    ``axis``, so swapping the array dims moves the packed axis with them (e.g. a tied LM head
    ``E^T`` from an embedding ``E`` quantized along the model dim)."""
    if not isinstance(qt, QuantizedTensor) or qt.ndim != 2:
        raise ValueError("transpose takes a 2-D QuantizedTensor")
    check_unstacked(qt)
    return QuantizedTensor(qt.packed.T, qt.scale.T, None if qt.zero is None else qt.zero.T, qt.act_scale,
                           spec=qt.spec, shape=qt.shape[::-1], axis=1 - qt.axis, dtype=qt.dtype)


def with_act_scale(qt: QuantizedTensor, act_scale) -> QuantizedTensor:
    """``qt`` (a ``w8a8-static`` weight) with its static input-activation scale set (a positive scalar)."""
    if not isinstance(qt, QuantizedTensor) or qt.spec.act != "static":
        raise ValueError("an activation scale belongs to a w8a8-static QuantizedTensor")
    a = jnp.asarray(act_scale, jnp.float32)
    if a.shape != () or (_is_concrete(a) and not bool(jnp.isfinite(a) & (a > 0))):
        raise ValueError(f"activation scale must be a finite positive scalar, got {act_scale!r}")
    return QuantizedTensor(qt.packed, qt.scale, qt.zero, a, spec=qt.spec, shape=qt.shape, axis=qt.axis, dtype=qt.dtype)
