"""Run by tests/models/test_sharding.py in a subprocess with 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX starts, so not in
the test process).  Prints one JSON object: per (spec, tp) the largest logit difference from the
single-device model, whether greedy generation (through an int8 KV cache) and speculative
decoding give the single-device tokens, the bytes each device holds against the plan; and the
error of every tp that cannot split the model."""

import functools
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cascade.models import sharding  # noqa: E402
from cascade.models.config import ModelConfig  # noqa: E402
from cascade.models.decoder import logits_of, prefill, step  # noqa: E402
from cascade.models.kv_cache import KVCache  # noqa: E402
from cascade.models.generation import generate  # noqa: E402
from cascade.models.llama import init_params  # noqa: E402
from cascade.models.model import Model  # noqa: E402
from cascade.models.quantize import quantize_model  # noqa: E402
from cascade.speculative import speculative_generate  # noqa: E402

# 8 query heads over 4 KV heads (grouped-query attention), an untied head: every split kind occurs
CFG = ModelConfig(vocab_size=128, dim=64, hidden_dim=128, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                  max_seq_len=64, tie_embeddings=False)
PROMPT = [1, 2, 3]


def _prefill_and_step(params, cache):
    logits, cache = prefill(params, CFG, np.asarray([PROMPT + [5, 6]], np.int32), np.asarray([5], np.int32), cache)
    nxt = np.asarray(logits).reshape(1, -1).argmax(-1).astype(np.int32)
    logits2, _ = step(params, CFG, nxt, cache)
    return np.concatenate([np.asarray(logits).reshape(-1), np.asarray(logits2).reshape(-1)])


def _pair_on_own_devices(float_model) -> dict:
    """The large model (int4-g16) over devices 0-1, the small one (float) over 2-3 (split rounds)
    or copied onto 0-1 (one-call rounds): the tokens of each against one device, and the bytes
    each device holds against the per-device memory plan."""
    from cascade.memory import plan_memory
    from cascade.models import SamplingConfig
    from cascade.pair import ModelPair, place_pair
    from cascade.speculative import RULES

    large = quantize_model(float_model, "int4-g16", progress=False)[0]
    small = Model(config=CFG, params=init_params(CFG, jax.random.key(1)), source="small")  # a different draft
    pair = ModelPair(small=small, large=large)
    own, own_info = place_pair(pair, 2, small_devices=2)
    shared, _ = place_pair(pair, 2)
    out = {"own_devices": own_info["small_device_list"], "bytes": own_info["bytes_per_device"]}
    ref = generate(large.params, CFG, [PROMPT], max_new_tokens=10).tokens[0]
    hot = SamplingConfig(temperature=0.9, seed=3)
    runs = {}
    for name, placed in (("own", own), ("shared", shared), ("one", pair)):
        args = (placed.small.params, CFG, placed.large.params, CFG, PROMPT)
        runs[name] = {"greedy": speculative_generate(*args, max_new_tokens=10, draft_len=3).tokens,
                      "sampled": speculative_generate(*args, max_new_tokens=10, draft_len=3, sampling=hot).tokens,
                      "cascade": speculative_generate(*args, max_new_tokens=10, draft_len="auto", rule=RULES[0],
                                                      alpha=0.5).tokens}
    out["greedy_equal_large"] = runs["own"]["greedy"] == ref
    out["equal_shared"] = {k: runs["own"][k] == runs["shared"][k] for k in runs["own"]}
    out["equal_one_device"] = {k: runs["own"][k] == runs["one"][k] for k in runs["own"]}
    plan = plan_memory(pair, tp=2, small_devices=2, large_kv="int8", small_kv="fp32", ctx=48)
    by_role = {m.role: m for m in plan.models}
    out["planned_weights"] = {role: m.weight_bytes_per_device for role, m in by_role.items()}
    mesh_large, mesh_small = (sharding.make_mesh(2, jax.devices()[i:]) for i in (0, 2))
    out["kv"] = {}
    for role, mesh in (("large", mesh_large), ("small", mesh_small)):
        m = by_role[role]
        cache = sharding.shard_cache(KVCache.create(CFG, 1, m.kv_positions, m.kv, rewind=4 + 1), mesh)
        out["kv"][role] = {"planned": m.kv_bytes_per_device, "live": sharding.bytes_per_device(cache)}
    out["plan_groups"] = plan.device_groups
    return out


def _loading(float_model) -> dict:
    """A Hugging Face directory (float32 and bfloat16) and a quantized checkpoint read straight into
    the tp=4 layout: the same arrays, with the same shardings, as loading whole and placing; a tp
    the model cannot split is one error before any array is read."""
    import tempfile

    import jax.numpy as jnp

    from cascade.models import load_model, save_checkpoint
    from safetensors.numpy import save_file

    from cascade.models.export import hf_state_dict, save_hf

    mesh = sharding.make_mesh(4)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        quantized = quantize_model(float_model, "int4-g16", progress=False)[0]
        save_checkpoint(os.path.join(tmp, "ckpt"), quantized)
        save_hf(float_model.params, CFG, os.path.join(tmp, "hf32"))
        save_hf(float_model.params, CFG, os.path.join(tmp, "hf16"))  # then its weights in bfloat16, as HF stores most
        save_file(hf_state_dict(float_model.params, dtype=jnp.bfloat16), os.path.join(tmp, "hf16", "model.safetensors"))
        for name in ("hf32", "hf16", "ckpt"):
            path = os.path.join(tmp, name)
            whole = load_model(path)
            placed = sharding.shard_params(whole.params, CFG, mesh)
            direct = load_model(path, mesh=mesh)
            pairs = list(zip(jax.tree.leaves(direct.params), jax.tree.leaves(placed)))
            out[name] = {"leaves": len(pairs),
                         "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs),
                         "same_sharding": all(a.sharding == b.sharding for a, b in pairs),
                         "dtypes": sorted({str(a.dtype) for a, _ in pairs})}
        for name in ("hf32", "ckpt"):
            try:
                load_model(os.path.join(tmp, name), mesh=sharding.make_mesh(8))
                out[f"{name} tp8"] = None
            except ValueError as e:
                out[f"{name} tp8"] = str(e)
    return out


def _kernel_calls(hlo: str) -> dict:
    """The native matmul's result widths in a compiled program, and whether it gathers anything."""
    widths = sorted({int(m) for m in re.findall(r"f32\[\d+,(\d+)\]\{1,0\} custom-call\([^\n]*cascade_qmatmul", hlo)})
    return {"kernel_widths": widths, "all_gather": "all-gather" in hlo, "all_reduce": "all-reduce" in hlo}


def _per_shard_kernels(float_model) -> dict:
    """The native kernels under a tp=4 mesh, per shard (``jax.shard_map``): a column split of a
    (64, 128) weight, a row split, and a tied head's vocabulary split, each against the XLA
    reference on the whole weight, with the widths its kernel calls compute and whether XLA gathered
    the weight; the widths of a whole int4-g16 model's forward; and the cache attention kernel's
    heads per call in a decode step, with its logits against one device."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from cascade import quant
    from cascade.models.decoder import forward
    from cascade.quant.dequant_matmul import leaf_specs, xla_dequant_matmul, xla_dequant_matmul_t

    mesh = sharding.make_mesh(4)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(64, 128)), jnp.float32)
    out = {}
    for spec in ("int8", "int4-g16"):
        qw = quant.quantize(w, spec, axis=0)
        ref = np.asarray(xla_dequant_matmul(x, qw))
        for parallel, dim in (("column", 1), ("row", 0)):
            placed = jax.device_put(qw, jax.tree.map(lambda p: NamedSharding(mesh, p), leaf_specs(qw, dim)))
            fn = jax.jit(lambda x, w, parallel=parallel: quant.matmul(x, w, parallel=parallel))
            with sharding.on_mesh_of(placed):
                got = np.asarray(fn(x, placed))
                hlo = fn.lower(x, placed).compile().as_text()
            out[f"{spec} {parallel}"] = {"max_diff": float(np.abs(got - ref).max()), **_kernel_calls(hlo)}
    # the Pallas kernel (interpret mode on CPU, forced by the variable it needs there), per shard too
    xp = jnp.asarray(rng.normal(size=(3, 256)), jnp.float32)
    wp = jnp.asarray(rng.normal(size=(256, 512)), jnp.float32)
    os.environ["CASCADE_MATMUL_BACKEND"] = "pallas"
    try:
        for spec in ("int8", "int4-g32"):
            qw = quant.quantize(wp, spec, axis=0)
            ref = np.asarray(xla_dequant_matmul(xp, qw))
            for parallel, dim in (("column", 1), ("row", 0)):
                placed = jax.device_put(qw, jax.tree.map(lambda p: NamedSharding(mesh, p), leaf_specs(qw, dim)))
                fn = jax.jit(lambda x, w, parallel=parallel: quant.matmul(x, w, parallel=parallel))
                with sharding.on_mesh_of(placed):
                    got = np.asarray(fn(xp, placed))
                    hlo = fn.lower(xp, placed).compile().as_text()
                out[f"pallas {spec} {parallel}"] = {"rel_diff": float(np.abs(got - ref).max() / np.abs(ref).max()),
                                                    "all_gather": "all-gather" in hlo,
                                                    "all_reduce": "all-reduce" in hlo}
    finally:
        del os.environ["CASCADE_MATMUL_BACKEND"]
    table = quant.quantize(jnp.asarray(rng.normal(size=(128, 64)), jnp.float32), "int4-g16", axis=1)
    placed = jax.device_put(table, jax.tree.map(lambda p: NamedSharding(mesh, p), leaf_specs(table, 0)))
    fn = jax.jit(lambda x, w: quant.matmul_t(x, w, parallel="column"))
    with sharding.on_mesh_of(placed):
        got = np.asarray(fn(x, placed))
        hlo = fn.lower(x, placed).compile().as_text()
    out["int4-g16 tied head"] = {"max_diff": float(np.abs(got - np.asarray(xla_dequant_matmul_t(x, table))).max()),
                                 **_kernel_calls(hlo)}
    model = quantize_model(float_model, "int4-g16", progress=False)[0]
    sharded = sharding.shard_params(model.params, CFG, mesh)
    tokens = np.asarray([PROMPT], np.int32)
    with sharding.on_mesh_of(sharded):
        hlo = forward.lower(sharded, CFG, tokens, tokens * 0 + np.arange(3, dtype=np.int32)).compile().as_text()
    out["model"] = _kernel_calls(hlo)
    out["attention"] = {}
    for kv in ("fp32", "int8-g8", "int4-g8", "int8"):  # int8's value group (32 values) spans 4 heads: not split
        ref = _prefill_and_step(model.params, KVCache.create(CFG, 1, 32, kv))
        got = _prefill_and_step(sharded, sharding.shard_cache(KVCache.create(CFG, 1, 32, kv), mesh))
        cache = sharding.shard_cache(KVCache.create(CFG, 1, 32, kv), mesh)
        one = np.asarray([[5]], np.int32)
        with sharding.on_mesh_of(sharded):
            hlo = forward.lower(sharded, CFG, one, one * 0, cache, None, last_only=True).compile().as_text()
        heads = sorted({int(h) for h in re.findall(r"\(f32\[1,1,(\d+),8\][^\n]*custom-call\([^\n]*cascade_cache_attention", hlo)})
        out["attention"][kv] = {"max_diff": float(np.abs(got - ref).max()), "heads_per_call": heads,
                                "all_gather": "all-gather" in hlo}
    return out


def _quantized_cache() -> dict:
    """Perplexity through a KV cache (``eval --kv``) under tp against one device, and why a
    quantized cache's differs in the last digits.

    ``cache``: one layer's write-then-attend (``cached_attention``, the prefill path eval takes)
    with the same keys and values on one device and split over 4: whether the stored codes, scales
    and float16 window are equal, and the attention outputs' largest difference.  ``nll``: per KV
    precision and tp, the relative difference of stories260K's summed NLL over 4 windows of 128
    tokens (``_window_nll_cached``) from one device's."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from cascade.models import load_model, split_documents, tokenize_documents
    from cascade.models.evaluation import _window_nll_cached
    from cascade.models.kv_cache import LayerKV, cached_attention
    from cascade.quant.kv import parse_kv_spec

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.shared_data import DATA

    out = {"cache": {}, "nll": {}}
    rng = np.random.default_rng(7)
    b, t = 2, 48
    q = rng.normal(size=(b, t, CFG.n_heads, CFG.head_dim)).astype(np.float32)
    k = (rng.normal(size=(b, t, CFG.n_kv_heads, CFG.head_dim)) * 2
         + rng.normal(size=(1, 1, CFG.n_kv_heads, CFG.head_dim)) * 3).astype(np.float32)  # outlier channels
    v = rng.normal(size=(b, t, CFG.n_kv_heads, CFG.head_dim)).astype(np.float32)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    mesh = sharding.make_mesh(4)
    heads = NamedSharding(mesh, P(None, None, sharding.AXIS, None))

    @functools.partial(jax.jit, static_argnames=("spec",))
    def write_and_attend(q, k, v, cache, spec):
        layer = LayerKV(cache.k[0], cache.v[0], *(x[0] for x in (cache.k_recent, cache.v_recent) if x))
        return cached_attention(q, k, v, positions, layer, cache.lengths, np.full((b,), t, np.int32), spec, None)

    for kv in ("int4-g8", "int8", "int4"):
        spec = parse_kv_spec(kv)
        cache = KVCache.create(CFG, b, t, spec)
        ref, ref_layer = write_and_attend(q, k, v, cache, spec)
        with jax.set_mesh(mesh):
            got, got_layer = write_and_attend(*(jax.device_put(a, heads) for a in (q, k, v)),
                                              sharding.shard_cache(cache, mesh), spec)
        out["cache"][kv] = {"stored_equal": all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                                                zip(jax.tree.leaves(ref_layer), jax.tree.leaves(got_layer))),
                            "max_diff": float(np.abs(np.asarray(got) - np.asarray(ref)).max())}
    model = load_model(os.path.join(DATA, "stories260K", "stories260K.bin"))
    with open(os.path.join(DATA, "text", "tinystories_val.txt"), encoding="utf-8") as f:
        docs = tokenize_documents(model.tokenizer, split_documents(f.read())[:40])
    tokens = np.asarray([d[:128] for d in docs if len(d) >= 128][:4], np.int32)
    weights = np.ones(tokens.shape, np.float32)
    placed = {tp: sharding.shard_params(model.params, model.config, sharding.make_mesh(tp)) for tp in (2, 4)}
    for kv, tps in (("fp32", (4,)), ("int4-g8", (2, 4)), ("int4", (4,))):
        spec = parse_kv_spec(kv)
        one = float(_window_nll_cached(model.params, model.config, tokens, weights, spec)[0])
        out["nll"][kv] = {f"tp{tp}": abs(float(_window_nll_cached(placed[tp], model.config, tokens, weights, spec)[0])
                                         - one) / one for tp in tps}
    return out


def main() -> int:
    out = {"devices": jax.device_count(), "runs": [], "errors": {}}
    float_model = Model(config=CFG, params=init_params(CFG, jax.random.key(0)), source="tiny")
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16))
    for spec in ("float", "int4-g16"):
        model = float_model if spec == "float" else quantize_model(float_model, spec, progress=False)[0]
        ref_logits = np.asarray(logits_of(model.params, CFG, tokens))
        ref_tokens = generate(model.params, CFG, [PROMPT], max_new_tokens=8, kv="int8").tokens[0]
        for tp in (1, 2, 4):
            sharded = sharding.shard_params(model.params, CFG, sharding.make_mesh(tp))
            run = {"spec": spec, "tp": tp,
                   "max_logit_diff": float(np.abs(np.asarray(logits_of(sharded, CFG, tokens)) - ref_logits).max()),
                   "generate_equal": generate(sharded, CFG, [PROMPT], max_new_tokens=8, kv="int8").tokens[0] == ref_tokens,
                   "bytes": sharding.bytes_per_device(sharded),
                   "planned": sharding.planned_bytes_per_device(model.params, tp),
                   "split_q_proj": len(sharded["layers_0"]["attn"]["q_proj"]["kernel"].sharding.device_set) if spec == "float" else None}
            if tp == 4:  # the float draft on one device, the target over four
                spec_out = speculative_generate(float_model.params, CFG, sharded, CFG, PROMPT, max_new_tokens=8,
                                                draft_len=3)
                run["speculative_equal"] = spec_out.tokens == ref_tokens
            if tp == 4:  # a KV cache split by KV heads: prefill and one decode step as on one device
                mesh = sharding.make_mesh(tp)
                for kv in ("fp32", "int8"):
                    ref = _prefill_and_step(model.params, KVCache.create(CFG, 1, 32, kv))
                    cache = sharding.shard_cache(KVCache.create(CFG, 1, 32, kv), mesh)
                    placed = cache.k[0] if kv == "fp32" else cache.k[0].packed
                    got = _prefill_and_step(sharded, cache)
                    run[f"cache_{kv}_devices"] = len(placed.sharding.device_set)
                    run[f"cache_{kv}_max_diff"] = float(np.abs(got - ref).max())
            out["runs"].append(run)
    out["pair"] = _pair_on_own_devices(float_model)
    out["loading"] = _loading(float_model)
    out["per_shard"] = _per_shard_kernels(float_model)
    out["quantized_cache"] = _quantized_cache()
    quantized32 = quantize_model(float_model, "int4-g32", progress=False)[0]
    for name, params, tp in (("tp8", float_model.params, 8), ("tp3", float_model.params, 3),
                             ("int4-g32 tp4", quantized32.params, 4), ("tp16", float_model.params, 16)):
        try:
            sharding.shard_params(params, CFG, sharding.make_mesh(tp))
            out["errors"][name] = None
        except ValueError as e:
            out["errors"][name] = str(e)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
