"""Test weights built straight from unsigned codes (the kernels' tests: codes at the extremes,
GGUF-style float32 zero points), packed by the documented layout of quant/packing.py."""

import jax.numpy as jnp
import numpy as np

from cascade.quant.qtensor import QuantizedTensor
from cascade.quant.spec import IntSpec


def raw_weight(codes_u, scale, zero, bits, group, k, *, full=None, a8=False):
    """A QuantizedTensor (k, n) along axis 0 from unsigned codes; ``zero`` None: symmetric (``full``:
    its grid, None for the width's default); ``a8``: an -a8 spec."""
    codes_u = np.asarray(codes_u, np.uint8)
    if bits == 4:
        packed = np.zeros(((k + 1) // 2, codes_u.shape[1]), np.uint8)
        packed[:] = codes_u[0::2] & 0xF
        packed[: k // 2] |= (codes_u[1::2] & 0xF) << 4
    else:
        packed = codes_u
    gran = {"granularity": "group", "group_size": group} if group < k else {"granularity": "channel"}
    grid = {} if zero is not None or full is None else {"full_range": full}
    spec = IntSpec(bits=bits, symmetric=zero is None, a8=a8, **grid, **gran)
    return QuantizedTensor(jnp.asarray(packed), jnp.asarray(scale), None if zero is None else jnp.asarray(zero),
                           spec=spec, shape=codes_u.shape, axis=0)
