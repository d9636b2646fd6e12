"""Check tensor parallelism across processes: the multi-host path, on one machine or several.

    python scripts/multihost_check.py [--processes 2] [--devices-per-process 2] [--port 12355]

launches ``--processes`` copies of itself on this machine, each with ``--devices-per-process``
CPU devices, joined by :func:`cascade.models.sharding.initialize_distributed` through the standard
environment (``JAX_COORDINATOR_ADDRESS=localhost:PORT``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
Every process builds the same tiny grouped-query model, computes its logits on its own first
device (the reference), then places the model over a mesh of *all* processes' devices (tp = their
total) and computes the logits and a greedy generation again, for float and int4-g16 weights.
The launcher prints one JSON object (every process's results) and exits 0 when every process
matched its reference (logits within 1e-5, the same tokens), 1 otherwise.

On real hosts, run the worker on each host yourself with the three variables set (process 0's
address as the coordinator) and ``--worker``: ``JAX_COORDINATOR_ADDRESS=host0:12355
JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<i> python scripts/multihost_check.py --worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def worker() -> dict:
    import jax  # noqa: F401 - after the environment is set

    from cascade.models import sharding

    info = sharding.initialize_distributed()
    import numpy as np
    from jax.experimental import multihost_utils

    from cascade.models.config import ModelConfig
    from cascade.models.decoder import logits_of
    from cascade.models.generation import generate
    from cascade.models.llama import init_params
    from cascade.models.model import Model
    from cascade.models.quantize import quantize_model

    cfg = ModelConfig(vocab_size=128, dim=64, hidden_dim=128, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                      max_seq_len=64, tie_embeddings=False)
    tp = jax.device_count()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    runs = []
    with jax.default_device(jax.local_devices()[0]):  # the reference: this process alone, one device
        base = Model(config=cfg, params=init_params(cfg, jax.random.key(0)), source="tiny")
        models = {"float": base, "int4-g16": quantize_model(base, "int4-g16", progress=False)[0]}
        refs = {}
        for name, m in models.items():
            params = jax.tree.map(np.asarray, m.params)
            refs[name] = (params, np.asarray(logits_of(params, cfg, tokens)),
                          generate(params, cfg, [[1, 2, 3]], max_new_tokens=8).tokens[0])
    for name, (params, ref_logits, ref_tokens) in refs.items():
        placed = sharding.shard_params(params, cfg, sharding.make_mesh(tp))
        logits = np.asarray(multihost_utils.process_allgather(logits_of(placed, cfg, tokens), tiled=True))
        out = generate(placed, cfg, [[1, 2, 3]], max_new_tokens=8).tokens[0]
        runs.append({"weights": name, "tp": tp, "max_logit_diff": float(np.abs(logits - ref_logits).max()),
                     "tokens_equal": out == ref_tokens, "local_bytes": sum(sharding.bytes_per_device(placed).values())})
    # loading at scale: each process reads only its devices' slices of a Hugging Face checkpoint
    import tempfile

    from cascade.models import load_model
    from cascade.models.export import save_hf
    from cascade.models.loaders import hf

    with tempfile.TemporaryDirectory(prefix=f"multihost-{info['process_index']}-") as tmp:
        params, ref_logits, ref_tokens = refs["float"]
        save_hf(params, cfg, os.path.join(tmp, "hf"))
        before = hf.READ_BYTES["sharded"]
        loaded = load_model(os.path.join(tmp, "hf"), mesh=sharding.make_mesh(tp))
        logits = np.asarray(multihost_utils.process_allgather(logits_of(loaded.params, cfg, tokens), tiled=True))
        runs.append({"weights": "float, loaded sharded", "tp": tp, "max_logit_diff": float(np.abs(logits - ref_logits).max()),
                     "tokens_equal": generate(loaded.params, cfg, [[1, 2, 3]], max_new_tokens=8).tokens[0] == ref_tokens,
                     "read_bytes": hf.READ_BYTES["sharded"] - before,
                     "model_bytes": int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(params)))})
    return {**info, "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/multihost_check.py", description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=2)
    ap.add_argument("--port", type=int, default=12355)
    ap.add_argument("--timeout", type=float, default=600, help="seconds before the processes are stopped")
    ap.add_argument("--worker", action="store_true", help="run one process (the environment says which)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker()), flush=True)
        return 0
    if args.processes < 1 or args.devices_per_process < 1:
        print("error: --processes and --devices-per-process must be >= 1", file=sys.stderr)
        return 2
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{args.port}", "JAX_NUM_PROCESSES": str(args.processes),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process}", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "JAX_PROCESS_ID": str(i)})
             for i in range(args.processes)]
    results, ok = [], True
    for i, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            print(f"error: process {i} did not finish in {args.timeout:.0f} s", file=sys.stderr)
            return 1
        if p.returncode != 0:
            print(f"error: process {i} failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}",
                  file=sys.stderr)
            ok = False
            continue
        results.append(json.loads(out.strip().splitlines()[-1]))
    ok = ok and all(r["max_logit_diff"] <= 1e-5 and r["tokens_equal"] for res in results for r in res["runs"])
    print(json.dumps({"processes": args.processes, "devices_per_process": args.devices_per_process, "ok": ok,
                      "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
