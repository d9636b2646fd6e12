"""Time llama.cpp's batch-1 greedy decode of a GGUF file (run by `cascade bench decode --llamacpp`).

Runs under the Python of a separate virtual environment that has ``llama-cpp-python`` (built from
its source distribution by ``bench/llamacpp_venv.sh``); it imports nothing from cascade.  Prints
one JSON object: ``{"tokens_per_s": [...] per repeat, "version", "threads", "tokens", "prompt_tokens"}``.

    python llamacpp_decode.py MODEL.gguf --prompt TEXT --tokens 64 --threads 2 --repeats 3 --warmup 1

A run evaluates the prompt, then decodes ``--tokens`` tokens one at a time (greedy argmax of the
last logits, end-of-text ignored, as cascade's side does), timing only the decode steps after the
first, the same definition as cascade's ``tokens_per_s``.
"""

import argparse
import json
import sys
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()

    import llama_cpp

    llm = llama_cpp.Llama(model_path=args.model, n_ctx=512, n_batch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False, seed=0)
    prompt = llm.tokenize(args.prompt.encode("utf-8"), add_bos=True)
    rates = []
    for i in range(args.warmup + args.repeats):
        llm.reset()
        llm.eval(prompt)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])  # the first decode step, untimed (as on cascade's side)
        t0 = time.perf_counter()
        for _ in range(args.tokens - 2):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            rates.append((args.tokens - 2) / dt)
    json.dump({"tokens_per_s": rates, "version": llama_cpp.__version__, "threads": args.threads,
               "tokens": args.tokens, "prompt_tokens": len(prompt)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
