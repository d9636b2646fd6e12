"""Score token ids and continue prompts with llama.cpp (run by `cascade bench export`).

Runs under the Python of the separate virtual environment that has ``llama-cpp-python``
(``bench/llamacpp_venv.sh``); it imports nothing from cascade.  Reads one JSON object from the file
named by ``--job``, writes one JSON object on stdout:

    job:    {"docs": [[ids]], "prompts": [[ids]], "tokens": N, "texts": [str], "ctx": C, "kv": "f16" | "f32",
             "quantize": null | {"out": PATH, "type": "Q4_0"}}
    result: {"nll": sum, "count": n, "continuations": [[ids]], "tokenized": [[ids]], "version": ...,
             "quantized": PATH | null}

* ``docs``: each document's ids (BOS first where the model uses one), scored as cascade's
  perplexity does (truncated to ``ctx``; every token after the first predicted from the ones
  before it, natural-log likelihood summed over documents);
* ``prompts``: greedy continuations of ``tokens`` tokens (the argmax of the logits, end of text
  not stopping it, the same rule as cascade's side);
* ``texts``: llama.cpp's own tokenization of each text (no BOS, special tokens parsed), to compare
  the exported tokenizer with cascade's;
* ``quantize``: first let llama.cpp quantize the model to that type (``llama_model_quantize``, its
  default recipe) and run everything on the result.
"""

import argparse
import ctypes
import json
import sys

import numpy as np


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def quantize(llama_cpp, src, out, type_name):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--job", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with open(args.job, encoding="utf-8") as f:
        job = json.load(f)

    import llama_cpp

    path = args.model
    if job.get("quantize"):
        path = quantize(llama_cpp, path, job["quantize"]["out"], job["quantize"]["type"])
    ctx = int(job.get("ctx", 512))
    kv = {"f32": 0, "f16": 1}[job.get("kv", "f16")]  # llama.cpp's KV cache type (GGML_TYPE_F32 / F16; its default f16)
    llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, logits_all=True, verbose=False, seed=0, type_k=kv, type_v=kv)
    nll, count = 0.0, 0
    for doc in job.get("docs", []):
        ids = doc[:ctx]
        if len(ids) < 2:
            continue
        llm.reset()
        llm.eval(ids)
        logp = log_softmax(np.asarray(llm.scores[: len(ids) - 1]))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    continuations = []
    for prompt in job.get("prompts", []):
        llm.reset()
        llm.eval(prompt)
        out = []
        for _ in range(int(job.get("tokens", 32))):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
            llm.eval([tok])
        continuations.append(out)
    tokenized = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in job.get("texts", [])]
    json.dump({"nll": nll, "count": count, "continuations": continuations, "tokenized": tokenized,
               "version": llama_cpp.__version__, "quantized": path if job.get("quantize") else None}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
