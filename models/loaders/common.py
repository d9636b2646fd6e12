"""What every loader shares: building the parameter tree from named (out, in) tensors, checked.

A loader produces ``{our_path: array}`` with arrays already in our layout; :func:`build_params`
checks the set of names and every shape against :func:`cascade.models.llama.param_shapes`, that every
tensor is floating point (no format we read stores a model weight as integers: an integer or bool
tensor is a damaged or foreign file), and every value for NaN/Inf, then nests them.  (The config
itself is checked when the loader builds its :class:`ModelConfig`.)  Nothing is returned unless all of it is right, so a
half-loaded model is never used.
"""

from __future__ import annotations

import flax
import jax
import numpy as np

from cascade.models.config import ModelConfig
from cascade.models.llama import param_shapes
from cascade.quant.qtensor import QuantizedTensor


def build_params(flat: dict, cfg: ModelConfig, source: str, *, finite_checked: bool = False) -> dict:
    """Check ``flat`` (path -> array) against the config's shapes (and, unless ``finite_checked``
    says the loader did it slice by slice, for NaN/Inf) and nest it, on the device."""
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                         f"for a {cfg.n_layers}-layer {cfg.architecture}")
    extra = sorted(set(flat) - set(expected))
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    for path, want in expected.items():
        a = flat[path]
        if tuple(a.shape) != want:
            raise ValueError(f"{source}: tensor {path} has shape {tuple(a.shape)}, expected {want} from the config")
        if path == "vocab_map":
            check_vocab_map(np.asarray(a), cfg.vocab_size, source)
            continue
        if not isinstance(a, QuantizedTensor) and not jax.numpy.issubdtype(a.dtype, jax.numpy.floating):
            raise ValueError(f"{source}: tensor {path} has dtype {a.dtype}; model weights must be floating point "
                             "(float32, float16 or bfloat16)")
        if not finite_checked and not isinstance(a, QuantizedTensor) and not np.isfinite(np.asarray(a, np.float32)).all():
            raise ValueError(f"{source}: tensor {path} contains NaN/Inf values")
    # onto the device once, so jitted calls do not copy host arrays in on every step
    flat = {k: (v if isinstance(v, (QuantizedTensor, jax.Array)) else jax.device_put(v)) for k, v in flat.items()}
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def check_vocab_map(m: np.ndarray, vocab_size: int, source: str) -> None:
    """A reduced-vocabulary model's ``vocab_map``: distinct token ids below ``vocab_size``, and one -1."""
    if not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"{source}: tensor vocab_map has dtype {m.dtype}; it must hold integer token ids")
    real = m[m >= 0]
    if (m < -1).any() or (m == -1).sum() != 1 or (real >= vocab_size).any() or len(np.unique(real)) != len(real):
        raise ValueError(f"{source}: tensor vocab_map must list distinct token ids in [0, {vocab_size}) and one -1 "
                         "(the row of every other token)")


def linear_from_torch(w: np.ndarray) -> np.ndarray:
    """PyTorch ``nn.Linear`` weight (out, in) -> our kernel (in, out)."""
    return np.ascontiguousarray(np.asarray(w).T)
