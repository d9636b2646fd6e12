"""PTQ peer comparison with Google's qwix: its RTN, GPTQ and AWQ on our calibration and evaluation.

A benchmark-only peer: qwix is never a dependency of cascade.  ``bash bench/qwix_setup.sh``
installs it (``--no-deps``) into ``~/.cache/cascade/qwix-lib`` (or ``$CASCADE_QWIX_LIB``), and
that folder goes on ``sys.path`` only when this module first needs qwix.

    python -m bench.qwix_peer --model /work/shared/data/stories260K/stories260K.bin \\
        --spec int4-g32 int3-g32 int3-g64-asym --method qwix-rtn qwix-gptq qwix-awq \\
        --out bench/results/ptq-qwix-stories260K.json

What runs is qwix's own code on each linear kernel of the decoder blocks, fake-quantized (qwix's
dequantized float32 weights put back in place of the kernel):

* ``qwix-rtn``: ``qwix.contrib.padded_ptq.quantize`` (``qarray.quantize`` after zero-padding a
  short last tile, qwix's own way to tile an axis the tile does not divide), then dequantized;
* ``qwix-gptq``: ``qwix.contrib.gptq_core.quantize_weight`` (blocksize 128, percdamp 0.01, no
  act-order: qwix's defaults and ours) on the Hessian ``XᵀX`` of the kernel's input;
* ``qwix-awq``: ``qwix.contrib.awq_core.quantize_weight`` (n_grid 20) on the per-input-channel mean
  ``|x|`` (qwix's ``act_scale``); qwix keeps its AWQ scales with the weight (no folding into the
  previous op), so the effective kernel is ``dequantize(Q(W * s)) / s``, what its
  ``AwqInferenceProvider`` computes.

Inputs are identical to ours: GPTQ and AWQ go through our sequential loop
(:func:`cascade.models.quantize.calibrated_blocks`), so block ``i`` is calibrated on the outputs
of blocks ``0..i-1`` already fake-quantized by qwix, and GPTQ, as ours, goes input by input
inside a block (o_proj's Hessian is taken behind qwix's q/k/v); the statistics are the same
:func:`cascade.models.calibration.block_statistics` (Hessian, mean ``|x|``).  Everything outside the
kernels follows our rules (norms, embeddings, LM head cast to bf16 by the keep-16-bit rules).

Spec mapping (weights ``W`` as qwix wants them, ``(out, in)``, contraction axis 1):
``intB`` per channel -> ``channelwise_axes=[0]``; ``intB-gG`` -> plus ``tiled_axes={1: G}`` (a tile
of G consecutive input features); symmetric -> ``calibration_method="absmax"``; ``-asym`` ->
``"minmax"``; qtype ``jnp.int8`` / ``jnp.int4`` / ``"int3"`` / ``"int2"``.  qwix's symmetric grid
always uses all 2^B levels: scale = absmax / (2^(B-1) - 0.5), codes clipped to [-2^(B-1), 2^(B-1) - 1]
(``numerics.get_symmetric_bound`` / ``convert_to``; int4/int8 saturate in ``astype``), which is our
``-full`` grid.  qwix has no narrow +-(2^(B-1) - 1) grid, our default: a spec without ``-full`` runs
on qwix's full grid and its row says so (``int3-g32`` under qwix is ``int3-g32-full``).  The group
absmax lands exactly on a rounding tie (+-(2^(B-1) - 0.5)), so float noise decides whether it rounds
out or in.  Scales stay float32 (ours are stored in float16).

Where qwix 0.1.8 cannot do something, the row says so (``ppl`` null) instead of substituting:
asymmetric int3/int2 (``numerics.get_asymmetric_bound`` knows only int8/int4) and asymmetric GPTQ
(``gptq_core`` evaluates ``zero_point and ...`` on an array).  Three adaptations keep qwix's maths
and are named in the row's note: (1) a group size that does not divide a kernel's input features
(stories260K's down_proj has 172) is handled by zero-padding the input axis to a tile multiple
as ``padded_ptq`` does -- exact (up to those rounding ties) for RTN, GPTQ (the padded Hessian is
block-diagonal; percdamp rescaled so the dampening stays 1% of the real diagonal's mean) and AWQ
(padded act_scale = the max, which leaves its normalisation unchanged); (2) ``padded_ptq.dequantize``
checks the unpadded codes against the padded scales before padding them back and fails, so RTN
dequantizes in working order (pad, dequantize, slice); (3) ``gptq_core`` allocates its code matrix
with ``dtype=how.qtype``, which fails for qwix's synthetic ``"int3"``/``"int2"`` ("TODO: support
synthetic qtype"): it runs with that one allocation in int4, the storage qwix uses for those codes.
``seconds`` is the quantization wall time (calibration statistics and block propagation
included; GPTQ jit-compiled per kernel shape, compile included).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import types

import numpy as np

METHODS = ("qwix-rtn", "qwix-gptq", "qwix-awq")
DEFAULT_LIB = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cascade", "qwix-lib")
TRAIN = "/work/shared/data/text/tinystories_train_00.txt"
VAL = "/work/shared/data/text/tinystories_val.txt"
GPTQ_BLOCKSIZE, GPTQ_PERCDAMP, AWQ_GRID = 128, 0.01, 20


class QwixUnsupported(ValueError):
    """qwix cannot do what a spec asks (the row records why, with no perplexity)."""


_QWIX = None


def import_qwix(lib: str | None = None) -> types.SimpleNamespace:
    """qwix's modules, from ``lib`` (default ``$CASCADE_QWIX_LIB`` or ``~/.cache/cascade/qwix-lib``),
    appended to ``sys.path`` here and only here."""
    global _QWIX
    if _QWIX is not None:
        return _QWIX
    lib = lib or os.environ.get("CASCADE_QWIX_LIB") or DEFAULT_LIB
    if not os.path.isdir(os.path.join(lib, "qwix")):
        raise ImportError(f"qwix is not installed in {lib}: run `bash bench/qwix_setup.sh`")
    if lib not in sys.path:
        sys.path.append(lib)
    import qwix
    from qwix._src.core import numerics, qarray
    from qwix.contrib import awq_core, gptq_core, padded_ptq

    _QWIX = types.SimpleNamespace(version=qwix.__version__, path=os.path.dirname(qwix.__file__), qarray=qarray,
                                  numerics=numerics, gptq_core=gptq_core, awq_core=awq_core, padded_ptq=padded_ptq)
    return _QWIX


# ---------------------------------------------------------------------------------------------
# spec -> qwix HowToQuantize


@dataclasses.dataclass(frozen=True)
class QwixMapping:
    """One of our integer specs as qwix quantizes a (rows=out, columns=in) weight."""

    qtype: object  # jnp.int8 / jnp.int4, or qwix's synthetic "int3" / "int2"
    calibration_method: str  # "absmax" (symmetric) or "minmax" (asymmetric)
    tile: int | None  # tile along the contraction axis (a group); None: one scale per row (per channel)
    per_tensor: bool = False
    narrow_requested: bool = False  # the spec asked the narrow +-(2^(B-1) - 1) grid, which qwix lacks

    def how(self, qarray):
        return qarray.HowToQuantize(qtype=self.qtype, channelwise_axes=[] if self.per_tensor else [0],
                                    tiled_axes={1: self.tile} if self.tile else {},
                                    calibration_method=self.calibration_method)

    def padded(self, k: int) -> int:
        """The contraction size qwix needs: ``k`` rounded up to a multiple of the tile."""
        return -(-k // self.tile) * self.tile if self.tile else k

    def describe(self) -> str:
        qt = self.qtype if isinstance(self.qtype, str) else np.dtype(self.qtype).name
        layout = "per-tensor" if self.per_tensor else "channelwise_axes=[0]" + (
            f", tiled_axes={{1: {self.tile}}}" if self.tile else "")
        text = f"qtype={qt}, {self.calibration_method}, {layout}"
        if self.narrow_requested:
            text += " (qwix's full 2^B-level grid, i.e. our -full: qwix has no narrow +-(2^(B-1)-1) grid)"
        return text


def map_spec(spec, qx=None) -> QwixMapping:
    """Our :class:`cascade.quant.spec.IntSpec` (or its text) as qwix's quantization; raises
    :class:`QwixUnsupported` for what qwix cannot express."""
    import jax.numpy as jnp

    from cascade.quant.spec import IntSpec, parse_spec

    qx = qx or import_qwix()
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if not isinstance(spec, IntSpec):
        raise QwixUnsupported(f"{spec}: not an integer spec")
    if spec.clip != "minmax":
        raise QwixUnsupported(f"{spec}: qwix has no {spec.clip} range search for weights (absmax/minmax/rms/fixed)")
    narrow = spec.symmetric and not getattr(spec, "full_range", False)  # qwix has none: its full grid, said so
    qtype = {8: jnp.int8, 4: jnp.int4, 3: "int3", 2: "int2"}[spec.bits]
    method = "absmax" if spec.symmetric else "minmax"
    if not spec.symmetric:
        try:
            qx.numerics.get_asymmetric_bound(qtype)
        except ValueError as e:
            raise QwixUnsupported(f"qwix {qx.version} has no asymmetric int{spec.bits} "
                                  f"(numerics.get_asymmetric_bound: {e})") from None
    return QwixMapping(qtype=qtype, calibration_method=method,
                       tile=spec.group_size if spec.granularity == "group" else None,
                       per_tensor=spec.granularity == "tensor", narrow_requested=narrow)


# ---------------------------------------------------------------------------------------------
# qwix's RTN, GPTQ and AWQ on one (rows, columns) weight; results fake-quantized float32


def _pad_columns(w: np.ndarray, kp: int) -> np.ndarray:
    return w if w.shape[1] == kp else np.pad(w, ((0, 0), (0, kp - w.shape[1])))


def qwix_rtn(w: np.ndarray, m: QwixMapping, qx=None) -> np.ndarray:
    """``padded_ptq.quantize`` of ``w`` (rows, columns), dequantized.  ``padded_ptq.dequantize``
    itself (0.1.8) validates the unpadded codes against the padded scales before it pads them back,
    and fails on every padded tile; this does its steps in working order (pad, dequantize, slice)."""
    import jax.numpy as jnp

    qx = qx or import_qwix()
    pp = qx.padded_ptq
    q = pp.quantize(jnp.asarray(w, jnp.float32), m.how(qx.qarray))
    out = qx.qarray.dequantize(qx.qarray.QArray(pp.pad_to_shape(q.qvalue, q.padded_shape), q.scale, q.zero_point,
                                                q.qtype))
    return np.asarray(out, np.float32)[tuple(slice(0, d) for d in q.original_shape)]


_JIT: dict = {}


def _gptq_function(qx, m: QwixMapping):
    """``gptq_core.quantize_weight``; for a synthetic qtype ("int3"), the same code with its code
    matrix allocated in qwix's storage dtype for those codes (int4; int8 above 4 bits)."""
    f = qx.gptq_core.quantize_weight
    if not isinstance(m.qtype, str):
        return f
    import jax.numpy as jnp

    storage = jnp.int4 if int(m.qtype[3:]) <= 4 else jnp.int8

    def zeros_like(a, dtype=None, **kw):
        return jnp.zeros_like(a, dtype=storage if dtype == m.qtype else dtype, **kw)

    shim = types.SimpleNamespace(**{k: getattr(jnp, k) for k in dir(jnp) if not k.startswith("__")})
    shim.zeros_like = zeros_like
    return types.FunctionType(f.__code__, {**vars(qx.gptq_core), "jnp": shim}, f.__name__, f.__defaults__,
                              f.__closure__)


def qwix_gptq(w: np.ndarray, hessian: np.ndarray, m: QwixMapping, qx=None, *, blocksize: int = GPTQ_BLOCKSIZE,
              percdamp: float = GPTQ_PERCDAMP) -> np.ndarray:
    """qwix GPTQ of ``w`` (rows, columns) with ``hessian`` (columns, columns); jit-compiled per shape."""
    import jax
    import jax.numpy as jnp

    qx = qx or import_qwix()
    if m.calibration_method != "absmax":
        raise QwixUnsupported(f"qwix {qx.version} GPTQ fails for asymmetric weights (gptq_core.quantize_weight "
                              "evaluates `zero_point and zero_point.squeeze(1)` on an array)")
    k = w.shape[1]
    kp = m.padded(k)
    hp = np.zeros((kp, kp), np.float32)
    hp[:k, :k] = hessian
    key = ("gptq", kp, w.shape[0], m, blocksize, percdamp * kp / k)
    if key not in _JIT:
        f, how = _gptq_function(qx, m), m.how(qx.qarray)
        damp = percdamp * kp / k  # padded columns add 0 to the diagonal's mean: keep 1% of the real mean
        _JIT[key] = jax.jit(lambda w, h: qx.qarray.dequantize(f(w, h, how, blocksize=blocksize, percdamp=damp)[0]))
    out = np.asarray(_JIT[key](jnp.asarray(_pad_columns(w, kp), jnp.float32), jnp.asarray(hp)), np.float32)
    if not np.isfinite(out).all():
        raise ValueError("qwix GPTQ returned non-finite weights (Hessian not positive definite)")
    return out[:, :k]


def qwix_awq(w: np.ndarray, act_scale: np.ndarray, m: QwixMapping, qx=None, *, n_grid: int = AWQ_GRID) -> np.ndarray:
    """qwix AWQ of ``w`` (rows, columns) with per-column mean ``|x|``: ``dequantize(Q(W s)) / s``."""
    import jax
    import jax.numpy as jnp

    qx = qx or import_qwix()
    k = w.shape[1]
    kp = m.padded(k)
    a = np.asarray(act_scale, np.float32)
    a = np.concatenate([a, np.full(kp - k, a.max(), np.float32)])  # normalised to 1 like the max: same scales
    key = ("awq", kp, w.shape[0], m, n_grid)
    if key not in _JIT:
        how = m.how(qx.qarray)

        def f(w, a):
            q, s = qx.awq_core.quantize_weight(w, a, how, n_grid=n_grid)
            return qx.qarray.dequantize(q) / s

        _JIT[key] = jax.jit(f)
    out = np.asarray(_JIT[key](jnp.asarray(_pad_columns(w, kp), jnp.float32), jnp.asarray(a)), np.float32)
    return out[:, :k]


# ---------------------------------------------------------------------------------------------
# the model


def qwix_quantize_model(model, spec: str, method: str, calib=None, *, progress: bool = False):
    """``model`` with every decoder-block linear kernel that ``spec``'s rules give an integer spec
    replaced by qwix's fake-quantized (dequantized float32) weights, by ``method`` (module docs);
    other parameters as our rules leave them (float specs cast, e.g. bf16 norms and embeddings).
    ``calib``: a :class:`cascade.models.calibration.CalibrationSet` (GPTQ, AWQ).  Raises
    :class:`QwixUnsupported` when qwix cannot do it.  ``ptq["notes"]`` lists the mapping and any
    adaptation (module docs)."""
    import jax
    import jax.numpy as jnp

    from cascade.models.calibration import INPUT_OF
    from cascade.models.quantize import BLOCK_LINEARS, _get, _set, calibrated_blocks, reduction_axis
    from cascade.quant.qtensor import QuantizedTensor, dequantize
    from cascade.quant.rtn import key_path_str
    from cascade.quant.rules import PrecisionRules
    from cascade.quant.spec import FloatSpec, IntSpec

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "qwix-rtn" and calib is None:
        raise ValueError(f"{method} needs calibration data")
    qx = import_qwix()
    rules = PrecisionRules.parse(spec)
    cfg = model.config
    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731
    params = jax.tree.map(lambda a: dequantize(a, "float32") if is_q(a) else a, model.params, is_leaf=is_q)
    notes: dict[str, None] = {}  # ordered set
    padded: dict[str, None] = {}

    def fake_quant(path: str, kernel, axis: int, spec: IntSpec, stats=None):
        m = map_spec(spec, qx)
        notes[f"{spec} -> {m.describe()}"] = None
        w = np.asarray(kernel, np.float32)
        w = w.T if axis == 0 else w  # qwix: (rows, columns), contraction on columns
        if m.padded(w.shape[1]) != w.shape[1]:
            padded[f"{path.split('/')[-2]} ({w.shape[1]} in)"] = None
        if stats is None:
            out = qwix_rtn(w, m, qx)
        elif method == "qwix-gptq":
            if isinstance(m.qtype, str):
                notes[f"gptq_core code matrix allocated as int4 for {m.qtype} (qwix: 'TODO: support synthetic "
                      "qtype')"] = None
            out = qwix_gptq(w, stats.hessian / max(stats.tokens, 1), m, qx)
        else:
            out = qwix_awq(w, stats.mean_abs, m, qx)
        out = out.T if axis == 0 else out
        return jnp.asarray(out, jnp.float32)

    if method == "qwix-rtn":
        for i in range(cfg.n_layers):
            name = f"layers_{i}"
            for layer in BLOCK_LINEARS:
                path = f"{name}/{layer}/kernel"
                s = rules.spec_for(path, 2)
                if isinstance(s, IntSpec):
                    params[name] = _set(params[name], f"{layer}/kernel",
                                        fake_quant(path, _get(params[name], f"{layer}/kernel"), 0, s))
    else:
        def quantize_block(name, block, specs, stats):
            for layer, s in specs.items():
                path = f"{name}/{layer}/kernel"
                block = _set(block, f"{layer}/kernel",
                             fake_quant(path, _get(block, f"{layer}/kernel"), 0, s, stats[INPUT_OF[layer]]))
            # no QuantizedTensor: calibrated_blocks keeps this block (its fake-quant kernels) both as
            # the block's parameters and as what the next block's inputs are computed with
            return block, {}

        # the same loop as ours: GPTQ input by input inside each block, AWQ block by block
        params, done = calibrated_blocks(params, cfg, rules, calib, quantize_block, desc=method,
                                         within_block=method == "qwix-gptq", progress=progress)
        assert not done

    # everything else, as our rules say: float specs cast; an integer spec outside the blocks (a
    # rule naming the embedding or an untied head) gets qwix RTN, as ours gets RTN
    block_kernels = {f"layers_{i}/{layer}/kernel" for i in range(cfg.n_layers) for layer in BLOCK_LINEARS}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for p, leaf in leaves:
        name = key_path_str(p)
        s = None if name in block_kernels else rules.spec_for(name, leaf.ndim)
        if isinstance(s, FloatSpec):
            leaf = jnp.asarray(leaf).astype(s.dtype)
        elif isinstance(s, IntSpec):
            leaf = fake_quant(name, leaf, reduction_axis(name, leaf.shape), s)
        out.append(leaf)
    params = jax.tree_util.tree_unflatten(treedef, out)

    notes_out = list(notes)
    if padded:
        notes_out.append(f"tile does not divide {', '.join(padded)}: input axis zero-padded to a tile multiple as "
                         "qwix.contrib.padded_ptq does (exact up to rounding ties)")
    settings = {"gptq": {"blocksize": GPTQ_BLOCKSIZE, "percdamp": GPTQ_PERCDAMP},
                "awq": {"n_grid": AWQ_GRID}}.get(method.removeprefix("qwix-"), {})
    ptq = {"method": method, "peer": f"qwix {qx.version}", "settings": settings,
           "calibration": None if calib is None or method == "qwix-rtn" else dict(calib.recipe), "notes": notes_out}
    return dataclasses.replace(model, params=params, quant=spec, ptq=ptq)


# ---------------------------------------------------------------------------------------------
# the benchmark


def run(model_path: str, specs, methods, *, samples: int = 128, length: int = 512, ctx: int = 512, docs: int = 200,
        train: str = TRAIN, val: str = VAL, include_float: bool = True, progress: bool = False, log=print) -> dict:
    from cascade.bench.context import run_context
    from cascade.models import load_model
    from cascade.models.calibration import calibration_tokens
    from cascade.models.evaluation import perplexity, split_documents, tokenize_documents

    qx = import_qwix()
    model = load_model(model_path)
    cfg = model.config
    with open(val, encoding="utf-8") as f:
        ids = tokenize_documents(model.tokenizer, split_documents(f.read()))[:docs]
    calib = None
    if any(m != "qwix-rtn" for m in methods):
        calib = calibration_tokens(model.tokenizer, train, samples=samples, length=min(length, cfg.max_seq_len),
                                   seed=0, max_len=cfg.max_seq_len)

    def ppl(params):
        return perplexity(params, cfg, ids, ctx=ctx, progress=progress).ppl

    rows = []
    if include_float:
        rows.append({"model": model_path, "spec": "source", "method": "float", "ppl": ppl(model.params),
                     "seconds": 0.0, "note": "the model as loaded (float32)"})
        log(_row_text(rows[-1]))
    for spec in specs:
        for method in methods:
            t0 = time.perf_counter()
            try:
                q = qwix_quantize_model(model, spec, method, calib, progress=progress)
            except QwixUnsupported as e:
                rows.append({"model": model_path, "spec": spec, "method": method, "ppl": None,
                             "seconds": None, "note": f"not run: {e}"})
            else:
                seconds = time.perf_counter() - t0
                rows.append({"model": model_path, "spec": spec, "method": method, "ppl": ppl(q.params),
                             "seconds": round(seconds, 2), "note": "; ".join(q.ptq["notes"])})
            log(_row_text(rows[-1]))
    return {"benchmark": "ptq-qwix", **run_context(), "qwix": qx.version, "model": model_path,
            "calibration": None if calib is None else dict(calib.recipe),
            "eval": {"data": val, "documents": len(ids), "ctx": min(ctx, cfg.max_seq_len), "truncate": False},
            "rows": rows}


def _cells(r: dict) -> tuple:
    return (r["spec"], r["method"], "-" if r["ppl"] is None else f"{r['ppl']:.4f}",
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}", r["note"])


def _row_text(r: dict) -> str:
    """One row as a progress line, before the table is laid out."""
    return "  ".join(_cells(r)).rstrip()


def format_table(result: dict) -> str:
    from cascade import console

    return console.format_table([_cells(r) for r in result["rows"]], ("spec", "method", "ppl", "seconds", "note"),
                                align="<<>><")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--spec", nargs="+", default=["int4-g32", "int3-g32", "int3-g64-asym"])
    ap.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", help="write the result (JSON) here")
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences")
    ap.add_argument("--length", type=int, default=512, help="calibration sequence length (capped at the context)")
    ap.add_argument("--ctx", type=int, default=512, help="evaluation window")
    ap.add_argument("--docs", type=int, default=200, help="validation documents")
    ap.add_argument("--no-float", action="store_true", help="skip the float row")
    args = ap.parse_args(argv)
    result = run(args.model, args.spec, args.method, samples=args.samples, length=args.length, ctx=args.ctx,
                 docs=args.docs, include_float=not args.no_float, log=lambda s: print(s, flush=True))
    print(f"\nqwix {result['qwix']}, {args.model}")
    print(format_table(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        from cascade.models.files import write_json

        write_json(args.out, result, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
