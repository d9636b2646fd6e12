"""Automatic mixed precision against uniform specs at the same bytes (issue "calibration-to-
deployment workflow", part 2).

``cascade bench workflow MODEL --calib FILE --data FILE``.  Steps:

1. Measure every matrix's sensitivity (:func:`cascade.models.sensitivity.layer_sensitivity`): the
   mean KL to the float model with that matrix alone RTN-quantized at each candidate, on 32 x 256
   calibration tokens (``sens_samples`` x 256).
2. For each uniform spec (default ``int4-g32`` and ``int3-g32``: about 4.5 and 3.5 bits a weight
   with their scales), take the bytes that spec gives the whole model (embeddings and norms in
   bf16, as the default rules keep them) as the budget and let the knapsack choose each matrix's
   precision from the candidates within it (:func:`cascade.models.workflow.plan_rules`).
3. Quantize both ways with each method (RTN, GPTQ, ...; the auto way is
   :func:`cascade.models.workflow.auto_mixed_precision`, the flow ``cascade quantize --quant auto``
   runs) and score both against the float model on the same windows of ``--data``: perplexity,
   KLD, top-1, bytes.

4. **Long context** (``long_context``): for each target, the best auto model (lowest perplexity
   over the methods) is scored once more at the longest context the model supports (or
   ``long_ctx``), on the ``--data`` documents packed into one stream, sliding windows every
   ``ctx / 4`` with only targets that have ``3/4 ctx`` tokens before them scored: through an fp32
   KV cache and through the quantized ``kv`` cache (default ``int8``), beside the float model on the
   same tokens.  Short benchmarks hide failures that only show once the cache is long.

Rows carry ``target`` (the uniform spec), ``config`` (``uniform`` or ``auto``), ``method``, the
fidelity columns, ``weight_bytes`` and ``avg_bits``; ``allocations`` holds each target's chosen
precision per matrix with its predicted KL, and the KL measured on the calibration tokens for the
RTN model (the additivity check).
"""

from __future__ import annotations

import time
from collections import Counter

from cascade import quant
from cascade.quant.spec import SPEC_VERSION
from cascade.bench.context import run_context
from cascade.bench.ptq import float_model
from cascade.console import format_table, progress_bar
from cascade.models import Model, load_model, split_documents, tokenize_documents, weight_bytes
from cascade.models import sensitivity as sens
from cascade.models.calibration import calibration_tokens
from cascade.models.evaluation import fidelity, perplexity
from cascade.models.quantize import planned_weight_bytes, quantize_with_method
from cascade.models.workflow import auto_mixed_precision, plan_rules

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
        kv: str | None = "int8", long_ctx: int | None = None, long_tokens: int = 8192,
        sens_samples: int | None = None, sensitivity: dict | None = None, sensitivity_source: str | None = None,
        progress=None, on_row=None) -> dict:
    """The result (module docs); ``on_row(result)`` after every row with ``"partial": true``.  ``kv``: the
    KV cache of the long-context check (None skips the check), ``long_ctx`` its window (default the
    model's context), ``long_tokens`` about how many tokens it scores.  ``sens_samples``: calibration
    sequences each sensitivity run scores (default :data:`cascade.models.sensitivity.SENSITIVITY_SAMPLES`;
    fewer make the sweep proportionally cheaper on a large model, noisier, and also set the tokens
    of the additivity check).  ``sensitivity``: a saved measurement of this model to reuse instead of
    step 1 (a ``cascade sensitivity --out`` report or an earlier workflow result, named by
    ``sensitivity_source`` in the result); its granularity and candidates replace the arguments', and
    it must have scored as many tokens as ``sens_samples`` gives (the additivity check's tokens)."""
    base = float_model(model if isinstance(model, Model) else load_model(model, tokenizer=tokenizer))
    cfg = base.config
    length = min(length, cfg.max_seq_len)
    ctx = min(ctx, cfg.max_seq_len)
    cal = calibration_tokens(base.tokenizer, calib, samples=samples, length=length, seed=seed, max_len=cfg.max_seq_len)
    with open(data, encoding="utf-8") as f:
        docs = tokenize_documents(base.tokenizer, split_documents(f.read())[:limit])
    if kv is not None:  # the long-context check comes last: its inputs are checked before the hours before it
        from cascade.quant.kv import parse_kv_spec

        parse_kv_spec(kv).check_model(context=cfg.max_seq_len, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
        window, n = min(long_ctx or cfg.max_seq_len, cfg.max_seq_len), sum(len(d) for d in docs)
        if n <= window:
            raise ValueError(f"the long-context check needs more than {window} tokens of --data; it holds {n} "
                             f"(pass --kv none to skip it)")
    tokens = sens.scoring_tokens(cal, sens_samples)
    if sensitivity is None:
        t0 = time.perf_counter()
        report = sens.layer_sensitivity(base.params, cfg, tokens, candidates, granularity=granularity, progress=progress)
        sens_seconds = time.perf_counter() - t0
    else:
        report = sens.report_from_json(sensitivity, base.params)
        scored = tokens.shape[0] * (tokens.shape[1] - 1)
        if report.tokens != scored:
            raise ValueError(f"the reused sensitivity scored {report.tokens:,} tokens and these settings score {scored:,}: "
                             f"pass the --sens-samples it was measured with")
        granularity, candidates = report.granularity, report.candidates
        body = sensitivity.get("sensitivity", sensitivity)
        sens_seconds = body.get("seconds")
    rows, allocations, float_ppl, long_context = [], {}, None, []
    best: dict[str, tuple[float, str, Model]] = {}  # target -> the best auto model so far

    def result(partial: bool) -> dict:
        return {"benchmark": "workflow", "spec_version": SPEC_VERSION, **run_context(), "model": base.source,
                "float_ppl": float_ppl,
                "float_weight_bytes": weight_bytes(base.params),
                "calibration": cal.recipe, "data": data, "documents": len(docs), "ctx": ctx, "max_tokens": max_tokens,
                "candidates": list(candidates), "granularity": granularity,
                "sensitivity": {"tokens": report.tokens, "seconds": sens_seconds,
                                **({"reused_from": sensitivity_source or "(given)"} if sensitivity is not None else {}),
                                "rank_correlation": report.rank_correlation, "rows": [r.to_json() for r in report.sorted()]},
                "allocations": allocations, "long_context": long_context, **({"partial": True} if partial else {}),
                "rows": rows}

    n_weights = sum(report.params.values())
    # one step per quantized model, and per long-context check
    bar = progress_bar(total=len(targets) * len(methods) * 2 + (len(set(targets)) if kv is not None and methods else 0),
                       desc="bench workflow", unit="model", enabled=progress)
    for target in targets:
        budget = planned_weight_bytes(cfg, target)
        _, summary = plan_rules(report, cfg, budget=budget)
        summary["mix"] = mix_by_kind(summary["units"])
        uniform_bytes = sum(sens.unit_bytes(base.params, paths, quant.PrecisionRules.parse(target).spec_for(paths[0], 2))
                            for paths in report.units.values())
        allocations[target] = summary
        for method in methods:
            for config in ("uniform", "auto"):
                if config == "uniform":
                    t1 = time.perf_counter()
                    quantized, _ = quantize_with_method(base, target, method=method, calib=cal, progress=progress)
                    seconds = time.perf_counter() - t1
                else:  # the plan above again, quantized with the method (and checked against its prediction)
                    auto = auto_mixed_precision(base, cal, budget=budget, sensitivity=report, tokens=tokens,
                                                method=method, measure_kl=method == "rtn", progress=progress)
                    quantized, seconds = auto.model, auto.seconds
                    if "measured_kl" in auto.summary:
                        summary["measured_kl"] = auto.summary["measured_kl"]
                fid = fidelity(quantized.params, cfg, base.params, cfg, docs, ctx=ctx, max_tokens=max_tokens,
                               progress=progress)
                float_ppl = fid.ref_ppl
                nbytes = weight_bytes(quantized.params)
                matrix_bytes = summary["bytes"] if config == "auto" else uniform_bytes
                rows.append({"target": target, "config": config, "method": method, "ppl": fid.ppl,
                             "delta_ppl": fid.delta_ppl, "kld_mean": fid.kld_mean, "kld_p99": fid.kld_p99,
                             "top1_agreement": fid.top1_agreement, "weight_bytes": nbytes,
                             "avg_bits": 8 * matrix_bytes / n_weights, "seconds": seconds, "tokens": fid.tokens})
                if config == "auto" and (target not in best or fid.ppl < best[target][0]):
                    best[target] = (fid.ppl, method, quantized)
                bar.update()
                if on_row is not None:
                    on_row(result(partial=True))
    if kv is not None:
        stream = [[t for doc in docs for t in doc]]
        for target, (_, method, quantized) in best.items():
            long_context.append({"target": target, "config": "auto", "method": method,
                                 **long_context_check(quantized, base, stream, kv=kv, ctx=long_ctx, tokens=long_tokens,
                                                      progress=progress)})
            bar.update()
            if on_row is not None:
                on_row(result(partial=True))
    bar.close()
    return result(partial=False)


def long_context_check(model: Model, reference: Model, stream: list[list[int]], *, kv: str = "int8",
                       ctx: int | None = None, tokens: int = 8192, progress=None) -> dict:
    """``model`` scored at the long context (module docs, step 4) through an fp32 cache and a ``kv``
    cache, and ``reference`` (the float model) on the same tokens."""
    cfg = model.config
    ctx = min(ctx or cfg.max_seq_len, cfg.max_seq_len)
    stride = max(1, ctx // 4)
    n = sum(len(d) for d in stream)
    if n <= ctx:
        raise ValueError(f"the long-context check needs more than {ctx} tokens of --data; it holds {n}")
    kw = dict(ctx=ctx, stride=stride, min_context=ctx - stride, max_tokens=tokens, progress=progress)
    ref = perplexity(reference.params, reference.config, stream, **kw)
    fp32 = perplexity(model.params, cfg, stream, kv="fp32", **kw)
    quant_kv = perplexity(model.params, cfg, stream, kv=kv, **kw)
    return {"ctx": ctx, "stride": stride, "kv": kv, "tokens": quant_kv.tokens, "float_ppl": ref.ppl,
            "ppl_fp32_cache": fp32.ppl, "ppl_kv": quant_kv.ppl, "kv_change_pct": 100.0 * (quant_kv.ppl / fp32.ppl - 1.0),
            "vs_float_pct": 100.0 * (quant_kv.ppl / ref.ppl - 1.0)}


def table(result: dict) -> str:
    sens_run = result["sensitivity"]
    seconds = "" if sens_run.get("seconds") is None else f" in {sens_run['seconds']:.0f} s"
    reused = f" (reused from {sens_run['reused_from']})" if "reused_from" in sens_run else ""
    rows = [(r["target"], r["config"], r["method"], f"{r['ppl']:.3f}", f"{r['delta_ppl']:+.3f}", f"{r['kld_mean']:.4f}",
             f"{r['top1_agreement']:.1%}", f"{r['avg_bits']:.3f}", f"{r['weight_bytes']:,}") for r in result["rows"]]
    lines = [f"{result['model']}: float perplexity {result['float_ppl']:.4f} on {result['data']} (ctx {result['ctx']}); "
             f"sensitivity on {sens_run['tokens']:,} tokens{seconds}{reused}",
             format_table(rows, ("target", "config", "method", "ppl", "Δppl", "KLD", "top-1", "bits/w", "bytes"),
                          align="<<<>>>>>>")]
    for target, a in result["allocations"].items():
        mix = "; ".join(f"{k}: " + ", ".join(f"{n} x {s}" for s, n in v.items()) for k, v in a["mix"].items())
        measured = f", measured {a['measured_kl']:.4f}" if "measured_kl" in a else ""
        lines.append(f"auto at the bytes of {target}: predicted KL {a['predicted_kl']:.4f}{measured}; {mix}")
    for r in result.get("long_context", []):
        lines.append(f"long context ({r['target']} auto, {r['method']}): ctx {r['ctx']}, {r['tokens']:,} tokens each with "
                     f">= {r['ctx'] - r['stride']} before it: float {r['float_ppl']:.4f}, fp32 cache {r['ppl_fp32_cache']:.4f}, "
                     f"{r['kv']} cache {r['ppl_kv']:.4f} ({r['kv_change_pct']:+.3f}% vs fp32 cache, "
                     f"{r['vs_float_pct']:+.2f}% vs float)")
    return "\n".join(lines)
