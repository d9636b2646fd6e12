"""Automatic mixed precision against uniform specs at the same bytes (issue "calibration-to-
deployment workflow", part 2).

``cascade bench workflow MODEL --calib FILE --data FILE``.  Steps:

1. Measure every matrix's sensitivity (:func:`cascade.models.sensitivity.layer_sensitivity`): the
   mean KL to the float model with that matrix alone RTN-quantized at each candidate, on 32 x 256
   calibration tokens.
2. For each uniform spec (default ``int4-g32`` and ``int3-g32``: about 4.5 and 3.5 bits a weight
   with their scales), take the bytes that spec gives the whole model (embeddings and norms in
   bf16, as the default rules keep them) as the budget and let the knapsack choose each matrix's
   precision from the candidates within it (:func:`cascade.models.sensitivity.plan_rules`).
3. Quantize both ways with each method (RTN, GPTQ, ...) and score both against the float model on
   the same windows of ``--data``: perplexity, KLD, top-1, bytes.

Rows carry ``target`` (the uniform spec), ``config`` (``uniform`` or ``auto``), ``method``, the
fidelity columns, ``weight_bytes`` and ``avg_bits``; ``allocations`` holds each target's chosen
precision per matrix with its predicted KL, and the KL measured on the calibration tokens for the
RTN model (the additivity check).
"""

from __future__ import annotations

import time
from collections import Counter

from cascade import quant
from cascade.bench.context import run_context
from cascade.bench.ptq import float_model
from cascade.memory import planned_weight_bytes
from cascade.models import Model, load_model, quantize_model, split_documents, tokenize_documents, weight_bytes
from cascade.models import sensitivity as sens
from cascade.models.calibration import calibration_tokens
from cascade.models.evaluation import fidelity
from cascade.models.quantize import CALIBRATED

DEFAULT_TARGETS = ("int4-g32", "int3-g32")
DEFAULT_CANDIDATES = ("bf16", "int8", "int4-g128", "int4-g64", "int4-g32", "int3-g128", "int3-g64", "int3-g32")
DEFAULT_METHODS = ("rtn", "gptq")


def _kind(unit: str) -> str:
    """``layers_3/mlp/down_proj/kernel`` -> ``down_proj``; ``embed/embedding`` -> ``embed``."""
    parts = unit.split("/")
    return parts[-2] if parts[-1] == "kernel" else parts[0]


def mix_by_kind(units: dict) -> dict[str, dict[str, int]]:
    """``{kind: {spec: count}}`` of an allocation (which kinds of matrix got which precision)."""
    out: dict[str, Counter] = {}
    for unit, pick in units.items():
        out.setdefault(_kind(unit), Counter())[pick["spec"]] += 1
    return {k: dict(v.most_common()) for k, v in out.items()}


def run(model: "str | Model", calib: str, data: str, *, targets=DEFAULT_TARGETS, candidates=DEFAULT_CANDIDATES,
        methods=DEFAULT_METHODS, samples: int = 128, length: int = 512, seed: int = 0, limit: int | None = 200,
        ctx: int = 512, max_tokens: int | None = None, granularity: str = "layer", tokenizer: str | None = None,
        progress=None, on_row=None) -> dict:
    """The result (module docs); ``on_row(result)`` after every row with ``"partial": true``."""
    base = float_model(model if isinstance(model, Model) else load_model(model, tokenizer=tokenizer))
    cfg = base.config
    length = min(length, cfg.max_seq_len)
    ctx = min(ctx, cfg.max_seq_len)
    cal = calibration_tokens(base.tokenizer, calib, samples=samples, length=length, seed=seed, max_len=cfg.max_seq_len)
    with open(data, encoding="utf-8") as f:
        docs = tokenize_documents(base.tokenizer, split_documents(f.read())[:limit])
    tokens = sens.scoring_tokens(cal)
    t0 = time.perf_counter()
    report = sens.layer_sensitivity(base.params, cfg, tokens, candidates, granularity=granularity, progress=progress)
    sens_seconds = time.perf_counter() - t0
    rows, allocations, float_ppl = [], {}, None

    def result(partial: bool) -> dict:
        return {"benchmark": "workflow", **run_context(), "model": base.source, "float_ppl": float_ppl,
                "calibration": cal.recipe, "data": data, "documents": len(docs), "ctx": ctx, "max_tokens": max_tokens,
                "candidates": list(candidates), "granularity": granularity,
                "sensitivity": {"tokens": report.tokens, "seconds": sens_seconds,
                                "rank_correlation": report.rank_correlation, "rows": [r.to_json() for r in report.sorted()]},
                "allocations": allocations, **({"partial": True} if partial else {}), "rows": rows}

    n_weights = sum(report.params.values())
    for target in targets:
        budget = planned_weight_bytes(cfg, target)
        rules, summary = sens.plan_rules(report, cfg, budget=budget)
        summary["mix"] = mix_by_kind(summary["units"])
        uniform_bytes = sum(sens.unit_bytes(base.params, paths, quant.PrecisionRules.parse(target).spec_for(paths[0], 2))
                            for paths in report.units.values())
        allocations[target] = summary
        for method in methods:
            for config, r in (("uniform", target), ("auto", rules)):
                t1 = time.perf_counter()
                quantized, _ = quantize_model(base, r, method=method, calib=cal if method in CALIBRATED else None,
                                              progress=progress)
                seconds = time.perf_counter() - t1
                if config == "auto" and method == "rtn":
                    summary["measured_kl"] = sens.measured_kl(sens.float_params(quantized.params), cfg, base.params, tokens)
                fid = fidelity(quantized.params, cfg, base.params, cfg, docs, ctx=ctx, max_tokens=max_tokens,
                               progress=progress)
                float_ppl = fid.ref_ppl
                nbytes = weight_bytes(quantized.params)
                matrix_bytes = summary["bytes"] if config == "auto" else uniform_bytes
                rows.append({"target": target, "config": config, "method": method, "ppl": fid.ppl,
                             "delta_ppl": fid.delta_ppl, "kld_mean": fid.kld_mean, "kld_p99": fid.kld_p99,
                             "top1_agreement": fid.top1_agreement, "weight_bytes": nbytes,
                             "avg_bits": 8 * matrix_bytes / n_weights, "seconds": seconds, "tokens": fid.tokens})
                if on_row is not None:
                    on_row(result(partial=True))
    return result(partial=False)


def table(result: dict) -> str:
    lines = [f"{result['model']}: float perplexity {result['float_ppl']:.4f} on {result['data']} (ctx {result['ctx']}); "
             f"sensitivity on {result['sensitivity']['tokens']:,} tokens in {result['sensitivity']['seconds']:.0f} s",
             f"{'target':<10} {'config':<8} {'method':<8} {'ppl':>8} {'Δppl':>8} {'KLD':>8} {'top-1':>7} "
             f"{'bits/w':>7} {'bytes':>11}"]
    for r in result["rows"]:
        lines.append(f"{r['target']:<10} {r['config']:<8} {r['method']:<8} {r['ppl']:>8.3f} {r['delta_ppl']:>+8.3f} "
                     f"{r['kld_mean']:>8.4f} {r['top1_agreement']:>7.1%} {r['avg_bits']:>7.3f} {r['weight_bytes']:>11,}")
    for target, a in result["allocations"].items():
        mix = "; ".join(f"{k}: " + ", ".join(f"{n} x {s}" for s, n in v.items()) for k, v in a["mix"].items())
        measured = f", measured {a['measured_kl']:.4f}" if "measured_kl" in a else ""
        lines.append(f"auto at the bytes of {target}: predicted KL {a['predicted_kl']:.4f}{measured}; {mix}")
    return "\n".join(lines)
