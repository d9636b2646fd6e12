"""Automatic mixed precision over a whole model: measure each matrix's sensitivity, plan the
precisions under a byte budget, quantize with a PTQ method, and measure the KL the plan predicted.

:func:`plan_rules` turns a :class:`cascade.models.sensitivity.SensitivityReport` into rules for an
average bit width of the matrices, or a byte budget for the whole model's weights (the norms and
other small parameters, planned from the config, take their share first); the knapsack itself is
:func:`cascade.quant.allocate.auto_rules`.  :func:`auto_mixed_precision` is the whole flow, one
call for ``cascade quantize --quant auto`` and ``cascade bench workflow``.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import TYPE_CHECKING

from cascade.models.config import ModelConfig
from cascade.models.model import Model
from cascade.models.quantize import (CALIBRATED, DEFAULT_CALIBRATED, DEFAULT_UNCALIBRATED, planned_weight_bytes,
                                     quantize_with_method)
from cascade.quant.allocate import InfeasibleBudget, auto_rules, budget_from_avg_bits
from cascade.quant.rtn import QuantReport
from cascade.quant.rules import PrecisionRules
from cascade.quant.spec import parse_spec

if TYPE_CHECKING:  # imported where used: cascade.models.sensitivity re-exports this module's plan
    from cascade.models.sensitivity import SensitivityReport


class NoCandidate(ValueError):
    """No candidate precision is left that the PTQ method can produce (a usage error)."""


def other_bytes(report, cfg: ModelConfig, *, scale_dtype="float16") -> int:
    """Bytes of the parameters outside the report's units (norms, in bf16 under the rules)."""
    first = {}
    for r in report.rows:
        first.setdefault(r.unit, r)
    rules = PrecisionRules(rules=tuple((f"^{re.escape(p)}$", first[u].spec) for u in first for p in report.units[u]))
    return planned_weight_bytes(cfg, rules, scale_dtype=scale_dtype) - sum(r.nbytes for r in first.values())


def plan_rules(report, cfg: ModelConfig, *, avg_bits: float | None = None,
               budget: int | None = None, scale_dtype="float16") -> tuple[PrecisionRules, dict]:
    """:func:`cascade.quant.allocate.auto_rules` for ``avg_bits`` per weight of the units, or
    ``budget`` bytes for the whole model's weights (the norms and other small parameters take their
    share first).  The summary also gives ``model_bytes``, the whole model's weight bytes under the
    rules."""
    if (avg_bits is None) == (budget is None):
        raise ValueError("give exactly one of an average bit width (--avg-bits) or a byte budget (--budget)")
    rest = other_bytes(report, cfg, scale_dtype=scale_dtype)
    units_budget = budget_from_avg_bits(report, avg_bits) if budget is None else budget - rest
    try:
        rules, summary = auto_rules(report, max(units_budget, 0))
    except InfeasibleBudget as e:
        if budget is None:
            bits = 8 * e.minimum / sum(report.params.values())
            raise InfeasibleBudget(units_budget, e.minimum, f"{avg_bits:g} bits a weight is below the smallest candidates "
                                   f"of all layers together: at least {bits:.3f} are needed") from None
        raise InfeasibleBudget(budget, e.minimum + rest, f"budget of {budget:,} bytes is below the smallest "
                               f"candidates of all layers together: at least {e.minimum + rest:,} bytes are needed "
                               f"({e.minimum:,} for the matrices, {rest:,} for the rest)") from None
    summary["model_bytes"] = summary["bytes"] + rest
    return rules, summary


def method_candidates(candidates, method: str) -> tuple[list[str], list[str]]:
    """``(kept, skipped)``: the candidates ``method`` can produce, and the per-tensor ones it cannot
    (GPTQ, AWQ, AutoRound and SmoothQuant work per channel or group)."""
    candidates = list(candidates)
    if method not in CALIBRATED:
        return candidates, []
    skipped = [c for c in candidates if getattr(parse_spec(c), "granularity", None) == "tensor"]
    return [c for c in candidates if c not in skipped], skipped


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoPrecision:
    """What :func:`auto_mixed_precision` chose and made."""

    model: Model  # the quantized model
    report: QuantReport  # its bytes and error per tensor
    rules: PrecisionRules  # one anchored rule per matrix
    summary: dict  # plan_rules' summary, ``measured_kl`` (when measured) and ``rules`` as JSON
    sensitivity: SensitivityReport  # the report planned from (measured, or reused and restricted)
    seconds: float  # wall time of the quantization alone (not the sensitivity, the plan or the KL check)


def auto_mixed_precision(model: Model, calib=None, *, avg_bits: float | None = None, budget: int | None = None,
                         candidates=None, granularity: str = "layer", method: str | None = None, sensitivity=None,
                         sensitivity_source: str | None = None, tokens=None, measure_kl: bool = True,
                         scale_dtype="float16", note=None, progress: bool | None = None,
                         **method_settings) -> AutoPrecision:
    """Quantize ``model`` with each matrix at the candidate precision that spends ``avg_bits`` per
    weight (or ``budget`` bytes of the whole model) where the measured KL is largest.

    ``calib``: a :class:`cascade.models.calibration.CalibrationSet`; the sensitivity is scored on
    ``tokens`` (default its first :func:`~cascade.models.sensitivity.scoring_tokens`), and a
    calibrated ``method`` (with ``method_settings``, :func:`cascade.models.quantize.quantize_with_method`)
    reads it (``method=None``: the default, :func:`cascade.models.quantize.choose_method`).  ``sensitivity``: a report to reuse instead of measuring (a
    :class:`~cascade.models.sensitivity.SensitivityReport`, or its saved JSON, checked against this
    model; named ``sensitivity_source`` in the note), restricted to ``candidates`` when given.
    ``candidates`` default to :data:`cascade.models.sensitivity.DEFAULT_CANDIDATES`; per-tensor ones
    are skipped for a calibrated method (:class:`NoCandidate` when none is left).  ``measure_kl``:
    also the KL of the quantized model to the float one on ``tokens`` (the check of the plan's
    additive prediction).  ``note(text)`` receives what a user should know (skipped candidates, a
    reused measurement)."""
    from cascade.models import sensitivity as sens

    note = note or (lambda text: None)
    if tokens is None and calib is not None:
        tokens = sens.scoring_tokens(calib)
    float_params = sens.float_params(model.params)
    report = None
    if sensitivity is not None:
        report = (sensitivity if isinstance(sensitivity, sens.SensitivityReport)
                  else sens.report_from_json(sensitivity, float_params, scale_dtype=scale_dtype))
    chosen = candidates or (report.candidates if report is not None else sens.DEFAULT_CANDIDATES)
    effective = method or (DEFAULT_CALIBRATED if calib is not None else DEFAULT_UNCALIBRATED)
    named = f"--method {effective}" if method else f"{effective} (the default method)"
    kept, skipped = method_candidates(chosen, effective)
    for c in skipped:
        note(f"skipping candidate {c}: {named} does not support per-tensor specs")
    if not kept:
        raise NoCandidate(f"no candidate precision that {named} supports")
    if report is None:
        if tokens is None:
            raise ValueError("measuring the sensitivity needs calibration tokens (calib or tokens)")
        report = sens.layer_sensitivity(float_params, model.config, tokens, kept, granularity=granularity,
                                        proxy=False, scale_dtype=scale_dtype, progress=progress)
    else:
        report = sens.restrict(report, kept)
        if sensitivity_source is not None:
            note(f"reusing the sensitivity measured in {sensitivity_source} ({report.granularity} granularity, "
                 f"candidates {','.join(kept)})")
    rules, summary = plan_rules(report, model.config, avg_bits=avg_bits, budget=budget, scale_dtype=scale_dtype)
    t0 = time.perf_counter()
    quantized, quant_report = quantize_with_method(model, rules, method=method, calib=calib, scale_dtype=scale_dtype,
                                                   progress=progress, **method_settings)
    seconds = time.perf_counter() - t0
    if measure_kl and tokens is not None:
        summary["measured_kl"] = sens.measured_kl(sens.float_params(quantized.params), model.config, float_params,
                                                  tokens)
    summary["rules"] = rules.to_json()
    return AutoPrecision(model=quantized, report=quant_report, rules=rules, summary=summary, sensitivity=report,
                         seconds=seconds)


__all__ = ["AutoPrecision", "NoCandidate", "auto_mixed_precision", "method_candidates", "other_bytes", "plan_rules"]
