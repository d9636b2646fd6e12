"""How far the draft should propose: fixed draft lengths against adaptive drafting, on one pair.

    python -m cascade.bench.drafting [--small default-small --large default-large]
        [--small-quant int4 --large-quant int8] [--tokens 64] [--prompts 8] [--repeats 3]
        [--out bench/results/drafting-default-pair.json] [--json]

Rows, greedy, exact speculative decoding (every row's output equals the large model's, checked):
the large and small models alone, fixed ``--draft-len`` 2, 3, 4 and 6, and adaptive drafting (up to
8 tokens, stopping after a token whose draft probability was below a confidence: 0.3, 0.5 (= ``auto``)
and 0.7).  Per row: tokens/s (all generated tokens over all wall time, prompts one at a time,
median of ``--repeats`` runs after a warm-up run), acceptance, proposals per round and large-model
calls per generated token.  A row with ``per_call`` runs that many decode steps or rounds per device
call (:func:`cascade.pair.stream_batch`); ``vs_large`` is against the large model alone with the same
``per_call``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

CONFIGS = ([{"mode": "large"}, {"mode": "small"}] + [{"mode": "speculative", "draft_len": k} for k in (2, 3, 4, 6)]
           + [{"mode": "speculative", "draft_len": 8, "draft_confidence": c} for c in (0.3, 0.5, 0.7)])


def run(small: str = "default-small", large: str = "default-large", *, small_quant: str | None = None,
        large_quant: str | None = None, tokens: int = 64, prompts: int = 8, repeats: int = 3,
        pair: str | None = None, temperature: float = 0.0, configs=None) -> dict:
    """The result (module docs).  ``pair``: a named pair (:func:`cascade.bench.cascade.pair_setup`:
    both models, the chat template and chat prompts; quants None: as ``cascade run`` defaults them).
    ``temperature`` above 0: sampled (seed 0), and ``exact`` is not checked (sampling is exact in
    distribution, not per token).  ``configs``: the rows to run (default :data:`CONFIGS`)."""
    from cascade.bench.cascade import pair_setup
    from cascade.bench.context import run_context
    from cascade.models import SamplingConfig
    from cascade.pair import load_pair, run as run_one

    small, large, small_quant, large_quant, chat, all_prompts = pair_setup(pair, small, large, small_quant, large_quant)
    loaded = load_pair(small, large, small_quant=small_quant, large_quant=large_quant)
    sampling = SamplingConfig(temperature=temperature, seed=0)

    def run_pair(p, **kw):  # the pair, its template and the sampling bound
        return run_one(loaded, p, chat=chat, sampling=sampling, **kw)

    texts = list(all_prompts[:prompts])
    want = {p: run_pair(p, mode="large", max_new_tokens=tokens).token_ids for p in texts}
    rows = []
    for config in configs or CONFIGS:
        for p in texts:  # warm-up: every shape compiled before timing
            run_pair(p, max_new_tokens=tokens, **config)
        speeds, results = [], []
        for _ in range(repeats):
            t0, n, results = time.perf_counter(), 0, []
            for p in texts:
                r = run_pair(p, max_new_tokens=tokens, **config)
                n += len(r.token_ids)
                results.append(r)
            speeds.append(n / (time.perf_counter() - t0))
        row = {**config, "tokens_per_s": round(statistics.median(speeds), 1), "tokens": n}
        if config["mode"] == "speculative":
            st = [r.stats for r in results]
            drafted, rounds = sum(s.draft_tokens for s in st), sum(s.rounds for s in st)
            row.update(acceptance=round(sum(s.accepted_tokens for s in st) / drafted, 4),
                       drafted_per_round=round(drafted / rounds, 3), large_calls_per_token=round(rounds / n, 4),
                       exact=all(r.token_ids == want[p] for r, p in zip(results, texts)) if not temperature else None)
        rows.append(row)
        print(f"  {_label(row)}: {row['tokens_per_s']} tok/s", file=sys.stderr, flush=True)
    for row in rows:  # against the large model alone with as many steps per device call
        base = next((r for r in rows if r["mode"] == "large" and r.get("per_call") == row.get("per_call")), rows[0])
        row["vs_large"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
    return {"benchmark": "drafting", **run_context(repeats=repeats, warmup=1), "small": small, "large": large,
            "small_quant": small_quant, "large_quant": large_quant, "pair": pair, "chat_template": chat,
            "temperature": temperature, "tokens": tokens, "prompts": texts, "rows": rows}


def _label(row: dict) -> str:
    calls = "" if row.get("per_call") is None else f", {row['per_call']} {'step' if row['mode'] != 'speculative' else 'round'}{'s' if row['per_call'] > 1 else ''} a call"
    if row["mode"] != "speculative":
        return f"{row['mode']} alone{calls}"
    if "draft_confidence" in row:
        return f"adaptive, up to {row['draft_len']}, confidence {row['draft_confidence']}{calls}"
    return f"fixed draft of {row['draft_len']}{calls}"


def table(result: dict) -> str:
    from cascade.bench.context import describe

    how = f"temperature {result['temperature']}" if result.get("temperature") else "greedy"
    lines = [f"drafting: {result['small']} {result['small_quant']} drafts for {result['large']} {result['large_quant']}, "
             f"{result['tokens']} tokens x {len(result['prompts'])} prompts"
             f"{' (chat template)' if result.get('chat_template') else ''}, {how}, {describe(result)}",
             "| drafting | tok/s | vs large | acceptance | proposals / round | large calls / token | exact |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        spec = r["mode"] == "speculative"
        lines.append(f"| {_label(r)} | {r['tokens_per_s']} | {r['vs_large']:.2f}x | "
                     f"{format(r['acceptance'], '.0%') if spec else ''} | {r['drafted_per_round'] if spec else ''} | "
                     f"{r['large_calls_per_token'] if spec else ''} | {_exact(r) if spec else ''} |")
    return "\n".join(lines)


def _exact(row) -> str:
    return "sampled" if row.get("exact") is None else "yes" if row["exact"] else "NO"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", default="default-small")
    ap.add_argument("--large", default="default-large")
    ap.add_argument("--small-quant", default="int4")
    ap.add_argument("--large-quant", default="int8")
    ap.add_argument("--pair", choices=["default", "smollm2"], help="a named pair (instead of --small/--large)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--draft-lens", help="comma-separated fixed draft lengths to run instead of the default rows")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    configs = None
    if args.draft_lens:
        configs = [{"mode": "large"}] + [{"mode": "speculative", "draft_len": int(k)} for k in args.draft_lens.split(",")]
    quants = (None, None) if args.pair else (args.small_quant, args.large_quant)
    result = run(args.small, args.large, small_quant=quants[0], large_quant=quants[1], tokens=args.tokens,
                 prompts=args.prompts, repeats=args.repeats, pair=args.pair, temperature=args.temperature,
                 configs=configs)
    print(json.dumps(result, indent=2) if args.json else table(result))
    if args.out:
        from cascade.models.files import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
