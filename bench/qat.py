"""QAT after PTQ: how much of the gap to float a short fine-tune recovers (issue "calibration-to-
deployment workflow", part 4).

``cascade bench qat MODEL --calib FILE --train FILE --data FILE --spec int3-g32 --method gptq
--steps N``.  Steps, all on the same scored windows of ``--data`` as ``cascade bench ptq``:

1. the float model (the reference), and RTN at ``spec`` (the baseline ``gap_closed`` counts from);
2. ``method`` at ``spec`` with the calibration recipe of ``bench ptq`` (the best PTQ method is the
   starting point);
3. :func:`cascade.models.qat.qat` from that checkpoint for ``steps`` AdamW steps on ``--train``
   (``batch_size`` x ``seq_len`` tokens a step, ``lr`` with a tenth of the steps of warm-up and
   cosine decay, no weight decay), then its RTN under the same rules, scored again (``--learn-clip``:
   QAT also learns each group's clipping range, and the checkpoint uses it; ``--distill``: the loss
   is the KL divergence from the float model's predictions instead of the cross-entropy).

Rows: ``stage`` (``rtn``, ``ptq``, ``qat``), the fidelity columns, ``seconds`` (to quantize, or to
train) and for ``qat`` the steps and training tokens.  ``gap_closed`` of the QAT row is
``(ppl_ptq - ppl_qat) / (ppl_ptq - ppl_float)``: the share of the gap PTQ left that QAT recovers
(the issue's target is at least one half, within 30 minutes of CPU training); the PTQ row's is
against RTN as in ``bench ptq``.
"""

from __future__ import annotations

import tempfile
import time

from cascade.bench.context import run_context
from cascade.bench.ptq import float_model
from cascade.console import format_table, plural
from cascade.models import Model, load_model, split_documents, tokenize_documents, weight_bytes
from cascade.models.calibration import calibration_tokens
from cascade.models.evaluation import fidelity
from cascade.models.quantize import quantize_with_method


def run(model: "str | Model", calib: str, train: str, data: str, *, spec: str = "int3-g32", method: str = "gptq",
        steps: int = 500, lr: float = 1e-4, batch_size: int = 8, seq_len: int = 256, samples: int = 128,
        length: int = 512, seed: int = 0, limit: int | None = 200, ctx: int = 512, max_tokens: int | None = None,
        tokenizer: str | None = None, run_dir: str | None = None, learn_clip: bool = False, clip_rate: float = 1.0,
        distill: bool = False, progress=None, on_row=None) -> dict:
    """The result (module docs); ``run_dir`` keeps the QAT run (default: a temporary directory);
    ``learn_clip``: QAT also learns each group's clipping range (:mod:`cascade.models.qat`);
    ``distill``: QAT's loss is the KL divergence from the float model (the teacher)."""
    from cascade.models import qat as qat_mod
    from cascade.models.training import TrainConfig, read_documents

    base = float_model(model if isinstance(model, Model) else load_model(model, tokenizer=tokenizer))
    cfg = base.config
    length, ctx, seq_len = min(length, cfg.max_seq_len), min(ctx, cfg.max_seq_len), min(seq_len, cfg.max_seq_len - 1)
    cal = calibration_tokens(base.tokenizer, calib, samples=samples, length=length, seed=seed, max_len=cfg.max_seq_len)
    with open(data, encoding="utf-8") as f:
        docs = tokenize_documents(base.tokenizer, split_documents(f.read())[:limit])
    train_tokens = qat_mod.token_stream(base.tokenizer, read_documents([train]))
    tc = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=steps // 10, seed=seed,
                     eval_every=steps, ckpt_every=steps, log_every=max(1, min(10, steps)), weight_decay=0.0)
    rows: list[dict] = []
    float_ppl = None

    def result(partial: bool) -> dict:
        by = {r["stage"]: r["ppl"] for r in rows}
        for r in rows:
            start = by.get("rtn") if r["stage"] == "ptq" else by.get("ptq") if r["stage"] == "qat" else None
            r["gap_closed"] = (None if start is None or float_ppl is None or start <= float_ppl
                               else (start - r["ppl"]) / (start - float_ppl))
        return {"benchmark": "qat", **run_context(), "model": base.source, "float_ppl": float_ppl,
                "float_weight_bytes": weight_bytes(base.params), "spec": spec, "method": method,
                "calibration": cal.recipe, "train": {"file": train, "tokens": int(train_tokens.size), **tc.to_dict(), "learn_clip": learn_clip,
                          **({"clip_rate": clip_rate} if learn_clip else {}), "distill": distill},
                "data": data, "documents": len(docs), "ctx": ctx, "max_tokens": max_tokens,
                **({"partial": True} if partial else {}), "rows": rows}

    def score(stage: str, quantized: Model, seconds: float, **extra):
        nonlocal float_ppl
        fid = fidelity(quantized.params, cfg, base.params, cfg, docs, ctx=ctx, max_tokens=max_tokens, progress=progress)
        float_ppl = fid.ref_ppl
        rows.append({"stage": stage, "method": quantized.ptq["method"], "spec": spec, "ppl": fid.ppl,
                     "delta_ppl": fid.delta_ppl, "kld_mean": fid.kld_mean, "kld_p99": fid.kld_p99,
                     "top1_agreement": fid.top1_agreement, "weight_bytes": weight_bytes(quantized.params),
                     "seconds": seconds, "tokens": fid.tokens, **extra})
        if on_row is not None:
            on_row(result(partial=True))

    for stage, m in (("rtn", "rtn"), ("ptq", method)):
        t0 = time.perf_counter()
        quantized, _ = quantize_with_method(base, spec, method=m, calib=cal, progress=progress)
        score(stage, quantized, time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(prefix="cascade-bench-qat-") as tmp:
        trained, res, _ = qat_mod.qat(quantized, tc, train_tokens, run_dir or tmp, progress=progress is not False,
                                     learn_clip=learn_clip, clip_rate=clip_rate, teacher=base if distill else None)
        score("qat", trained, res.elapsed_s, steps=res.step, train_tokens=res.step * tc.batch_size * tc.seq_len,
              last_loss=res.losses[-1] if res.losses else None)
    return result(partial=False)


def table(result: dict) -> str:
    head = (f"{result['model']}: float perplexity {result['float_ppl']:.4f} on {result['data']} (ctx {result['ctx']}); "
            f"{result['spec']}, PTQ {result['method']}, QAT {plural(result['train']['steps'], 'step')} x "
            f"{result['train']['batch_size']} x {result['train']['seq_len']} tokens at lr {result['train']['lr']:g}"
            + (f", learned clipping (rate {result['train'].get('clip_rate', 1):g})" if result["train"].get("learn_clip") else "")
            + (", distilled from the float model" if result["train"].get("distill") else ""))
    rows = [(r["stage"], r["method"], f"{r['ppl']:.3f}", f"{r['delta_ppl']:+.3f}", f"{r['kld_mean']:.4f}",
             f"{r['top1_agreement']:.1%}", "" if r["gap_closed"] is None else f"{r['gap_closed']:.0%}", f"{r['seconds']:.1f}")
            for r in result["rows"]]
    return head + "\n" + format_table(rows, ("stage", "method", "ppl", "Δppl", "KLD", "top-1", "gap closed", "seconds"),
                                       align="<<>>>>>>")
