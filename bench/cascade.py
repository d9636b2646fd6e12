"""The router's modes side by side on one pair: speed, quality and cost, in one run.

    python -m cascade.bench.cascade [--small default-small --large default-large] [--tokens 64]
        [--repeats 3] [--out bench/results/cascade-default-pair.json] [--png bench/results/cascade-default-pair.png]

Rows (greedy unless ``--temperature``): ``large`` alone, ``speculative`` (exact, ``--draft-len`` and
``auto``: adaptive drafting; ``acceptance_at``: the acceptance rate at each draft position),
``spec-cascade`` (Chow's rule at several ``alpha``) and ``defer`` (mean log-probability at several
thresholds), each over the same prompts, one prompt at a time.  Per row: decode tokens/s (all
generated tokens over all wall time, prefill included, median of ``--repeats`` runs after a
warm-up run), large-model calls per generated token (rounds in the speculative modes, one per token
for the large model, the deferred answers' tokens in ``defer``), and quality: the perplexity of the
generated text under the large model in float32 (lower is better), and agreement with the large
model's own greedy output (the fraction of tokens before the first divergence, averaged over
prompts).  Then batch throughput: ``large`` and ``speculative`` on 1, 4, 8 and 16 rows at once.  A PNG
plots the cost-quality curve (x: large-model calls per token, y: perplexity under the large model).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

from cascade.console import format_table, plural, progress_bar

PROMPTS = ("Once upon a time", "Tom and Lily went to the park. They", "The little red bird was sad because",
           "One day, a boy named Max found a box.", "The cat and the dog were friends.", "Sara wanted to bake a cake,",
           "In the forest there lived a small bear.", "Mom said it was time for bed, but")

# user turns for a chat pair (--pair smollm2: each goes through the chat template): stories, as
# the draft was distilled on, and a few everyday questions it was not
CHAT_PROMPTS = ("Write a short story about a cat who wants to fly.", "Tell me a story about a brave little girl.",
                "Write a story for children about a lost teddy bear.", "Tell me a bedtime story about the moon.",
                "What is the capital of France?", "Give me three tips for staying healthy.",
                "Explain what a rainbow is to a five-year-old.", "Write a short poem about the sea.")


def pair_setup(pair: str | None, small: str, large: str, small_quant: str | None, large_quant: str | None):
    """``(small, large, small_quant, large_quant, chat, prompts)`` of a bench: a named pair
    (:data:`cascade.pair.PAIRS`) picks both models, the chat template and :data:`CHAT_PROMPTS`; quants
    None are the run's defaults (int4 / int8 for a float model, a quantized model as stored)."""
    from cascade.pair import PAIRS, resolve_quant

    chat = False
    if pair is not None:
        preset = PAIRS[pair]
        small, large, chat = preset.small, preset.large, preset.chat
    small_quant = resolve_quant(small, small_quant, "small")
    large_quant = resolve_quant(large, large_quant, "large")
    return small, large, small_quant, large_quant, chat, CHAT_PROMPTS if chat else PROMPTS


def _configs(alphas, thresholds, draft_len):
    yield {"mode": "large"}
    yield {"mode": "speculative", "draft_len": draft_len}
    yield {"mode": "speculative", "draft_len": "auto"}
    for a in alphas:
        yield {"mode": "spec-cascade", "draft_len": draft_len, "rule": "chow", "alpha": a}
    for t in thresholds:
        yield {"mode": "defer", "defer_score": "mean-logprob", "threshold": t}


def _text_ppl(params, cfg, prompt_ids, tokens) -> float:
    from cascade.models.decoder import logits_of
    import jax

    logits = np.asarray(logits_of(params, cfg, [list(prompt_ids) + list(tokens)])[0], np.float64)
    rows = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(tokens)]
    logp = np.asarray(jax.nn.log_softmax(rows, axis=-1))
    return float(-logp[np.arange(len(tokens)), tokens].mean())


def acceptance_at(stats) -> list[float | None]:
    """Per draft position ``i``: the share of rounds that offered proposal ``i`` in which it was
    accepted, pooled over several generations' :class:`cascade.speculative.SpeculativeStats`
    (None where no round offered it: adaptive drafting may never reach its longest drafts)."""
    n = max((len(s.offered_at) for s in stats), default=0)
    accepted, offered = [0] * n, [0] * n
    for s in stats:
        for i, (a, o) in enumerate(zip(s.accepted_at, s.offered_at)):
            accepted[i] += a
            offered[i] += o
    return [round(a / o, 4) if o else None for a, o in zip(accepted, offered)]


def run(small: str = "default-small", large: str = "default-large", *, tokens: int = 64, repeats: int = 3,
        draft_len: int = 4, alphas=(0.1, 0.2, 0.3, 0.5), thresholds=(-0.6, -0.8, -1.0), batches=(1, 4, 8, 16),
        temperature: float = 0.0, n_prompts: int | None = None, progress=None, pair: str | None = None,
        small_quant: str | None = None, large_quant: str | None = None) -> dict:
    """The result (module docs); ``n_prompts``: the first that many of :data:`PROMPTS` (default all).
    ``pair``: a named pair instead of ``small``/``large`` (:func:`pair_setup`).  ``small_quant``/
    ``large_quant`` None: as ``cascade run`` defaults them (int4 / int8 for a float model, a
    quantized one as stored).  ``progress``: False hides the progress display (:func:`cascade.console.progress_bar`)."""
    from cascade.bench.context import run_context
    from cascade.models import SamplingConfig, load_model
    from cascade.models.generation import first_divergence
    from cascade.pair import generate_batch as generate_many, load_pair, run as run_one

    small, large, small_quant, large_quant, chat, all_prompts = pair_setup(pair, small, large, small_quant, large_quant)
    loaded = load_pair(small, large, small_quant=small_quant, large_quant=large_quant)
    ref = load_model(large)  # the model that judges quality (float, or as stored when it is quantized)
    sampling = SamplingConfig(temperature=temperature, seed=0)
    prompts = list(all_prompts[:n_prompts])

    def run_pair(p, **kw):  # the pair and its template bound
        return run_one(loaded, p, chat=chat, **kw)

    def generate_batch(ps, **kw):
        return generate_many(loaded, ps, chat=chat, **kw)
    want = {p: run_pair(p, mode="large", max_new_tokens=tokens).token_ids for p in prompts}
    rows = []
    configs = list(_configs(alphas, thresholds, draft_len))
    bar = progress_bar(total=len(configs) + 2 * len(batches), desc="bench cascade", unit="config", enabled=progress)
    for config in configs:
        for p in prompts:  # warm-up: every shape compiled before timing
            run_pair(p, max_new_tokens=tokens, sampling=sampling, **config)
        speeds, last = [], None
        for _ in range(repeats):
            t0, n, results = time.perf_counter(), 0, []
            for p in prompts:
                r = run_pair(p, max_new_tokens=tokens, sampling=sampling, **config)
                n += len(r.token_ids)
                results.append(r)
            speeds.append(n / (time.perf_counter() - t0))
            last = results
        n_tokens = sum(len(r.token_ids) for r in last)
        if config["mode"] == "large":
            calls = n_tokens
        elif config["mode"] == "defer":
            calls = sum(len(r.token_ids) for r in last if r.answered_by == "large")
        else:
            calls = sum(r.stats.rounds + 1 for r in last)  # + the prefill's call
        agree = []
        for r in last:
            d = first_divergence(r.token_ids, want[r.prompt])
            agree.append(1.0 if d is None else d / max(len(want[r.prompt]), 1))
        nll = statistics.mean(_text_ppl(ref.params, ref.config, r.prompt_token_ids, r.token_ids) for r in last)
        row = {**config, "tokens_per_s": round(statistics.median(speeds), 1), "tokens": n_tokens,
               "large_calls_per_token": round(calls / n_tokens, 4), "ppl_under_large": round(math.exp(nll), 4),
               "agreement": round(statistics.mean(agree), 4)}
        if config["mode"] in ("speculative", "spec-cascade"):
            row["acceptance_rate"] = round(sum(r.stats.accepted_tokens for r in last)
                                           / max(sum(r.stats.draft_tokens for r in last), 1), 4)
            row["acceptance_at"] = acceptance_at([r.stats for r in last])
        if config["mode"] == "spec-cascade":
            row["deferral_rate"] = round(sum(r.stats.deferred_tokens for r in last)
                                         / max(sum(r.stats.judged_tokens for r in last), 1), 4)
        if config["mode"] == "defer":
            row["deferred_prompts"] = sum(r.answered_by == "large" for r in last)
        rows.append(row)
        bar.update()
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_large"] = round(row["tokens_per_s"] / base, 3)
    batch_rows = []
    for mode in ("large", "speculative"):
        for b in batches:
            batch_prompts = [prompts[i % len(prompts)] for i in range(b)]
            generate_batch(batch_prompts, mode=mode, max_new_tokens=tokens, draft_len=draft_len)  # warm-up
            speeds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = generate_batch(batch_prompts, mode=mode, max_new_tokens=tokens, draft_len=draft_len)
                speeds.append(sum(len(r.token_ids) for r in out) / (time.perf_counter() - t0))
            batch_rows.append({"mode": mode, "batch": b, "tokens_per_s": round(statistics.median(speeds), 1)})
            bar.update()
    bar.close()
    for row in batch_rows:
        one = next(r for r in batch_rows if r["mode"] == row["mode"] and r["batch"] == 1)["tokens_per_s"]
        row["vs_batch_1"] = round(row["tokens_per_s"] / one, 3)
    return {"benchmark": "cascade", **run_context(repeats=repeats, warmup=1), "small": small, "large": large,
            "weights": {"small": small_quant, "large": large_quant}, "pair": pair, "chat_template": chat,
            "tokens": tokens, "temperature": temperature,
            "prompts": len(prompts), "rows": rows, "batch_rows": batch_rows}


def table(result: dict) -> str:
    w = result.get("weights") or {"small": "int4", "large": "int8"}
    head = (f"{result['small']} {w['small']} -> {result['large']} {w['large']}, {plural(result['prompts'], 'prompt')} x "
            f"{plural(result['tokens'], 'token')}, temperature {result['temperature']}")
    rows = []
    for r in result["rows"]:
        setting = (f"alpha {r['alpha']}" if r["mode"] == "spec-cascade" else f"thr {r['threshold']}" if r["mode"] == "defer"
                   else f"k {r['draft_len']}" if r["mode"] == "speculative" else "")
        acc = f"{r['acceptance_rate']:.0%}" if "acceptance_rate" in r else ""
        dfr = (f"{r['deferral_rate']:.0%}" if "deferral_rate" in r else
               f"{r['deferred_prompts']}/{result['prompts']}" if "deferred_prompts" in r else "")
        rows.append((r["mode"], setting, f"{r['tokens_per_s']:.1f}", f"{r['vs_large']:.2f}x",
                     f"{r['large_calls_per_token']:.3f}", f"{r['ppl_under_large']:.3f}", f"{r['agreement']:.0%}", acc, dfr))
    batch = [(r["mode"], r["batch"], f"{r['tokens_per_s']:.1f}", f"{r['vs_batch_1']:.2f}x") for r in result["batch_rows"]]
    return "\n".join([head, format_table(rows, ("mode", "setting", "tok/s", "vs large", "calls/tok", "ppl (large)", "agree",
                                                "accept", "deferred"), align="<<>>>>>>>"),
                      "", format_table(batch, ("mode", "batch", "tok/s", "vs batch 1"))])


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, marker in (("large", "s"), ("speculative", "D"), ("spec-cascade", "o"), ("defer", "^")):
        rs = [r for r in result["rows"] if r["mode"] == mode]
        ax.plot([r["large_calls_per_token"] for r in rs], [r["ppl_under_large"] for r in rs], marker=marker,
                linestyle="-" if len(rs) > 1 else "", label=mode)
        for r in rs:
            label = (f"a={r['alpha']}" if mode == "spec-cascade" else f"t={r['threshold']}" if mode == "defer" else "")
            if label:
                ax.annotate(label, (r["large_calls_per_token"], r["ppl_under_large"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("large-model calls per generated token (cost)")
    ax.set_ylabel("perplexity of the output under the large float model")
    w = result.get("weights") or {"small": "int4", "large": "int8"}
    ax.set_title(f"{result['small']} {w['small']} / {result['large']} {w['large']}: cost vs quality")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", default="default-small")
    ap.add_argument("--large", default="default-large")
    ap.add_argument("--pair", choices=["default", "smollm2"], help="a named pair (instead of --small/--large)")
    ap.add_argument("--prompts", type=int, help="the first N prompts [all 8]")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--out")
    ap.add_argument("--png")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = run(args.small, args.large, tokens=args.tokens, repeats=args.repeats, draft_len=args.draft_len,
                 temperature=args.temperature, pair=args.pair, n_prompts=args.prompts)
    print(json.dumps(result, indent=2) if args.json else table(result))
    if args.out:
        from cascade.models.files import write_json

        write_json(args.out, result)
    if args.png:
        plot(result, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
