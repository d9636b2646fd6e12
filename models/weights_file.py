"""Flat weight files (``.safetensors``, ``.npz``): name -> array, read whole and checked.

The Llama loaders build on this; here it serves ``cascade quantize`` / ``inspect`` on raw
weight files.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np


def load(path: str) -> dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` or ``.npz`` file; clear ValueError if unreadable."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; expected a .safetensors or .npz weights file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(path)
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as f:
                tensors = {k: f[k] for k in f.files}
        else:
            raise ValueError(f"{path}: unsupported weights file type {ext or '(none)'}; expected .safetensors or .npz")
    except ValueError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, Exception) as e:  # safetensors raises its own error type
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not tensors:
        raise ValueError(f"{path}: contains no tensors")
    return tensors
