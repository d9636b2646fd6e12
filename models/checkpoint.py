"""Self-contained model checkpoints: arrays through orbax, everything else in one JSON manifest.

A checkpoint is a directory::

    <dir>/cascade_checkpoint.json   manifest, written last (its presence marks a complete save)
    <dir>/arrays/                   orbax StandardCheckpointer tree of every array leaf
    <dir>/tokenizer/                the tokenizer's own files (only when the model has one)

The orbax tree mirrors the parameter tree; a :class:`cascade.quant.QuantizedTensor` becomes a dict of
its leaves (``packed``, ``scale`` and, for asymmetric specs, ``zero``).  The manifest holds the
format version, the :class:`ModelConfig`, the precision rules text (``Model.quant``), how the
model was quantized (``Model.ptq``: PTQ method, its settings, the calibration recipe), and a
``tree`` entry for every parameter path: ``kind`` (``float`` or ``quantized``), logical
``shape`` and ``dtype``; quantized entries add the ``spec`` text and ``axis``; every stored
leaf has its ``shape``, ``dtype`` and the ``sha256`` of its bytes.  ``array_files`` and
``tokenizer`` list every file under ``arrays/`` and ``tokenizer/`` with its size and sha256, and
``manifest_sha256`` covers the rest of the manifest, so any edit to it is detected.

Loading first checks the manifest and the files (so orbax never reads a damaged file: its
failure path prints pages of TensorStore specs and "Exception ignored" coroutine tracebacks),
then rebuilds the abstract target tree from the manifest, checks it against orbax's own
metadata (orbax would otherwise silently cast dtypes or ignore shapes), restores, and checks
every leaf's shape, dtype and hash: a truncated, corrupted, edited or incomplete checkpoint is
a one-line ``ValueError`` naming the directory (and the tensor or file where known).

Saving is atomic: everything is written into a hidden sibling temp directory
(``.NAME.tmp-PID-XXXXXXXX``) that is renamed onto the target only when complete; an existing
target is first moved aside to ``.NAME.old-PID-XXXXXXXX`` and removed after the rename.  A failed
save leaves neither target nor temp directory.  A writer killed outright (``kill -9``, power loss)
cannot clean up, so the next save or load of the same target does (:func:`recover_interrupted_save`):
it removes the temp directories of writers that are no longer running and, when the target is
missing but a dead writer's ``.old`` copy exists (killed between the two renames), renames that
copy back, with a warning.  The target is therefore always absent, the old checkpoint, or the
complete new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy
import numpy as np

from cascade.models import files
from cascade.models.config import ModelConfig
from cascade.models.model import Model
from cascade.quant.qtensor import QuantizedTensor

CHECKPOINT_MARKER = "cascade_checkpoint.json"
FORMAT = "cascade_checkpoint"
# 2: spec texts (``tree`` entries, ``quant``) in spec grammar version 2 with every grid explicit
# (cascade.quant.spec); 1: written before, read with the grammar of then (int3-g32 = narrow grid)
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
ARRAYS_DIR = "arrays"
TOKENIZER_DIR = "tokenizer"
_QT_LEAVES = ("packed", "scale", "zero", "act_scale")


def is_checkpoint(path) -> bool:
    """True when ``path`` is a directory holding the checkpoint marker (a completed save)."""
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CHECKPOINT_MARKER))


# ---------------------------------------------------------------------------------------- save


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: a process of another user holds that pid
        return True
    return True


def recover_interrupted_save(directory) -> list[str]:
    """Clean up after writers of ``directory`` that died mid-save; returns what was done.

    Removes their ``.NAME.tmp-*`` directories, and their ``.NAME.old-*`` copies of a replaced
    checkpoint, except that a ``.old`` copy is renamed back onto the target when the target is
    missing (the writer died between moving the old checkpoint aside and installing the new one).
    Directories of writers that are still running (by process id, on this machine) are left alone.
    """
    target = os.path.abspath(os.fspath(directory))
    parent, name = os.path.split(target)
    try:
        entries = sorted(os.listdir(parent or "."))
    except OSError:
        return []
    done = []
    for entry in entries:
        m = files.SIDE_PATH.match(entry)
        if not m or m["name"] != name or _pid_running(int(m["pid"])):
            continue
        path = os.path.join(parent, entry)
        if m["kind"] == "old" and not os.path.lexists(target):
            os.rename(path, target)
            files.fsync_dir(parent)
            done.append(f"restored the previous checkpoint from {entry} (a save was interrupted)")
            warnings.warn(f"{target}: {done[-1]}", stacklevel=2)
            continue
        files.remove(path)
        done.append(f"removed {entry} left by an interrupted save")
    return done


def check_destination(directory, *, overwrite: bool = False) -> str:
    """Check that :func:`save_checkpoint` may write ``directory`` (after recovering from interrupted
    saves); returns its absolute path.  Callers that do long work before saving (quantizing) call
    this first, so a refused destination is reported before the work, not after."""
    target = os.path.abspath(os.fspath(directory))
    if not os.path.basename(target):
        raise ValueError(f"{directory}: not a valid checkpoint directory name")
    recover_interrupted_save(target)
    if os.path.lexists(target):
        if not overwrite:
            raise ValueError(f"{target}: already exists; pass overwrite=True (--overwrite) to replace it")
        if not (is_checkpoint(target) or (os.path.isdir(target) and not os.listdir(target))):
            raise ValueError(f"{target}: exists and is not a cascade checkpoint; refusing to replace it")
    return target


def save_checkpoint(directory, model: Model, *, overwrite: bool = False) -> None:
    """Write ``model`` to ``directory`` (atomically); ValueError if it exists and not ``overwrite``.

    ``overwrite`` replaces only an existing cascade checkpoint (or an empty directory); any other
    existing path is refused rather than deleted.
    """
    target = check_destination(directory, overwrite=overwrite)
    parent = os.path.dirname(target)
    if not isinstance(model, Model) or not isinstance(model.config, ModelConfig):
        raise ValueError(f"{target}: save_checkpoint takes a cascade.Model, got {type(model).__name__}")
    if model.quant is not None and not isinstance(model.quant, str):
        raise ValueError(f"{target}: Model.quant must be the precision rules text or None, "
                         f"got {type(model.quant).__name__}")
    if model.ptq is not None:
        try:
            if not isinstance(model.ptq, dict) or json.loads(json.dumps(model.ptq)) != model.ptq:
                raise TypeError
        except (TypeError, ValueError):
            raise ValueError(f"{target}: Model.ptq must be a JSON object (method, settings, calibration) or None") from None
    entries, arrays = _flatten(model.params, target)
    _check_layout(model.config, entries, target)

    os.makedirs(parent, exist_ok=True)
    tmp = files.side_path(target, "tmp")
    os.mkdir(tmp)
    try:
        _write_arrays(os.path.join(tmp, ARRAYS_DIR), arrays)
        array_files = _hash_files(os.path.join(tmp, ARRAYS_DIR))
        tokenizer_files = None
        if model.tokenizer is not None:
            tok_dir = os.path.join(tmp, TOKENIZER_DIR)
            os.makedirs(tok_dir, exist_ok=True)
            model.tokenizer.save(tok_dir)
            tokenizer_files = _hash_files(tok_dir)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "quant": _saved_rules_text(model.quant),
            "ptq": model.ptq,
            "source": model.source,
            "source_format": model.format,
            "tokenizer": tokenizer_files,
            "array_files": array_files,
            "tree": entries,
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        _write_marker(os.path.join(tmp, CHECKPOINT_MARKER), manifest)  # last: marks the save complete
        _install(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _flatten(params, where) -> tuple[dict, dict]:
    """Manifest entries {path: entry} and the orbax tree (nested dicts of arrays) for ``params``."""
    entries: dict = {}
    arrays: dict = {}

    def visit(node, path: tuple[str, ...]):
        if isinstance(node, dict) or type(node).__name__ == "FrozenDict":
            if not node and path:
                raise ValueError(f"{where}: parameter tree has an empty subtree at {'/'.join(path)!r}")
            for key, child in node.items():
                if not isinstance(key, str) or not key or "/" in key:
                    raise ValueError(f"{where}: parameter key {key!r} under {'/'.join(path) or 'the root'!r} "
                                     "must be a non-empty string without '/'")
                visit(child, path + (key,))
            return
        name = "/".join(path)
        if not path:
            raise ValueError(f"{where}: model params must be a dict, got {type(node).__name__}")
        if isinstance(node, QuantizedTensor):
            if node.spec.act == "static" and node.act_scale is None:
                raise ValueError(f"{where}: {name!r} is {node.spec} without its activation scale; quantize the model "
                                 "with calibration data (--calib) before saving")
            leaves = {k: getattr(node, k) for k in _QT_LEAVES if getattr(node, k) is not None}
            stored = {}
            for k, leaf in leaves.items():
                leaves[k], stored[k] = _leaf(leaf, f"{name}/{k}", where)
            entries[name] = {"kind": "quantized", "spec": node.spec.explicit, "shape": list(node.shape),
                             "axis": node.axis, "dtype": node.dtype, "leaves": stored}
            _nested_set(arrays, path, leaves)
        elif hasattr(node, "dtype") and hasattr(node, "shape") and jnp.issubdtype(node.dtype, jnp.floating):
            arr, info = _leaf(node, name, where)
            entries[name] = {"kind": "float", **info}
            _nested_set(arrays, path, arr)
        elif name == "vocab_map" and hasattr(node, "dtype") and jnp.issubdtype(node.dtype, jnp.integer):
            arr, info = _leaf(node, name, where)  # a reduced-vocabulary model's token ids (ModelConfig.vocab_subset)
            entries[name] = {"kind": "index", **info}
            _nested_set(arrays, path, arr)
        else:
            kind = getattr(node, "dtype", type(node).__name__)
            raise ValueError(f"{where}: parameter {name!r} is {kind}; "
                             "a checkpoint holds float arrays and QuantizedTensors (and a vocab_map of token ids)")

    visit(params, ())
    if not entries:
        raise ValueError(f"{where}: model has no parameters to save")
    return entries, arrays


def _leaf(x, name, where):
    try:
        arr = jnp.asarray(x)
    except Exception as e:  # a tracer or something array-like that is not an array
        raise ValueError(f"{where}: parameter {name!r} is not a concrete array ({type(e).__name__})") from None
    if arr.dtype != x.dtype:  # e.g. float64 numpy without jax x64: the checkpoint would not be bit-exact
        raise ValueError(f"{where}: parameter {name!r} has dtype {x.dtype}, which JAX stores as {arr.dtype}; "
                         "cast it first")
    return arr, {"shape": list(arr.shape), "dtype": str(arr.dtype), "sha256": _sha256(arr)}


def _sha256(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()


def _nested_set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _write_arrays(path: str, arrays: dict) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, arrays)
        ckpt.wait_until_finished()


def _list_files(root: str) -> list[str]:
    """Relative ``/``-separated paths of every file under ``root``, sorted."""
    out = []
    for dirpath, _, filenames in os.walk(root):
        out.extend(os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/") for fn in filenames)
    return sorted(out)


def _hash_files(root: str) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under ``root``."""
    return {rel: {"size": os.path.getsize(os.path.join(root, rel)), "sha256": _file_sha256(os.path.join(root, rel))}
            for rel in _list_files(root)}


def _verify_files(root: str, files: dict, where: str, label: str) -> None:
    """Every listed file exists with its size and hash, and nothing else is there."""
    if not os.path.isdir(root):
        raise ValueError(f"{where}: missing {label}/ (incomplete or damaged checkpoint)")
    for rel, info in files.items():
        full = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(full):
            raise ValueError(f"{where}: file {label}/{rel} is missing")
        size = os.path.getsize(full)
        if size != info["size"]:
            raise ValueError(f"{where}: file {label}/{rel} has {size} bytes, expected {info['size']} "
                             "(truncated or damaged)")
        if _file_sha256(full) != info["sha256"]:
            raise ValueError(f"{where}: file {label}/{rel} is corrupted (sha256 mismatch)")
    extra = [rel for rel in _list_files(root) if rel not in files]
    if extra:
        raise ValueError(f"{where}: unexpected file {label}/{extra[0]} (not listed in {CHECKPOINT_MARKER})")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_marker(path: str, manifest: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _install(tmp: str, target: str, overwrite: bool) -> None:
    """Rename the finished temp dir onto ``target`` (:func:`cascade.models.files.replace_directory`),
    unless a target appeared during the save without ``overwrite``."""
    if os.path.lexists(target) and not overwrite:  # created by someone else while we were writing
        raise ValueError(f"{target}: already exists; pass overwrite=True (--overwrite) to replace it")
    files.replace_directory(tmp, target)


# ---------------------------------------------------------------------------------------- load


def load_checkpoint(directory, *, mesh=None) -> Model:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying every array's hash.

    ``mesh`` (a :func:`cascade.models.sharding.make_mesh` mesh): restore straight into the tensor
    parallel layout, each process reading only the slices its devices hold (orbax restores every
    array with its target :class:`~jax.sharding.NamedSharding`), so a process's host memory is
    bounded by its shards, not the model.  The layout is checked first (``tp`` must split the
    model: :func:`cascade.models.sharding.check_mesh`).  The array files' hashes are verified as
    always; the per-tensor hashes, which would need each whole tensor on one host, are not."""
    where = os.path.abspath(os.fspath(directory))
    recover_interrupted_save(where)
    if not os.path.exists(where):
        raise ValueError(f"{where}: no such checkpoint directory")
    if not os.path.isdir(where):
        raise ValueError(f"{where}: not a directory; expected a cascade checkpoint directory")
    if not os.path.isfile(os.path.join(where, CHECKPOINT_MARKER)):
        raise ValueError(f"{where}: not a cascade checkpoint (missing {CHECKPOINT_MARKER})")
    manifest = _read_manifest(where)
    try:
        config = ModelConfig.from_dict(manifest["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{where}: invalid model config in {CHECKPOINT_MARKER} ({_first_line(e)})") from None
    entries = manifest["tree"]
    version = manifest["format_version"]
    _check_entries(entries, where, version)
    _check_layout(config, entries, where)
    arrays_dir, tokenizer_dir = os.path.join(where, ARRAYS_DIR), os.path.join(where, TOKENIZER_DIR)
    _verify_files(arrays_dir, manifest["array_files"], where, ARRAYS_DIR)  # before orbax sees a damaged file
    if manifest["tokenizer"] is not None:
        _verify_files(tokenizer_dir, manifest["tokenizer"], where, TOKENIZER_DIR)
    shardings = None if mesh is None else _target_shardings(config, entries, mesh, where)
    restored = _read_arrays(arrays_dir, entries, where, shardings)

    params: dict = {}
    for name, e in entries.items():
        path = tuple(name.split("/"))
        check = _verified if mesh is None else _verified_shape
        if e["kind"] in ("float", "index"):
            value = check(restored, path, e, name, where)
        else:
            leaves = {k: check(restored, path + (k,), info, f"{name}/{k}", where)
                      for k, info in e["leaves"].items()}
            value = QuantizedTensor(leaves["packed"], leaves["scale"], leaves.get("zero"), leaves.get("act_scale"), spec=e["_spec"],
                                    shape=tuple(e["shape"]), axis=e["axis"], dtype=e["dtype"])
        _nested_set(params, path, value)

    tokenizer = None if manifest["tokenizer"] is None else _load_tokenizer(tokenizer_dir, where)
    return Model(config=config, params=params, tokenizer=tokenizer, source=where, format="checkpoint",
                 quant=_loaded_rules_text(manifest["quant"], version), ptq=manifest.get("ptq"))


def _saved_rules_text(quant: str | None) -> str | None:
    """``Model.quant`` as saved: its grids explicit (:meth:`PrecisionRules.text`) when it parses
    as precision rules, else as it is (a label)."""
    from cascade.quant.rules import PrecisionRules

    if quant is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PrecisionRules.parse(quant).text()
    except ValueError:
        return quant


def _loaded_rules_text(quant: str | None, version: int) -> str | None:
    """A manifest's ``quant`` in the current spec grammar: a format-1 text (old grammar) is
    rewritten with its grids explicit, so ``int3-g32`` of then reads ``int3-g32-narrow``."""
    from cascade.quant.rules import PrecisionRules

    if quant is None or version >= 2:
        return quant
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PrecisionRules.parse(quant, version=1).text()
    except ValueError:
        return quant


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_manifest(where: str) -> dict:
    path = os.path.join(where, CHECKPOINT_MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: cannot read {CHECKPOINT_MARKER} ({_first_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: {CHECKPOINT_MARKER} is not a cascade checkpoint manifest")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise ValueError(f"{where}: unsupported checkpoint format version {version!r} "
                         f"(this cascade reads versions {', '.join(map(str, READ_VERSIONS))})")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise ValueError(f"{where}: {CHECKPOINT_MARKER} was modified or corrupted (manifest checksum mismatch)")
    for key, types in (("config", dict), ("tree", dict), ("quant", (str, type(None))),
                       ("tokenizer", (dict, type(None))), ("array_files", dict)):
        if not isinstance(manifest.get(key), types):
            raise ValueError(f"{where}: {CHECKPOINT_MARKER} has a missing or malformed {key!r} entry")
    if not isinstance(manifest.get("ptq"), (dict, type(None))):  # optional: absent in checkpoints before PTQ methods
        raise ValueError(f"{where}: {CHECKPOINT_MARKER} has a malformed 'ptq' entry")
    for key in ("tokenizer", "array_files"):
        for rel, info in (manifest[key] or {}).items():
            if (not isinstance(info, dict) or not isinstance(info.get("size"), int)
                    or not isinstance(info.get("sha256"), str) or rel.startswith("/") or ".." in rel.split("/")):
                raise ValueError(f"{where}: {CHECKPOINT_MARKER} has a malformed {key!r} entry for {rel!r}")
    return manifest


def _check_entries(entries: dict, where: str, version: int = FORMAT_VERSION) -> None:
    """Validate manifest entries (types, spec text, leaf shapes consistent with the spec)."""
    from cascade.quant import packing, ranges
    from cascade.quant.spec import IntSpec, parse_spec

    def bad(name, what):
        return ValueError(f"{where}: tensor {name!r}: {what} in {CHECKPOINT_MARKER}")

    def check_leaf(name, info):
        if not (isinstance(info, dict) and _is_shape(info.get("shape")) and isinstance(info.get("sha256"), str)):
            raise bad(name, "malformed leaf entry")
        try:
            np.dtype(info.get("dtype"))
        except TypeError:
            raise bad(name, f"unknown dtype {info.get('dtype')!r}") from None

    for name, e in entries.items():
        if not isinstance(e, dict) or e.get("kind") not in ("float", "quantized", "index"):
            raise bad(name, "malformed entry (kind must be 'float', 'quantized' or 'index')")
        if e["kind"] == "index" and name != "vocab_map":
            raise bad(name, "only vocab_map holds token ids (kind 'index')")
        if e["kind"] in ("float", "index"):
            check_leaf(name, e)
            continue
        if not (_is_shape(e.get("shape")) and isinstance(e.get("axis"), int) and isinstance(e.get("leaves"), dict)):
            raise bad(name, "malformed quantized entry")
        try:
            spec = parse_spec(e.get("spec"), version=1 if version == 1 else 2)
        except ValueError as err:
            raise bad(name, f"bad spec ({_first_line(err)})") from None
        if not isinstance(spec, IntSpec):
            raise bad(name, f"quantized tensor with float spec {spec}")
        try:
            if not np.issubdtype(np.dtype(e.get("dtype")), np.floating):
                raise TypeError
        except TypeError:
            raise bad(name, f"dequantized dtype {e.get('dtype')!r} is not a float dtype") from None
        shape, axis = tuple(e["shape"]), e["axis"]
        if not shape or not 0 <= axis < len(shape):
            raise bad(name, f"axis {axis} out of range for shape {shape}")
        want = ({"packed", "scale"} | ({"zero"} if not spec.symmetric else set())
                | ({"act_scale"} if spec.act == "static" else set()))
        if set(e["leaves"]) != want:
            raise bad(name, f"leaves {sorted(e['leaves'])} do not match spec {spec} (expected {sorted(want)})")
        for k, info in e["leaves"].items():
            check_leaf(f"{name}/{k}", info)
        stack = tuple(e["leaves"]["packed"]["shape"][: max(0, len(e["leaves"]["packed"]["shape"]) - len(shape))])
        packed = list(shape)
        packed[axis] = packing.packed_length(shape[axis], spec.bits)
        expect = {"packed": stack + tuple(packed), "scale": stack + ranges.scale_shape(shape, spec, axis)}
        expect["zero"] = expect["scale"]
        expect["act_scale"] = stack
        for k, info in e["leaves"].items():
            if tuple(info["shape"]) != expect[k]:
                raise bad(name, f"{k} shape {tuple(info['shape'])} does not match spec {spec} of shape {shape} "
                                f"(expected {expect[k]})")
        if e["leaves"]["packed"]["dtype"] != "uint8":
            raise bad(name, f"packed codes have dtype {e['leaves']['packed']['dtype']}, expected uint8")
        e["_spec"] = spec


def _is_shape(v) -> bool:
    return isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)


def _check_layout(config: ModelConfig, entries: dict, where: str) -> None:
    """The parameter paths and logical shapes are the ones ``models.llama`` expects for ``config``."""
    from cascade.models.llama import param_shapes

    expected = param_shapes(config)
    missing = sorted(set(expected) - set(entries))
    extra = sorted(set(entries) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        n = len(missing) + len(extra)
        raise ValueError(f"{where}: parameters do not match the model config ({what}"
                         f"{f' and {n - 1} more' if n > 1 else ''})")
    for name, shape in expected.items():
        got = tuple(entries[name]["shape"])
        if got != tuple(shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {got}, the model config expects {tuple(shape)}")


def _leaf_specs(entries: dict) -> dict[tuple[str, ...], dict]:
    out = {}
    for name, e in entries.items():
        path = tuple(name.split("/"))
        if e["kind"] in ("float", "index"):
            out[path] = e
        else:
            for k, info in e["leaves"].items():
                out[path + (k,)] = info
    return out


def _skeleton(entries: dict) -> dict:
    """The params tree of ``entries`` with :class:`jax.ShapeDtypeStruct` leaves (quantized tensors
    as :class:`QuantizedTensor` of them): what the sharding layout reads, without any array."""
    tree: dict = {}
    for name, e in entries.items():
        leaf = lambda info: jax.ShapeDtypeStruct(tuple(info["shape"]), np.dtype(info["dtype"]))  # noqa: E731
        if e["kind"] in ("float", "index"):
            value = leaf(e)
        else:
            ls = {k: leaf(info) for k, info in e["leaves"].items()}
            value = QuantizedTensor(ls["packed"], ls["scale"], ls.get("zero"), ls.get("act_scale"), spec=e["_spec"],
                                    shape=tuple(e["shape"]), axis=e["axis"], dtype=e["dtype"])
        _nested_set(tree, tuple(name.split("/")), value)
    return tree


def _target_shardings(config: ModelConfig, entries: dict, mesh, where: str) -> dict:
    """``{leaf path: NamedSharding}`` of the tensor-parallel layout on ``mesh`` for every stored array."""
    from jax.sharding import NamedSharding, PartitionSpec

    from cascade.models import sharding

    skeleton = _skeleton(entries)
    try:
        sharding.check_mesh(skeleton, config, mesh.shape[sharding.AXIS])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    specs = sharding.partition_specs(skeleton)
    out = {}
    for name, e in entries.items():
        path = tuple(name.split("/"))
        node = specs
        for k in path:
            node = node[k]
        if e["kind"] in ("float", "index"):
            out[path] = NamedSharding(mesh, node)
        else:
            for k in e["leaves"]:
                out[path + (k,)] = NamedSharding(mesh, getattr(node, k) or PartitionSpec())
    return out


def _read_arrays(path: str, entries: dict, where: str, shardings: dict | None = None) -> dict:
    import orbax.checkpoint as ocp

    specs = _leaf_specs(entries)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target: dict = {}
    for p, info in specs.items():
        sharding = one if shardings is None else shardings[p]
        _nested_set(target, p, jax.ShapeDtypeStruct(tuple(info["shape"]), np.dtype(info["dtype"]), sharding=sharding))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            meta = ckpt.metadata(path)
            tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
            _check_metadata(tree, specs, where)
            return ckpt.restore(path, target)
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: cannot read arrays ({_first_line(e)})") from None
    except Exception as e:  # orbax and tensorstore raise many types (OSError, RuntimeError, ...)
        raise ValueError(f"{where}: cannot read arrays ({_first_line(e)})") from None


def _check_metadata(tree, specs: dict, where: str) -> None:
    """Orbax's stored shapes/dtypes agree with the manifest (orbax would cast or ignore them)."""
    if not isinstance(tree, dict):
        raise ValueError(f"{where}: {ARRAYS_DIR}/ has no readable orbax metadata")
    stored = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        stored[tuple(str(k.key) for k in kp)] = leaf
    for p, info in specs.items():
        name = "/".join(p)
        if p not in stored:
            raise ValueError(f"{where}: tensor {name!r} is missing from {ARRAYS_DIR}/")
        m = stored[p]
        shape, dtype = tuple(getattr(m, "shape", ()) or ()), getattr(m, "dtype", None)
        if shape != tuple(info["shape"]) or dtype is None or np.dtype(dtype) != np.dtype(info["dtype"]):
            raise ValueError(f"{where}: tensor {name!r} is stored as {dtype}{list(shape)}, "
                             f"the manifest says {info['dtype']}{info['shape']}")
    extra = sorted("/".join(p) for p in set(stored) - set(specs))
    if extra:
        raise ValueError(f"{where}: {ARRAYS_DIR}/ holds a tensor the manifest does not list: {extra[0]!r}")


def _restored_node(restored: dict, path: tuple[str, ...], name: str, where: str):
    node = restored
    try:
        for k in path:
            node = node[k]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: tensor {name!r} was not restored") from None
    return node


def _verified(restored: dict, path: tuple[str, ...], info: dict, name: str, where: str):
    node = _restored_node(restored, path, name, where)
    host = np.asarray(node)
    if tuple(host.shape) != tuple(info["shape"]) or str(host.dtype) != info["dtype"]:
        raise ValueError(f"{where}: tensor {name!r} restored as {host.dtype}{list(host.shape)}, "
                         f"expected {info['dtype']}{info['shape']}")
    if _sha256(host) != info["sha256"]:
        raise ValueError(f"{where}: tensor {name!r} is corrupted (sha256 mismatch)")
    return node if isinstance(node, jax.Array) else jnp.asarray(host)


def _verified_shape(restored: dict, path: tuple[str, ...], info: dict, name: str, where: str):
    """A sharded restore's check: the array is there with the manifest's shape and dtype (its bytes
    were verified with the files; no host holds the whole tensor to hash it)."""
    node = _restored_node(restored, path, name, where)
    if tuple(node.shape) != tuple(info["shape"]) or str(node.dtype) != info["dtype"]:
        raise ValueError(f"{where}: tensor {name!r} restored as {node.dtype}{list(node.shape)}, "
                         f"expected {info['dtype']}{info['shape']}")
    return node


def _load_tokenizer(path: str, where: str):
    from cascade.models.tokenizer import Tokenizer

    try:
        return Tokenizer.load(path)
    except Exception as e:
        raise ValueError(f"{where}: cannot load tokenizer ({_first_line(e)})") from None
