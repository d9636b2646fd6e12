"""Writing a model as a Hugging Face checkpoint directory.

``config.json`` (:meth:`ModelConfig.to_hf_dict`), ``model.safetensors`` in the names and
(out, in) layout of ``transformers``' ``LlamaForCausalLM``, ``generation_config.json``, and the
tokenizer files copied from a directory.  The directory appears complete or not at all (written
beside it, then renamed).  Float weights only: a quantized model has no HF Llama equivalent.
"""

from __future__ import annotations

import os
import shutil

import flax
import numpy as np

from cascade.models import files
from cascade.models.config import ModelConfig
from cascade.quant.qtensor import QuantizedTensor

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def path_to_hf_name(path: str) -> str:
    """Inverse of :func:`cascade.models.loaders.hf.hf_name_to_path`."""
    from cascade.models.loaders.hf import _LAYER_NAMES

    fixed = {"embed/embedding": "model.embed_tokens.weight", "final_norm/scale": "model.norm.weight",
             "lm_head/kernel": "lm_head.weight", "vocab_map": "model.vocab_map"}
    if path in fixed:
        return fixed[path]
    layer, _, rest = path.partition("/")
    for hf, ours in _LAYER_NAMES.items():
        if ours == rest:
            return f"model.layers.{int(layer.removeprefix('layers_'))}.{hf}"
    raise ValueError(f"no Hugging Face name for parameter {path!r}")


def hf_state_dict(params, dtype=np.float32) -> dict[str, np.ndarray]:
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, a in flat.items():
        if isinstance(a, QuantizedTensor):
            raise ValueError(f"parameter {path} is quantized ({a.spec}); export the float model instead")
        a = np.asarray(a, np.int32 if path == "vocab_map" else dtype)  # a reduced vocabulary's token ids stay ids
        out[path_to_hf_name(path)] = np.ascontiguousarray(a.T if path.endswith("/kernel") else a)
    return out


def save_hf(params, cfg: ModelConfig, out_dir, *, tokenizer_dir=None, overwrite: bool = False,
            extra_files: dict[str, str] | None = None) -> str:
    """Write ``params`` as an HF directory ``out_dir``; ``extra_files`` maps names to text contents."""
    from safetensors.numpy import save_file

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    state = hf_state_dict(params)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = files.side_path(out_dir, "tmp")
    os.mkdir(tmp)  # with the umask's permissions: an exported model is for everyone to read
    try:
        hf_cfg = {**cfg.to_hf_dict(), "torch_dtype": "float32"}
        files.write_json(os.path.join(tmp, "config.json"), hf_cfg)
        files.write_json(os.path.join(tmp, "generation_config.json"),
                    {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf_cfg["eos_token_id"]})
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            found = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, f))]
            if not found:
                raise ValueError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
            for f in found:
                shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        files.replace_directory(tmp, out_dir)  # the old one is kept until the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_trained(run_dir, tokenizer_dir, out_dir, *, overwrite: bool = True) -> str:
    """The latest checkpoint of a :func:`cascade.models.training.train` run as an HF directory."""
    from cascade.models.training import load_trained

    cfg, params, step = load_trained(run_dir)
    return save_hf(params, cfg, out_dir, tokenizer_dir=tokenizer_dir, overwrite=overwrite)
