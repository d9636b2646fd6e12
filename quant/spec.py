"""Precision specs: one string grammar for every place a precision is named.

The same string means the same thing in the CLI, the Python API, saved checkpoints and
benchmark output.  Grammar (canonical form omits the defaults shown in brackets)::

    int{8|4|3|2}[-g{N} | -tensor | -channel][-asym | -full | -narrow][-minmax | -mse | -p{PCT}][-a8]
    bf16 | fp16 | fp32

* ``int8``            per-output-channel, symmetric, min-max range
* ``int4-g128``       groups of 128 consecutive values along the reduction axis
* ``int4-g64-asym``   asymmetric (scale and zero point) groups of 64
* ``int8-tensor``     one scale for the whole tensor
* ``int4-g128-mse``   range clipped by an MSE-optimal search (grid over clip ratios)
* ``int8-p99.9``      range clipped at the 99.9th percentile of the values
* ``int3-g32``        symmetric grids.  At 2, 3 and 4 bits the default is the **full** grid: all
                      ``2**b`` levels (int3: -4..3, scale ``absmax / 3.5``, as qwix and llama.cpp's
                      Q4_0); ``-narrow`` asks for the ``2**b - 1`` levels ``+-(2**(b-1) - 1)`` (int3:
                      -3..3, scale ``absmax / 3``).  int8 stays narrow by default (-127..127, what
                      int8 x int8 dots want); ``int8-full`` is -128..127.  ``-full`` and ``-narrow``
                      may always be written; ``-sym`` is the old name of ``-narrow`` (before spec
                      grammar version 2 it was the default at every width).  Measured in
                      docs/guides/ptq.md ("The symmetric grid").
* ``int4-g32-a8``     int8 activations with integer dot products (int8 and int4 weights): the weight is
                      stored exactly as ``int4-g32``; at run time each input row is quantized to int8
                      in blocks of the weight's group (the whole row for per-channel and per-tensor
                      weights), scale ``absmax / 127`` per block, the codes are multiplied in the integer
                      domain with int32 sums per block and rescaled in float32 per block (llama.cpp's
                      Q8_0 x Q4_0 arithmetic).  ``int4-g32-asym-a8``, ``int8-a8``, ``int8-g32-a8``, ...
                      (:func:`cascade.quant.activations.a8_matmul`; docs/guides/kernels.md)
* ``w8a8``          int8 per-channel symmetric weights *and* int8 activations: each input row
                      (token) quantized at run time by its own absmax, an int8 x int8 -> int32 dot
                      (:mod:`cascade.quant.activations`; SmoothQuant's W8A8, Xiao et al. 2022)
* ``w8a8-static``     the same with one static activation scale per matrix, measured on calibration
                      text when the model is quantized (stored with the weight as ``act_scale``)
* ``w8a8-had``, ``w8a8-static-had``  the same with the reduction axis rotated by a fixed randomized
                      Hadamard transform (:mod:`cascade.quant.hadamard`): the weight stored rotated,
                      the input rotated at run time before it is quantized (QuaRot's online rotation),
                      which spreads activation outlier channels; the same bytes as ``w8a8``
* ``bf16``/``fp16``/``fp32``  no integer quantization, the tensor is cast to that float type

"Channel" is every index of the non-reduction axes; the reduction axis is the one a matmul
contracts (axis 0 of a Flax ``(in, out)`` kernel).

**Grammar versions.**  Version 2 (:data:`SPEC_VERSION`, this one) made the full grid the default
at 2-4 bits.  In version 1 a symmetric spec without a grid token was narrow at every width
(``int3-g32`` meant -3..3).  Text saved before version 2 (checkpoints of format version 1, rules
files and sensitivity reports without ``"spec_version": 2``) is read with
``parse_spec(text, version=1)``, so it keeps its old meaning, and everything saved now writes the
grid of every 2-4-bit symmetric spec explicitly (:meth:`IntSpec.explicit`), so it reads the same
under either grammar.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Union

INT_BITS = (8, 4, 3, 2)
FLOAT_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GRANULARITIES = ("tensor", "channel", "group")

SPEC_VERSION = 2  # 1: a symmetric spec without -full/-narrow was narrow at every width; 2: full at 2-4 bits
SPEC_VERSIONS = (1, 2)

ALLOWED_FORMS = (
    "int{8,4,3,2}[-g<N>|-tensor|-channel][-asym|-full|-narrow][-minmax|-mse|-p<PCT>] "
    "(e.g. int8, int4-g128, int4-g64-asym, int8-tensor, int3-g32, int3-g32-narrow, int2-g16, int4-g128-mse, "
    "int8-p99.9; int8 and int4 specs take a final -a8: int8 activations per block at run time, e.g. int4-g32-a8), w8a8, w8a8-static, w8a8-had or w8a8-static-had (int8 weights and activations; -had: Hadamard-rotated "
    "inputs), or a float type: bf16, fp16, fp32"
)
A8_BITS = (8, 4)  # the weight widths -a8 takes (the ones the integer kernels run)
ACT_MODES = ("dynamic", "static")  # w8a8: activations per token at run time; w8a8-static: per tensor, calibrated


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntSpec:
    """An integer quantization format and how its range is chosen."""

    bits: int  # 8, 4, 3 or 2
    granularity: str = "channel"  # "tensor", "channel" or "group"
    group_size: int | None = None  # values per group along the reduction axis ("group" only)
    symmetric: bool = True  # symmetric: zero point 0; asymmetric: scale and zero point
    # symmetric only: all 2**bits levels [-2**(b-1), 2**(b-1) - 1] (``-full``) instead of +-(2**(b-1) - 1)
    # (``-narrow``); None: the default grid of the width (:func:`default_full_range`)
    full_range: bool | None = None
    clip: str = "minmax"  # range estimator: "minmax", "mse" or "p<PCT>" (percentile)
    # int8 activations too (``w8a8``): "dynamic" (per token at run time) or "static" (per tensor, calibrated)
    act: str | None = None
    # w8a8 only (``-had``): the reduction axis rotated by a randomized Hadamard transform (cascade.quant.hadamard)
    rotate: bool = False
    # ``-a8``: int8 activations per block of the weight's group at run time, integer dot products (int8/int4 only);
    # the weight is stored exactly as without it
    a8: bool = False

    def __post_init__(self):
        if self.bits not in INT_BITS:
            raise ValueError(f"bits must be one of {INT_BITS}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
                raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
            if self.group_size <= 0:
                raise ValueError(f"group_size must be positive, got {self.group_size}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only valid with granularity='group', got {self.group_size}")
        if self.full_range is None:
            object.__setattr__(self, "full_range", self.act is None and default_full_range(self.bits, self.symmetric))
        if not isinstance(self.full_range, bool):
            raise ValueError(f"full_range must be true, false or None, got {self.full_range!r}")
        if self.full_range and not self.symmetric:
            raise ValueError("full_range applies only to symmetric specs (asymmetric specs use every level already)")
        if self.act is not None:
            if self.act not in ACT_MODES:
                raise ValueError(f"act must be one of {ACT_MODES} or None, got {self.act!r}")
            if (self.bits, self.granularity, self.symmetric, self.full_range, self.clip) != (8, "channel", True, False, "minmax"):
                raise ValueError("int8 activations (w8a8) go with int8 per-channel symmetric min-max weights only")
        if self.rotate and self.act is None:
            raise ValueError("the Hadamard rotation (-had) goes with int8 activations (w8a8) only")
        if not isinstance(self.a8, bool):
            raise ValueError(f"a8 must be true or false, got {self.a8!r}")
        if self.a8 and (self.act is not None or self.bits not in A8_BITS):
            raise ValueError(f"-a8 (int8 activations per block) goes with int8 and int4 weight specs only, not {self}")
        pct = clip_percentile(self.clip)  # validates
        if pct is not None:  # one name per percentile: p99.90 and p099.9 are p99.9
            text = repr(pct)
            object.__setattr__(self, "clip", "p" + (text[:-2] if text.endswith(".0") else text))

    @property
    def qmin(self) -> int:
        """Smallest integer the quantizer produces (restricted symmetric range unless ``full_range``)."""
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) if self.full_range else -(2 ** (self.bits - 1) - 1)

    @property
    def qmax(self) -> int:
        """Largest integer the quantizer produces."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def scale_divisor(self) -> float:
        """A symmetric range ``[-a, a]`` gets the scale ``a / scale_divisor``: ``qmax``, or
        ``qmax + 0.5`` on the full grid (``-a`` lands on ``qmin``, ``+a`` half a step above ``qmax``)."""
        return self.qmax + 0.5 if self.full_range else float(self.qmax)

    @property
    def code_offset(self) -> int:
        """Stored unsigned code = q + code_offset (symmetric values are stored biased)."""
        return 2 ** (self.bits - 1) if self.symmetric else 0

    @property
    def storage_spec(self) -> "IntSpec":
        """The same format without the range estimator and ``-a8`` (neither changes storage)."""
        return dataclasses.replace(self, clip="minmax", a8=False)

    @property
    def grid(self) -> str:
        """``"full"`` or ``"narrow"`` (symmetric), ``"asym"`` (asymmetric: every level, a zero point)."""
        return "asym" if not self.symmetric else "full" if self.full_range else "narrow"

    def __str__(self) -> str:
        return self._text(explicit=False)

    @property
    def explicit(self) -> str:
        """The spec with its grid written wherever the two grammar versions differ (2-4-bit
        symmetric specs: ``int3-g32-full``, ``int4-narrow``), so the text means the same under
        ``parse_spec(text, version=1)`` and ``version=2``: what is saved to files."""
        return self._text(explicit=True)

    def _text(self, explicit: bool) -> str:
        if self.act is not None:
            return ("w8a8" if self.act == "dynamic" else "w8a8-static") + ("-had" if self.rotate else "")
        parts = [f"int{self.bits}"]
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        elif self.granularity == "tensor":
            parts.append("tensor")
        if not self.symmetric:
            parts.append("asym")
        elif self.full_range != default_full_range(self.bits) or (explicit and self.bits <= 4):
            parts.append(self.grid)
        if self.clip != "minmax":
            parts.append(self.clip)
        if self.a8:
            parts.append("a8")
        return "-".join(parts)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FloatSpec:
    """Keep the tensor in floating point, cast to ``dtype``."""

    name: str  # "bf16", "fp16" or "fp32"

    def __post_init__(self):
        if self.name not in FLOAT_NAMES:
            raise ValueError(f"float spec must be one of {sorted(FLOAT_NAMES)}, got {self.name!r}")

    @property
    def dtype(self) -> str:
        return FLOAT_NAMES[self.name]

    @property
    def bits(self) -> int:
        return 32 if self.name == "fp32" else 16

    def __str__(self) -> str:
        return self.name

    @property
    def explicit(self) -> str:
        return self.name


Spec = Union[IntSpec, FloatSpec]


def default_full_range(bits: int, symmetric: bool = True) -> bool:
    """The default symmetric grid of a width (grammar version 2): full at 2-4 bits, narrow at 8."""
    return symmetric and bits <= 4


def explicit_text(spec: "Spec | str") -> str:
    """``spec`` as saved text (:meth:`IntSpec.explicit`)."""
    return parse_spec(spec).explicit

_PERCENTILE = re.compile(r"p([0-9]+(?:\.[0-9]+)?)", re.ASCII)


def clip_percentile(clip: str) -> float | None:
    """The percentile of a ``p<PCT>`` clip token, None for minmax/mse; ValueError otherwise."""
    if clip in ("minmax", "mse"):
        return None
    m = _PERCENTILE.fullmatch(clip) if isinstance(clip, str) else None
    if not m:
        raise ValueError(f"unknown clip method {clip!r}: use minmax, mse or p<PCT> (e.g. p99.9)")
    pct = float(m.group(1))
    if not 50.0 < pct <= 100.0:
        raise ValueError(f"percentile clip must be in (50, 100], got {pct}")
    return pct


def check_version(version, where: str = "spec_version") -> int:
    """A spec grammar version (1 or 2), or a ValueError naming ``where``."""
    if isinstance(version, bool) or version not in SPEC_VERSIONS:
        raise ValueError(f"{where} must be one of {', '.join(map(str, SPEC_VERSIONS))}, got {version!r}")
    return version


def parse_spec(text: str | Spec, *, version: int = SPEC_VERSION) -> Spec:
    """Parse a precision spec string (strict); a spec object is returned unchanged.

    ``version=1`` reads text saved before the full-grid default (module docs): a symmetric spec
    without ``-full``/``-narrow`` is narrow at every width."""
    if isinstance(text, (IntSpec, FloatSpec)):
        return text
    check_version(version, "the spec grammar version")
    if not isinstance(text, str):
        raise ValueError(f"precision spec must be a string, got {type(text).__name__}")
    s = text.strip().lower()
    if s in FLOAT_NAMES:
        return FloatSpec(name=s)
    if m := re.fullmatch(r"w8a8(-dynamic|-static)?(-had)?", s):
        return IntSpec(bits=8, act="static" if m.group(1) == "-static" else "dynamic", rotate=bool(m.group(2)))
    tokens = s.split("-")
    m = re.fullmatch(r"int([0-9]+)", tokens[0])
    if not m or int(m.group(1)) not in INT_BITS:
        raise ValueError(f"unknown precision spec {text!r}; allowed: {ALLOWED_FORMS}")
    fields: dict = {"bits": int(m.group(1))}
    seen: set[str] = set()
    if len(tokens) > 1 and tokens[-1] == "a8":
        fields["a8"] = True
        tokens = tokens[:-1]
    for tok in tokens[1:]:
        if m := re.fullmatch(r"g(-?[0-9]+)", tok):
            kind, value = "granularity", ("group", int(m.group(1)))
        elif tok in ("tensor", "channel"):
            kind, value = "granularity", (tok, None)
        elif tok in ("asym", "sym", "full", "narrow"):
            kind, value = "symmetry", tok
        elif tok in ("minmax", "mse") or _PERCENTILE.fullmatch(tok):
            kind, value = "clip", tok
        elif tok == "a8":
            raise ValueError(f"-a8 must be the last token of a precision spec, got {text!r}; allowed: {ALLOWED_FORMS}")
        else:
            raise ValueError(f"unknown token {tok!r} in precision spec {text!r}; allowed: {ALLOWED_FORMS}")
        if kind in seen:
            raise ValueError(f"precision spec {text!r} sets the {kind} twice; allowed: {ALLOWED_FORMS}")
        seen.add(kind)
        if kind == "granularity":
            fields["granularity"], fields["group_size"] = value
        elif kind == "symmetry":
            fields["symmetric"] = value != "asym"
            fields["full_range"] = value == "full"  # -sym is the old name of -narrow
        else:
            fields["clip"] = value
    if version == 1:
        fields.setdefault("full_range", False)
    try:
        return IntSpec(**fields)
    except ValueError as e:
        raise ValueError(f"invalid precision spec {text!r}: {e}; allowed: {ALLOWED_FORMS}") from None
