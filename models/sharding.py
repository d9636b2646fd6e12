"""Tensor parallelism over a device mesh: the Megatron layout for Llama-family parameters, float or
quantized, and KV caches sharded by KV heads.

A mesh has one axis, ``"tp"``, over ``tp`` devices (:func:`make_mesh`).  The layout (Shoeybi et
al. 2019), as :func:`param_partition` assigns it by parameter path:

* column-parallel (the output features split): ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``,
  ``up_proj`` and their biases: each device holds whole heads (``tp`` must divide ``n_heads`` and
  ``n_kv_heads``) and a slice of the MLP's hidden features;
* row-parallel (the input features split): ``o_proj``, ``down_proj``: each device multiplies its
  heads' / hidden slice and the partial sums are added across devices;
* vocabulary-parallel: the embedding table (rows) and an untied ``lm_head`` (columns);
* everything else (norms, the row-parallel layers' biases) replicated.

A :class:`cascade.quant.QuantizedTensor` is split the same way leaf by leaf: packed codes, scales
and zero points along the same axis.  A column split leaves every group whole.  A row split cuts
the reduction axis, so each device's slice must hold whole groups (and whole packed bytes: 2 int4
codes a byte, 8 int3 codes in 3 bytes); :func:`check_mesh` says which tensor and spec do not,
before anything is placed.  Per-channel scales (one group the whole reduction axis) are replicated
along a row split: each device reads its rows with the full scale vector.

:func:`shard_params` places the parameters with :class:`jax.sharding.NamedSharding`, and the
jitted model functions (:mod:`cascade.models.decoder`) run on them unchanged: XLA's SPMD
partitioner splits the plain XLA ops and inserts the collectives (the row-parallel all-reduce, the
vocabulary gathers).  The fast matmul kernels are custom calls XLA cannot split, so the model
functions trace under the parameters' mesh (:func:`on_mesh_of`, ``jax.set_mesh``) and each
linear layer names its role (``parallel="column"``/``"row"``): the kernel then runs per shard
inside ``jax.shard_map`` (:mod:`cascade.quant.dequant_matmul`), each device on its own slice.
"""

from __future__ import annotations

import contextlib
import functools
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cascade.models.config import ModelConfig
from cascade.quant import packing
from cascade.quant.dequant_matmul import TP_AXIS, leaf_specs
from cascade.quant.qtensor import QuantizedTensor
from cascade.quant.rtn import key_path_str

AXIS = TP_AXIS
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> dict:
    """Join a multi-process (multi-host) JAX run, before any other JAX call.

    The arguments default to the environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process
    0, which JAX itself also reads), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.  With none of
    them set, JAX's own cluster detection runs (Cloud TPU, SLURM, Open MPI, Kubernetes).  On CPU the
    processes' collectives go through Gloo.  After it, ``jax.devices()`` lists every process's
    devices, :func:`make_mesh` spans them, and each process places only its own shards.  Returns
    ``{"process_index", "process_count", "devices", "local_devices"}``."""
    import os

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
    given = [v is not None for v in (coordinator, num, pid)]
    if any(given) and not all(given):
        raise ValueError("a multi-process run needs all of JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES "
                         "and JAX_PROCESS_ID (or the matching arguments)")
    try:
        num = None if num is None else int(num)
        pid = None if pid is None else int(pid)
    except ValueError:
        raise ValueError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got {num!r} and {pid!r}") from None
    if num is not None and not 0 <= pid < num:
        raise ValueError(f"process id {pid} is outside 0..{num - 1}")
    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count()}


def make_mesh(tp: int, devices=None) -> Mesh:
    """A 1-D mesh ``("tp",)`` over the first ``tp`` of ``devices`` (default: ``jax.devices()``)."""
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if tp > len(devices):
        raise ValueError(f"tp={tp} needs {tp} devices; JAX sees {len(devices)} ({devices[0].platform})")
    return Mesh(np.asarray(devices[:tp]), (AXIS,))


def parse_mesh(text: str) -> int:
    """``"tp=N"`` -> ``N`` (the ``--mesh`` flag)."""
    m = re.fullmatch(r"\s*tp\s*=\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"bad mesh {text!r}: expected tp=N with N >= 1 (e.g. tp=2)")
    return int(m.group(1))


def param_partition(path: str, ndim: int) -> P:
    """The :class:`PartitionSpec` of the float parameter at ``path`` (module docs)."""
    parts = path.split("/")
    layer = parts[-2] if len(parts) >= 2 else ""
    leaf = parts[-1]
    if path.startswith("embed/"):
        return P(AXIS, None)
    if path.startswith("lm_head/"):
        return P(None, AXIS) if ndim == 2 else P(AXIS)
    if layer in COLUMN:
        return P(None, AXIS) if leaf == "kernel" else P(AXIS)
    if layer in ROW and leaf == "kernel":
        return P(AXIS, None)
    return P()


def _split_dim(path: str, ndim: int) -> int | None:
    spec = param_partition(path, ndim)
    return next((i for i, s in enumerate(spec) if s == AXIS), None)


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """One clear ``ValueError`` when ``tp`` does not divide the dimensions the layout splits."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    dims = (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("hidden_dim", cfg.hidden_dim),
            ("vocab_size", cfg.vocab_size))
    for name, n in dims:
        if n % tp:
            fits = [d for d in range(1, 65) if all(v % d == 0 for _, v in dims)]
            raise ValueError(f"tp={tp} does not divide {name}={n}: this model splits over tp in "
                             f"{{{', '.join(map(str, fits))}}}")


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config one device's shard looks like under the layout: ``n_heads``, ``n_kv_heads``,
    ``hidden_dim`` and ``vocab_size`` divided by ``tp``, ``dim`` whole.  Its parameter shapes are
    exactly the per-device shapes of :func:`partition_specs` (a column split divides the output
    features, a row split the input features, the embedding its rows), so the memory plan counts
    one device's weights, KV cache and activations with the one-device formulas."""
    import dataclasses

    check_tp(cfg, tp)
    if tp == 1:
        return cfg
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // tp, n_kv_heads=cfg.n_kv_heads // tp,
                               hidden_dim=cfg.hidden_dim // tp, vocab_size=cfg.vocab_size // tp)


def check_mesh(params, cfg: ModelConfig, tp: int) -> None:
    """Raise one clear ``ValueError`` when ``tp`` cannot split this model (module docs)."""
    if tp == 1:
        return
    check_tp(cfg, tp)
    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731
    for keypath, a in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_q)[0]:
        path = key_path_str(keypath)
        dim = _split_dim(path, len(a.shape))
        if dim is None:
            continue
        if a.shape[dim] % tp:
            raise ValueError(f"tp={tp} does not divide {path}'s dimension {dim} ({a.shape[dim]})")
        if is_q(a) and dim == a.axis:  # a row split cuts the reduction axis: whole groups, whole bytes
            local = a.shape[dim] // tp
            group = a.spec.group_size if a.spec.granularity == "group" else None
            if group is not None and local % group:
                raise ValueError(f"tp={tp} splits {path} ({a.spec}) into {local} rows per device, not a whole "
                                 f"number of its {group}-row groups: use a tp whose split falls on group "
                                 "boundaries, or a smaller group")
            codes, _ = packing.run_shape(a.spec.bits)
            if local % codes:
                raise ValueError(f"tp={tp} splits {path} ({a.spec}) into {local} rows per device, not a whole "
                                 f"number of packed runs ({codes} codes)")


def partition_specs(params):
    """A pytree like ``params`` of :class:`PartitionSpec` (a :class:`QuantizedTensor` gets one per leaf)."""
    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731

    def spec_of(keypath, a):
        path = key_path_str(keypath)
        if not is_q(a):
            return param_partition(path, a.ndim)
        return leaf_specs(a, _split_dim(path, len(a.shape)))

    return jax.tree_util.tree_map_with_path(spec_of, params, is_leaf=is_q)


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
    """``params`` placed on ``mesh`` in the Megatron layout (checked first: :func:`check_mesh`)."""
    check_mesh(params, cfg, mesh.shape[AXIS])
    specs = partition_specs(params)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    return jax.device_put(params, shardings)


def _is_split(sharding) -> bool:
    if not isinstance(sharding, NamedSharding) or AXIS not in sharding.mesh.axis_names:
        return False
    if sharding.mesh.shape[AXIS] < 2:
        return False
    return any(e == AXIS or (isinstance(e, tuple) and AXIS in e) for e in sharding.spec)


def mesh_of(tree) -> Mesh | None:
    """The ``"tp"`` mesh ``tree``'s arrays are split over, or None (one device, replicated, or
    traced values).  For a model's parameters it looks at the embedding table only, which the
    layout always splits (a decode step calls this: a scan of every leaf would cost ~0.2 ms)."""
    embed = tree.get("embed", {}).get("embedding") if isinstance(tree, dict) else None
    if embed is not None:
        tree = embed.packed if isinstance(embed, QuantizedTensor) else embed
    for a in jax.tree.leaves(tree):
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and _is_split(a.sharding):
            return a.sharding.mesh
    return None


def on_mesh_of(tree):
    """A context tracing under ``tree``'s mesh (``jax.set_mesh``), so quantized matmuls run their
    kernels per shard; a no-op for an unsplit tree (and inside a trace, which keeps the caller's)."""
    mesh = mesh_of(tree)
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def traced_on_mesh_of(argnum: int = 0):
    """Decorate a jitted model function: call it under the mesh of its ``argnum``-th argument (the
    parameters; :func:`on_mesh_of`).  The mesh is part of jit's cache key, so one function serves
    sharded and unsharded models."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with on_mesh_of(args[argnum]):
                return fn(*args, **kwargs)
        for name in ("lower", "trace", "eval_shape", "_cache_size", "clear_cache"):  # jit's own methods
            if hasattr(fn, name):
                setattr(call, name, getattr(fn, name))
        return call
    return wrap


def replicate(params, mesh: Mesh):
    """``params`` copied whole onto every device of ``mesh`` (the cascade's small model beside a
    sharded large one: each device drafts with its own copy, no communication)."""
    return jax.device_put(params, NamedSharding(mesh, P()))


def shard_cache(cache, mesh: Mesh):
    """A :class:`cascade.models.kv_cache.KVCache` placed on ``mesh`` split by KV heads: float buffers
    (batch, len, kv_heads, head_dim) on their head axis, quantized ones (batch, len, kv_heads *
    head_dim) on their feature axis (whole heads per device, since ``tp`` divides ``kv_heads``),
    ``lengths`` replicated."""
    def place(a):
        if a is None:
            return None
        if isinstance(a, QuantizedTensor):
            return jax.tree.map(place, a)
        if a.ndim == 4:
            spec = P(None, None, AXIS, None)
        elif a.ndim == 3 and a.shape[-1] % mesh.shape[AXIS] == 0:
            spec = P(None, None, AXIS)
        else:
            spec = P()
        return jax.device_put(a, NamedSharding(mesh, spec))

    return jax.tree.map(place, cache, is_leaf=lambda a: isinstance(a, QuantizedTensor))


def cache_like(params, cache):
    """``cache`` split by KV heads over the mesh ``params`` are split over (:func:`shard_cache`), as
    is for unsplit parameters: each decoding loop places its new cache beside its model."""
    mesh = mesh_of(params)
    return cache if mesh is None else shard_cache(cache, mesh)


def planned_bytes_per_device(params, tp: int) -> int:
    """The bytes one device holds for ``params`` under the layout, from shapes alone (no device
    needed): a split leaf's ``nbytes / tp``, a replicated leaf's whole ``nbytes``."""
    specs = jax.tree.leaves(partition_specs(params), is_leaf=lambda x: isinstance(x, P))
    leaves = jax.tree.leaves(params)
    if len(specs) != len(leaves):
        raise AssertionError("partition specs and parameters do not line up")
    total = 0
    for spec, a in zip(specs, leaves):
        n = int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        total += n // tp if AXIS in tuple(spec) else n
    return total


def placement(mesh: Mesh, placed) -> dict:
    """``{"tp", "devices", "bytes_per_device"}`` of trees placed on ``mesh``: what ``--json`` reports."""
    return {"tp": mesh.shape[AXIS], "devices": [str(d) for d in mesh.devices.flat],
            "bytes_per_device": bytes_per_device(placed)}


def bytes_per_device(tree) -> dict[str, int]:
    """Live bytes each device holds for ``tree``'s arrays (its addressable shards), by device."""
    out: dict[str, int] = {}
    for a in jax.tree.leaves(tree):
        for shard in a.addressable_shards:
            key = str(shard.device)
            out[key] = out.get(key, 0) + int(shard.data.nbytes)
    return out
