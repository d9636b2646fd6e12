"""The embedded default pair: validation perplexity against its model card, and the cascade's speed.

    python bench/default_pair.py [--data ../shared/data/text] [--json] [--out bench/results/default-pair.json]

1. Perplexity of ``default-small`` and ``default-large`` on ``tinystories_val.txt`` (as ``cascade
   eval`` computes it), float and RTN-quantized (small int4, large int8, the ``cascade run``
   defaults), each float value checked against ``models/defaults/training.json`` (within 1%).
2. ``cascade run`` speed, greedy, on a few prompts: speculative (small int4 drafts, large int8
   verifies) vs the large int8 model alone vs the small int4 alone; decode tokens/s as the median
   of 3 runs after a warm-up run, acceptance rate and accepted tokens per round.  All rows run in
   one process on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

from cascade.console import format_table
from cascade.pair import load_pair, run
from cascade.models import perplexity, quantize_model, split_documents, tokenize_documents, weight_bytes
from cascade.models.defaults import DEFAULT_LARGE, DEFAULT_SMALL, default_model_dir
from cascade.models.files import write_json

PROMPTS = ("Once upon a time", "Tom and Lily went to the park. They", "The little red bird was sad because")
QUANT = {DEFAULT_SMALL: "int4", DEFAULT_LARGE: "int8"}


def perplexity_rows(data_dir: str, tolerance: float = 0.01) -> list[dict]:
    from cascade.models import load_model

    with open(os.path.join(os.path.dirname(default_model_dir(DEFAULT_SMALL)), "training.json"), encoding="utf-8") as f:
        card = json.load(f)["models"]
    with open(os.path.join(data_dir, "tinystories_val.txt"), encoding="utf-8") as f:
        docs = split_documents(f.read())
    rows = []
    for name in (DEFAULT_SMALL, DEFAULT_LARGE):
        base = load_model(name)
        ids = tokenize_documents(base.tokenizer, docs)
        for spec in ("float32", QUANT[name]):
            m = base if spec == "float32" else quantize_model(base, spec, progress=False)[0]
            r = perplexity(m.params, m.config, ids, progress=False)
            row = {"model": name, "weights": spec, "ppl": round(r.ppl, 4), "tokens": r.tokens,
                   "weight_bytes": weight_bytes(m.params)}
            if spec == "float32":
                row["card_ppl"] = card[name]["val_perplexity"]
                row["matches_card"] = abs(r.ppl / row["card_ppl"] - 1) <= tolerance
            rows.append(row)
    return rows


def speed_rows(repeats: int = 3, max_new_tokens: int = 96, draft_len: int = 4) -> list[dict]:
    pair = load_pair(small_quant=QUANT[DEFAULT_SMALL], large_quant=QUANT[DEFAULT_LARGE])
    rows = []
    for mode in ("speculative", "large", "small"):
        speeds, acc, per_round, n_tokens = [], [], [], []
        for prompt in PROMPTS:
            run(pair, prompt, mode=mode, max_new_tokens=max_new_tokens, draft_len=draft_len)  # warm-up / compile
            for _ in range(repeats):
                r = run(pair, prompt, mode=mode, max_new_tokens=max_new_tokens, draft_len=draft_len)
                speeds.append(r.tokens_per_s)
                n_tokens.append(len(r.token_ids))
                if r.stats is not None:
                    acc.append(r.stats.acceptance_rate)
                    per_round.append(r.stats.mean_accepted_length)
        rows.append({"mode": mode, "tokens_per_s": round(statistics.median(speeds), 1),
                     "mean_tokens": round(statistics.mean(n_tokens), 1),
                     "acceptance_rate": round(statistics.mean(acc), 3) if acc else None,
                     "accepted_per_round": round(statistics.mean(per_round), 2) if per_round else None})
    large = next(r for r in rows if r["mode"] == "large")["tokens_per_s"]
    for r in rows:
        r["vs_large"] = round(r["tokens_per_s"] / large, 2)
    return rows


def format_tables(result: dict) -> str:
    ppl = [(r["model"], r["weights"], f"{r['ppl']:.4f}", f"{r['card_ppl']:.4f}" if "card_ppl" in r else "",
            ("yes" if r["matches_card"] else "NO") if "matches_card" in r else "", f"{r['weight_bytes']:,}")
           for r in result["perplexity"]]
    speed = [(r["mode"], f"{r['tokens_per_s']:.1f}", f"{r['vs_large']:.2f}x",
              "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}",
              "" if r["accepted_per_round"] is None else f"{r['accepted_per_round']:.2f}") for r in result["speed"]]
    return (format_table(ppl, ("model", "weights", "ppl", "card", "ok", "weight bytes"), align="<<>>>>") + "\n\n"
            + format_table(speed, ("mode", "tok/s", "vs large", "acceptance", "accepted/round")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("CASCADE_SHARED_DATA", "../shared/data") + "/text")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-ppl", action="store_true", help="speed only (e.g. to compare matmul backends)")
    args = ap.parse_args(argv)
    import jax

    from cascade.bench.context import run_context

    result = {"benchmark": "default-pair", **run_context(), "machine": f"{os.cpu_count()} cores {platform.machine()}",
              "backend": jax.default_backend(),
              "matmul_backend": os.environ.get("CASCADE_MATMUL_BACKEND") or "auto",
              "perplexity": [] if args.skip_ppl else perplexity_rows(args.data),
              "speed": [] if args.skip_speed else speed_rows()}
    print(json.dumps(result, indent=2) if args.json else format_tables(result))
    if args.out:
        write_json(args.out, result)
    return 0 if all(r.get("matches_card", True) for r in result["perplexity"]) else 1


if __name__ == "__main__":
    sys.exit(main())
