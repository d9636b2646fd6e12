"""Layer sensitivity: how much the model's next-token distributions move when one layer (or one
block) alone is quantized, for each candidate precision, and a cheap proxy for it.

**Measured** (:func:`layer_sensitivity`).  For every unit (a kernel such as
``layers_3/mlp/down_proj/kernel``, the embedding table, the LM head; or a whole block with
``granularity="block"``) and every candidate spec, the unit's weights are replaced by their RTN
round trip (quantized, then dequantized into the same dtype, so the network keeps one compiled
shape) and the model runs on the calibration tokens.  Reported per (unit, spec): the mean KL
divergence ``KL(float || quantized)`` of the next-token distributions, the change of the mean
next-token loss, and the bytes the unit takes stored at that spec.

**Proxy**.  Beside it, a cheap prediction that needs no forward pass per candidate: the
Hessian-weighted weight error ``tr(dW^T H dW) / tokens`` (``H = XᵀX`` of the layer's input over
the calibration tokens, the quantity GPTQ minimises), summed over a block's kernels at block
granularity.  The report gives its Spearman rank correlation with the measured KL (the embedding
and head have no proxy: their inputs are token ids and the final hidden state).

**Uses**.  The budget plan that spends bytes where the KL is (:func:`cascade.quant.allocate.auto_rules`,
:func:`cascade.models.workflow.plan_rules`, both importable from here too) and the whole automatic
mixed-precision flow (:func:`cascade.models.workflow.auto_mixed_precision`) read the report; its
table and chart are drawn by :mod:`cascade.bench.sensitivity`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cascade.console import progress_bar
from cascade.models.config import ModelConfig
from cascade.models.workflow import other_bytes, plan_rules  # noqa: F401  (the plan; re-exported)
from cascade.quant.allocate import auto_rules, budget_from_avg_bits  # noqa: F401  (the knapsack; re-exported)
from cascade.quant.spec import SPEC_VERSION, FloatSpec, check_version, parse_spec

GRANULARITIES = ("layer", "block")
DEFAULT_CANDIDATES = ("bf16", "int8", "int4-g128", "int4-g32", "int3-g32")
SENSITIVITY_SAMPLES, SENSITIVITY_LEN = 32, 256  # calibration tokens scored per candidate run
_BLOCK = re.compile(r"^(layers_\d+)/")


def units_of(params, granularity: str = "layer") -> dict[str, tuple[str, ...]]:
    """``{unit: (parameter paths)}`` of the matrices the allocation chooses for: every kernel, the
    embedding table and the LM head (``layer``), or the kernels of a block together (``block``)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    flat = traverse_util.flatten_dict(params, sep="/")
    paths = [p for p, a in flat.items() if np.ndim(a) >= 2]
    if granularity == "layer":
        return {p: (p,) for p in paths}
    units: dict[str, list[str]] = {}
    for p in paths:
        m = _BLOCK.match(p)
        units.setdefault(m.group(1) if m else p, []).append(p)
    return {u: tuple(ps) for u, ps in units.items()}


def _round_trip(w, spec, path: str):
    """``w`` at ``spec`` and back, in ``w``'s dtype (RTN; a float spec is a cast)."""
    from cascade.models.quantize import reduction_axis
    from cascade.quant import dequantize, quantize

    if isinstance(spec, FloatSpec):
        return jnp.asarray(w).astype(spec.dtype).astype(w.dtype)
    return dequantize(quantize(w, spec, axis=reduction_axis(path, w.shape)), w.dtype)


def _unit_sizes(params, units: dict) -> dict[str, int]:
    """``{unit: number of weights}`` of ``units`` (:func:`units_of`)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return {u: int(sum(np.size(flat[p]) for p in ps)) for u, ps in units.items()}


def unit_bytes(params, paths, spec, *, scale_dtype="float16") -> int:
    """Bytes the parameters ``paths`` take stored at ``spec`` (planned from shapes, nothing allocated)."""
    from cascade.models.quantize import quantized_nbytes, reduction_axis

    flat = traverse_util.flatten_dict(params, sep="/")
    total = 0
    for p in paths:
        shape = tuple(np.shape(flat[p]))
        if isinstance(spec, FloatSpec):
            total += math.prod(shape) * spec.bits // 8
        else:
            total += quantized_nbytes(shape, spec, reduction_axis(p, shape), str(scale_dtype))
    return total


class _SuffixScorer:
    """KL to the float model and mean NLL over fixed tokens of a model that differs from it, running
    only the blocks from ``start``, the first one whose input changes (:meth:`start_of`; -1: the
    whole model, embedding lookup included).  The float hidden states entering every block are
    computed once and kept (``(n_layers + 1) * N * T * dim`` floats; 146 MB for SmolLM2-135M on
    8 x 256 tokens; the proxy's Hessians are taken from them too), so a matrix in block ``i`` costs the blocks ``i..`` and the
    head instead of the whole model (about 0.6x of a forward pass on SmolLM2, averaged over its
    blocks; a change to the LM head alone costs only the head).  Every score, the float model's
    included, goes through the same block-by-block path, so an unchanged model scores KL 0 exactly."""

    def __init__(self, params, cfg: ModelConfig, tokens: np.ndarray):
        from cascade.models import calibration

        self.cfg = cfg
        self.tokens = np.asarray(tokens, np.int32)
        n, t = self.tokens.shape
        self.hidden = [calibration.embed_tokens(params, self.tokens)]
        for i in range(cfg.n_layers):
            self.hidden.append(calibration.block_outputs(params[f"layers_{i}"], cfg, self.hidden[-1]))
        per_seq = 4 * t * cfg.vocab_size  # the log-probs of one sequence
        bsz = max(1, min((16 << 20) // per_seq, calibration.batch_size(cfg, t)))
        self.rows = [slice(i, i + bsz) for i in range(0, n, bsz)]
        self.ref = [_head_log_probs(_head_params(params, cfg), cfg, jnp.asarray(self.hidden[-1][r])) for r in self.rows]
        self.count = n * (t - 1)
        _, self.base_nll = self(params, cfg.n_layers)

    def start_of(self, paths) -> int:
        """The first block whose input changes when ``paths`` change: -1 for the embedding (the
        hidden states are looked up again), ``n_layers`` for the final norm or the LM head."""
        starts = []
        for p in paths:
            m = _BLOCK.match(p)
            starts.append(-1 if p.startswith("embed/") else int(m.group(1)[len("layers_"):]) if m else self.cfg.n_layers)
        return min(starts)

    def __call__(self, params, start: int) -> tuple[float, float]:
        from cascade.models import calibration

        if start < 0:
            h = calibration.embed_tokens(params, self.tokens)
            start = 0
        else:
            h = self.hidden[start]
        for i in range(start, self.cfg.n_layers):
            h = calibration.block_outputs(params[f"layers_{i}"], self.cfg, h)
        head = _head_params(params, self.cfg)
        kl = nll = 0.0
        for r, ref in zip(self.rows, self.ref):
            k, n = _head_kl_and_nll(head, self.cfg, jnp.asarray(h[r]), jnp.asarray(self.tokens[r]), ref)
            kl += float(k)
            nll += float(n)
        return kl / self.count, nll / self.count


def _head_params(params, cfg: ModelConfig) -> dict:
    head = {"final_norm": params["final_norm"]}
    if cfg.tie_embeddings:
        head["embed"] = params["embed"]
    else:
        head["lm_head"] = params["lm_head"]
    return head


@partial(jax.jit, static_argnames=("cfg",))
def _head_log_probs(head, cfg: ModelConfig, h):
    """Next-token log-probs from the last block's output ``h`` (B, T, dim): the tail of
    :class:`cascade.models.llama.Transformer` (final norm, then the tied or separate head)."""
    from cascade.models.llama import Linear, RMSNorm, tied_head

    x = RMSNorm(cfg.norm_eps).apply({"params": head["final_norm"]}, h)
    if cfg.tie_embeddings:
        logits = tied_head(x, head["embed"]["embedding"])
    else:
        logits = Linear(cfg.vocab_size, parallel="column").apply({"params": head["lm_head"]}, x)
    return jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)


@partial(jax.jit, static_argnames=("cfg",))
def _head_kl_and_nll(head, cfg: ModelConfig, h, tokens, ref_logp):
    logp = _head_log_probs(head, cfg, h)
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.maximum(kl, 0.0).sum(), nll.sum()


def measured_kl(params, cfg: ModelConfig, ref_params, tokens) -> float:
    """Mean KL(ref || params) of the next-token distributions over ``tokens`` (N, T)."""
    return _SuffixScorer(ref_params, cfg, tokens)(params, -1)[0]


def _hessians(params, cfg: ModelConfig, hidden) -> dict[str, tuple[np.ndarray, int]]:
    """``{kernel path: (XᵀX of its input, tokens)}`` for every block kernel of the float model, from
    ``hidden``: the hidden states entering each block (the scorer's, so no second forward pass)."""
    from cascade.models import calibration

    out = {}
    for i in range(cfg.n_layers):
        name = f"layers_{i}"
        stats = calibration.block_statistics(params[name], cfg, hidden[i], keep_tokens=0)
        for group, layers in calibration.INPUTS.items():
            for layer in layers:
                out[f"{name}/{layer}/kernel"] = (stats[group].hessian, stats[group].tokens)
    return out


def _proxy(w, w_hat, hessian, n) -> float:
    d = np.asarray(w_hat, np.float64) - np.asarray(w, np.float64)
    return float(np.sum((np.asarray(hessian, np.float64) @ d) * d) / max(n, 1))  # tr(dᵀ H d): one BLAS product (a 3-operand einsum loops in C: 1.2 s for a 1536 x 576 kernel)


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length sequences (average ranks on ties)."""
    def ranks(x):
        x = np.asarray(x, np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # ties share their mean rank
            tie = x == v
            r[tie] = r[tie].mean()
        return r

    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sensitivity:
    """One unit at one candidate precision."""

    unit: str  # a parameter path, or a block name at block granularity
    spec: str  # the candidate precision
    kl: float  # mean KL(float || this unit quantized) over the calibration tokens
    delta_loss: float  # change of the mean next-token loss (nats)
    proxy: float | None  # Hessian-weighted weight error (None for the embedding and head)
    nbytes: int  # bytes of the unit stored at the spec

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SensitivityReport:
    rows: tuple[Sensitivity, ...]
    units: dict  # unit -> parameter paths
    granularity: str
    tokens: int  # scored tokens
    base_loss: float  # the float model's mean next-token loss on them
    params: dict  # unit -> number of weights

    @property
    def rank_correlation(self) -> float | None:
        """Spearman correlation of the proxy with the measured KL over the rows that have one (None
        without a proxy, or when either side is constant)."""
        rows = [r for r in self.rows if r.proxy is not None]
        rho = spearman([r.proxy for r in rows], [r.kl for r in rows]) if len(rows) >= 2 else None
        return None if rho is None or math.isnan(rho) else rho

    @property
    def candidates(self) -> list[str]:
        """The specs measured, in the order of the rows."""
        return list(dict.fromkeys(r.spec for r in self.rows))

    def sorted(self) -> list[Sensitivity]:
        return sorted(self.rows, key=lambda r: -r.kl)

    def to_json(self) -> dict:
        return {"granularity": self.granularity, "tokens": self.tokens, "base_loss": self.base_loss,
                "rank_correlation": self.rank_correlation, "units": {u: list(p) for u, p in self.units.items()},
                "spec_version": SPEC_VERSION, "rows": [r.to_json() for r in self.sorted()]}


def report_from_json(data: dict, params, *, scale_dtype="float16") -> SensitivityReport:
    """The :class:`SensitivityReport` saved in ``data`` (a ``cascade sensitivity --out`` file, or a
    ``cascade bench workflow`` result, whose ``sensitivity`` holds the rows), checked against
    ``params`` (the model it is reused for): the same units at the report's granularity, and every
    row's bytes equal to what its spec gives that unit here (so a report of another model, or of
    another ``scale_dtype``, is refused instead of silently planning the wrong bytes).  Raises
    ``ValueError`` with one line saying what does not match."""
    if not isinstance(data, dict):
        raise ValueError("not a sensitivity report: expected a JSON object")
    body = data["sensitivity"] if isinstance(data.get("sensitivity"), dict) else data
    granularity = body.get("granularity", data.get("granularity"))
    # reports written before spec grammar version 2 carry no version: their int3-g32 is the narrow grid
    version = check_version(body.get("spec_version", data.get("spec_version", 1)), "the report's spec_version")
    rows = body.get("rows")
    if granularity not in GRANULARITIES or not isinstance(rows, list) or not rows:
        raise ValueError("not a sensitivity report: it needs 'granularity' and a non-empty list of 'rows' "
                         "(cascade sensitivity --out, or a bench workflow result)")
    units = units_of(params, granularity)
    fields = [f.name for f in dataclasses.fields(Sensitivity)]
    parsed = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or any(k not in r for k in fields):
            raise ValueError(f"sensitivity report row {i} lacks one of {', '.join(fields)}")
        if r["unit"] not in units:
            raise ValueError(f"the sensitivity report does not match this model: it has unit {r['unit']!r}, "
                             f"which the model has no {granularity} of")
        spec = parse_spec(r["spec"], version=version)
        expected = unit_bytes(params, units[r["unit"]], spec, scale_dtype=scale_dtype)
        if int(r["nbytes"]) != expected:
            raise ValueError(f"the sensitivity report does not match this model: {r['unit']} at {r['spec']} is "
                             f"{int(r['nbytes']):,} bytes there and {expected:,} here (another model, or another "
                             f"--scale-dtype)")
        kl = float(r["kl"])
        if not math.isfinite(kl):
            raise ValueError(f"sensitivity report row {i} ({r['unit']} at {r['spec']}) has a non-finite KL")
        parsed.append(Sensitivity(unit=r["unit"], spec=str(spec), kl=kl, delta_loss=float(r["delta_loss"]),
                                  proxy=None if r["proxy"] is None else float(r["proxy"]), nbytes=expected))
    measured = {r.unit for r in parsed}
    missing = [u for u in units if u not in measured]
    if missing:
        raise ValueError(f"the sensitivity report does not match this model: no row for {missing[0]}"
                         + (f" (and {len(missing) - 1} more units)" if len(missing) > 1 else ""))
    return SensitivityReport(rows=tuple(parsed), units=units, granularity=granularity, tokens=int(body.get("tokens", 0)),
                             base_loss=float(body.get("base_loss", float("nan"))), params=_unit_sizes(params, units))


def restrict(report: SensitivityReport, candidates) -> SensitivityReport:
    """``report`` with only the rows of ``candidates`` (specs as text); every unit must keep one."""
    keep = {str(parse_spec(c)) for c in candidates}
    rows = tuple(r for r in report.rows if r.spec in keep)
    bare = [u for u in report.units if not any(r.unit == u for r in rows)]
    if bare:
        raise ValueError(f"no candidate left for {bare[0]} among {', '.join(sorted(keep))}")
    return dataclasses.replace(report, rows=rows)


def layer_sensitivity(params, cfg: ModelConfig, tokens, candidates, *, granularity: str = "layer",
                      proxy: bool = True, scale_dtype="float16", progress: bool | None = None) -> SensitivityReport:
    """:class:`SensitivityReport` of ``params`` (a float model) on calibration ``tokens`` (N, T)
    for each spec in ``candidates`` (integer or float specs; module docs).  ``proxy``: also the
    Hessian-weighted weight error (one calibration pass over the blocks)."""
    specs = [parse_spec(c) for c in candidates]
    if not specs:
        raise ValueError("no candidate precisions given")
    for flat_value in traverse_util.flatten_dict(params, sep="/").values():
        if not isinstance(flat_value, (np.ndarray, jax.Array)):
            raise ValueError("sensitivity needs a float model: dequantize a quantized checkpoint first")
    units = units_of(params, granularity)
    flat = traverse_util.flatten_dict(params, sep="/")
    scorer = _SuffixScorer(params, cfg, tokens)
    hess = _hessians(params, cfg, scorer.hidden) if proxy else {}
    rows = []
    work = [(u, s) for u in units for s in specs]
    for unit, spec in progress_bar(work, desc="sensitivity", unit="run", enabled=progress, leave=False):
        paths = units[unit]
        changed = dict(flat)
        err = 0.0 if all(p in hess for p in paths) else None
        for p in paths:
            changed[p] = _round_trip(flat[p], spec, p)
            if err is not None:
                err += _proxy(flat[p], changed[p], *hess[p])
        kl, nll = scorer(traverse_util.unflatten_dict(changed, sep="/"), scorer.start_of(paths))
        rows.append(Sensitivity(unit=unit, spec=str(spec), kl=kl, delta_loss=nll - scorer.base_nll, proxy=err,
                                nbytes=unit_bytes(params, paths, spec, scale_dtype=scale_dtype)))
    return SensitivityReport(rows=tuple(rows), units=units, granularity=granularity, tokens=scorer.count,
                             base_loss=scorer.base_nll, params=_unit_sizes(params, units))


def scoring_tokens(calib, samples: int | None = None) -> np.ndarray:
    """The tokens ``--quant auto`` scores each candidate on: the first ``samples`` (default
    :data:`SENSITIVITY_SAMPLES`) calibration sequences, cut to :data:`SENSITIVITY_LEN` tokens (a
    run per unit and candidate is one forward pass over them)."""
    samples = SENSITIVITY_SAMPLES if samples is None else samples
    if samples < 1:
        raise ValueError(f"sensitivity needs at least one calibration sequence, got {samples}")
    return np.asarray(calib.tokens[:samples, :SENSITIVITY_LEN])


def float_params(params):
    """``params`` with every quantized tensor dequantized to float32 (a GGUF import or a saved
    checkpoint measured as a float model)."""
    from cascade.quant import QuantizedTensor, dequantize

    return jax.tree.map(lambda a: dequantize(a, "float32") if isinstance(a, QuantizedTensor) else a, params,
                        is_leaf=lambda a: isinstance(a, QuantizedTensor))


__all__ = ["DEFAULT_CANDIDATES", "GRANULARITIES", "SENSITIVITY_LEN", "SENSITIVITY_SAMPLES", "Sensitivity",
           "SensitivityReport", "auto_rules", "budget_from_avg_bits", "float_params", "layer_sensitivity", "measured_kl",
           "other_bytes", "plan_rules", "report_from_json", "restrict", "scoring_tokens", "spearman", "unit_bytes",
           "units_of"]
