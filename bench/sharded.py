"""Decode speed of one quantized model over a tensor-parallel mesh: the native kernels per shard
(``jax.shard_map``) against the same kernels gathered, the XLA reference partitioned, and one device.

    python -m cascade.bench.sharded [--model default-large] [--quant int4-g32] [--tp 2] [--kv fp32]
        [--tokens 64] [--repeats 3] [--out bench/results/sharded-default-large.json] [--json]

On CPU the mesh's devices are forced (``XLA_FLAGS=--xla_force_host_platform_device_count``, set
here before JAX starts) and share the machine's cores, so this measures what each layout costs in
work and communication on the same cores, not a multi-chip speed-up.  Rows (greedy, end-of-text
ignored, the same prompt; each row's tokens are checked equal to one device's):

* ``one device``: the model unsharded, the native kernels;
* ``tp=N per shard``: parameters and KV cache split (Megatron layout), each device's kernels on
  its own slice, row-parallel partial sums added (what ``--mesh tp=N`` runs);
* ``tp=N gathered``: the same placement, the kernels on whole weights (XLA gathers the operands of
  a custom call onto every device, which then each do all the work): the layout before the
  per-shard kernels (:func:`cascade.quant.dequant_matmul.whole_weights`);
* ``tp=N xla``: the same placement with ``CASCADE_MATMUL_BACKEND=xla`` and
  ``CASCADE_ATTENTION_BACKEND=xla``: the XLA reference, which XLA's SPMD partitioner splits itself.

Tokens/s: decode steps after the first per second, median of ``--repeats`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

PROMPT = "Once upon a time"


def _force_devices(n: int) -> None:
    if "jax" in sys.modules:
        import jax

        if jax.device_count() < n:
            raise SystemExit(f"JAX already started with {jax.device_count()} devices; run this as its own process")
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(model: str = "default-large", *, quant: str = "int4-g32", tp: int = 2, kv: str = "fp32", tokens: int = 64,
        repeats: int = 3) -> dict:
    _force_devices(tp)
    import jax

    from cascade.bench.context import run_context
    from cascade.models import load_model, quantize_model, sharding
    from cascade.models.generation import generate
    from cascade.quant.dequant_matmul import whole_weights

    m = quantize_model(load_model(model), quant, progress=False)[0] if quant != "source" else load_model(model)
    ids = m.tokenizer.encode(PROMPT)
    mesh = sharding.make_mesh(tp)
    sharded = sharding.shard_params(m.params, m.config, mesh)

    rows_spec = [("one device", m.params, contextlib.nullcontext),
                 (f"tp={tp} per shard", sharded, contextlib.nullcontext),
                 (f"tp={tp} gathered", sharded, whole_weights),
                 (f"tp={tp} xla", sharded, lambda: _env(CASCADE_MATMUL_BACKEND="xla", CASCADE_ATTENTION_BACKEND="xla"))]
    rows, want = [], None
    for name, params, ctx in rows_spec:
        jax.clear_caches()  # whole_weights and the backend variables act at trace time: trace each row afresh
        with ctx():
            out = generate(params, m.config, [ids], max_new_tokens=tokens, eos_ids=(), kv=kv)  # warm-up, compiles
            rates = []
            for _ in range(repeats):
                out = generate(params, m.config, [ids], max_new_tokens=tokens, eos_ids=(), kv=kv)
                rates.append(out.tokens_per_s)
        want = out.tokens[0] if want is None else want
        rows.append({"layout": name, "tokens_per_s": round(statistics.median(rates), 2),
                     "same_tokens": out.tokens[0] == want})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_one_device"] = round(r["tokens_per_s"] / base, 3)
    return {"bench": "sharded", "model": model, "quant": quant, "tp": tp, "kv": kv, "tokens": tokens,
            "repeats": repeats, "devices": [str(d) for d in jax.devices()[:tp]], "rows": rows,
            "context": run_context()}


def table(result: dict) -> str:
    from cascade.console import format_table

    head = (f"{result['model']} {result['quant']}, KV {result['kv']}, tp={result['tp']} over "
            f"{', '.join(result['devices'])}: {result['tokens']} tokens, median of {result['repeats']}")
    rows = [(r["layout"], f"{r['tokens_per_s']:.2f}", f"{r['vs_one_device']:.2f}x", r["same_tokens"]) for r in result["rows"]]
    return head + "\n" + format_table(rows, ("layout", "tok/s", "vs one", "same tokens"), align="<>><")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default-large")
    ap.add_argument("--quant", default="int4-g32", help="a precision spec, or 'source' for the model as loaded")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--kv", default="fp32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.tp < 2 or args.tokens < 3 or args.repeats < 1:
        ap.error("--tp must be at least 2, --tokens at least 3 and --repeats at least 1")
    result = run(args.model, quant=args.quant, tp=args.tp, kv=args.kv, tokens=args.tokens, repeats=args.repeats)
    print(json.dumps(result, indent=2) if args.json else table(result))
    if args.out:
        from cascade.models.files import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
