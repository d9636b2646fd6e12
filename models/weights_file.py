"""Flat weight files (``.safetensors``, ``.npz``): name -> array, read whole and checked.

Layout conventions differ: safetensors files from PyTorch store ``nn.Linear`` weights as
``(out, in)`` (the reduction axis is 1); ``.npz`` files written from Flax store kernels as
``(in, out)`` (axis 0).  :func:`default_reduction_axis` encodes that guess.

The Llama loaders build on this; here it serves ``cascade quantize`` / ``inspect`` on raw
weight files.
"""

from __future__ import annotations

import os

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which bf16 safetensors need
import numpy as np


def load(path: str) -> dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` or ``.npz`` file; clear ValueError if unreadable."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; expected a .safetensors or .npz weights file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".safetensors", ".npz"):
        raise ValueError(f"{path}: unsupported weights file type {ext or '(none)'}; expected .safetensors or .npz")
    try:
        if ext == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(path)
        else:
            with np.load(path, allow_pickle=False) as f:
                tensors = {k: f[k] for k in f.files}
    except Exception as e:  # numpy, zipfile and safetensors each raise their own types
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not tensors:
        raise ValueError(f"{path}: contains no tensors")
    return tensors


def default_reduction_axis(path: str) -> int:
    """1 for ``.safetensors`` (PyTorch ``(out, in)`` weights), 0 otherwise (Flax ``(in, out)``)."""
    return 1 if path.lower().endswith(".safetensors") else 0
