"""The native KV-cache attention kernel against float64 numpy and the XLA reference.

The kernel (quant/kernels/cpu_attention.cc) returns a softmax partial (acc, m, l) of a few
queries over a stored cache, read in place: float caches (float32, float16, bfloat16) and the
int8/int4 KIVI layout (keys per channel over groups of positions, values per token).  Each case
is checked against a float64 numpy attention over the cache dequantized from the documented
layout (tests/quant/reference.py, which does not import the code under test), with visible
ranges that are empty, partial and whole, grouped-query heads, head sizes on and off the SIMD
width, value groups smaller than a head, equal to one and spanning heads.  The scalar path runs
the same checks in a subprocess with CASCADE_CPU_KERNEL_SCALAR=1.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade.models.attention import attend_partial, merge_partials
from cascade.models.kv_cache import cache_partial
from cascade.quant import packing
from cascade.quant.kernels import cpu
from cascade.quant.kv import parse_kv_spec
from cascade.quant.qtensor import QuantizedTensor
from tests.quant.reference import unpack


def _float_cache(rng, b, s, kvh, hd, dtype):
    k = jnp.asarray(rng.standard_normal((b, s, kvh, hd)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, kvh, hd)), dtype)
    return k, v, np.asarray(k, np.float64), np.asarray(v, np.float64)


def _kivi_cache(rng, b, s, kvh, hd, kv: str):
    """Random codes, scales and zero points in the KIVI layout, and their float64 dequantization
    from the documented formulas: k = (u - z[p // G]) * s[p // G], v = (u - 2^(bits-1)) * s[c // N]."""
    spec = parse_kv_spec(kv)
    bits, g, d = spec.bits, spec.key_positions, kvh * hd
    kspec, vspec = spec.key_spec(), spec.value_spec(kvh, hd)
    n = vspec.group_size
    top = 2**bits
    ku = rng.integers(0, top, (b, s, d))
    vu = rng.integers(0, top, (b, s, d))
    ks = rng.uniform(0.02, 0.2, (b, s // g, d)).astype(np.float16)
    kz = rng.uniform(-4, top + 4, (b, s // g, d)).astype(np.float16)
    vs = rng.uniform(-0.3, 0.3, (b, s, d // n)).astype(np.float16)  # negative scales too
    kp = np.stack([np.asarray(packing.pack_codes(jnp.asarray(ku[i]), bits, 0)) for i in range(b)])
    vp = np.stack([np.asarray(packing.pack_codes(jnp.asarray(vu[i]), bits, 1)) for i in range(b)])
    k = QuantizedTensor(jnp.asarray(kp), jnp.asarray(ks), jnp.asarray(kz), spec=kspec, shape=(b, s, d), axis=1,
                        dtype="float32")
    v = QuantizedTensor(jnp.asarray(vp), jnp.asarray(vs), None, spec=vspec, shape=(b, s, d), axis=2, dtype="float32")
    # independent float64 dequantization from the bytes
    ku2 = np.stack([unpack(kp[i], bits, s, 0) for i in range(b)]).astype(np.float64)
    vu2 = np.stack([unpack(vp[i], bits, d, 1) for i in range(b)]).astype(np.float64)
    assert (ku2 == ku).all() and (vu2 == vu).all()
    k64 = (ku2 - np.repeat(kz.astype(np.float64), g, axis=1)) * np.repeat(ks.astype(np.float64), g, axis=1)
    v64 = (vu2 - top / 2) * np.repeat(vs.astype(np.float64), n, axis=2)
    return k, v, k64.reshape(b, s, kvh, hd), v64.reshape(b, s, kvh, hd)


def _f64_partial(q, k, v, lo, hi):
    """float64 (acc, m, l) by loops over (b, t, head)."""
    q = np.asarray(q, np.float64)
    b_, t_, h_, hd = q.shape
    kvh = k.shape[2]
    acc, m, l = np.zeros((b_, t_, h_, hd)), np.full((b_, t_, h_), -np.inf), np.zeros((b_, t_, h_))
    for b in range(b_):
        for t in range(t_):
            a, e = max(int(lo[b, t]), 0), min(int(hi[b, t]), k.shape[1])
            if a >= e:
                continue
            for h in range(h_):
                kh = h // (h_ // kvh)
                s = k[b, a:e, kh] @ q[b, t, h]
                m[b, t, h] = s.max()
                p = np.exp(s - s.max())
                l[b, t, h] = p.sum()
                acc[b, t, h] = p @ v[b, a:e, kh]
    return acc, m, l


def _check(q, k, v, k64, v64, lo, hi, rtol=2e-5):
    assert cpu.attention_supported(q, k, v)
    got = [np.asarray(a, np.float64) for a in jax.jit(cpu.cache_attention)(q, lo, hi, k, v)]
    acc, m, l = _f64_partial(q, k64, v64, np.asarray(lo), np.asarray(hi))
    seen = np.isfinite(m)
    assert (np.isfinite(got[1]) == seen).all()
    assert (got[2][~seen] == 0).all() and (got[0][~seen] == 0).all()
    # compare the normalized outputs and m; l and acc share the kernel's choice of m
    np.testing.assert_allclose(got[1][seen], m[seen], rtol=rtol, atol=rtol)
    out, ref = got[0][seen] / got[2][seen][:, None], acc[seen] / l[seen][:, None]
    scale = np.abs(v64).max()
    assert np.abs(out - ref).max() <= rtol * scale, np.abs(out - ref).max()
    np.testing.assert_allclose(got[2][seen] * np.exp(got[1][seen] - m[seen]), l[seen], rtol=rtol)


def _queries(rng, b, t, h, hd, s):
    q = jnp.asarray(rng.standard_normal((b, t, h, hd)) * hd**-0.5, jnp.float32)
    lo = rng.integers(-2, s // 2, (b, t))
    hi = lo + rng.integers(0, s, (b, t))
    lo[0, 0], hi[0, 0] = 5, 5  # an empty range
    if b > 1:
        lo[1, 0], hi[1, 0] = 0, s  # the whole cache
    return q, jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("t, h, kvh, hd", [(1, 4, 2, 8), (3, 6, 3, 24), (2, 2, 1, 12)])
def test_float_caches(dtype, t, h, kvh, hd):
    rng = np.random.default_rng(hd + t)
    k, v, k64, v64 = _float_cache(rng, 2, 150, kvh, hd, dtype)
    q, lo, hi = _queries(rng, 2, t, h, hd, 150)
    _check(q, k, v, k64, v64, lo, hi)


@pytest.mark.parametrize("kv, kvh, hd", [("int8", 2, 16), ("int4", 2, 16), ("int4-g16", 2, 32), ("int8-g48", 4, 24),
                                         ("int4-kg16", 3, 64), ("int4-g12", 2, 12), ("int8", 1, 12)])
@pytest.mark.parametrize("t", [1, 4])
def test_kivi_caches(kv, kvh, hd, t):
    rng = np.random.default_rng(kvh * hd + t)
    s = 128
    k, v, k64, v64 = _kivi_cache(rng, 2, s, kvh, hd, kv)
    q, lo, hi = _queries(rng, 2, t, 2 * kvh, hd, s)
    _check(q, k, v, k64, v64, lo, hi)


def test_long_cache_split_over_threads_and_blocks():
    rng = np.random.default_rng(7)
    s = 4096  # many blocks of positions, every helper thread busy
    k, v, k64, v64 = _kivi_cache(rng, 1, s, 3, 64, "int4")
    q, _, _ = _queries(rng, 1, 1, 9, 64, s)
    lo, hi = jnp.asarray([[0]], jnp.int32), jnp.asarray([[s - 7]], jnp.int32)
    _check(q, k, v, k64, v64, lo, hi)
    kf, vf, kf64, vf64 = _float_cache(rng, 1, s, 3, 64, jnp.float32)
    _check(q, kf, vf, kf64, vf64, lo, hi)


def test_dispatch_equals_the_reference_and_merging_parts_equals_one_softmax(monkeypatch):
    """cache_partial on the kernel equals it on the XLA reference; partials of two halves merged
    equal the partial of the whole."""
    rng = np.random.default_rng(3)
    k, v, _, _ = _kivi_cache(rng, 2, 96, 2, 16, "int4")
    q, lo, hi = _queries(rng, 2, 2, 4, 16, 96)
    lo, hi = jnp.maximum(lo, 1), jnp.maximum(hi, lo + 1)  # every query sees something
    kernel = merge_partials([cache_partial(q, k, v, lo, hi)], jnp.float32)
    monkeypatch.setenv("CASCADE_ATTENTION_BACKEND", "xla")
    assert not cpu.attention_supported(q, k, v)
    reference = merge_partials([cache_partial(q, k, v, lo, hi)], jnp.float32)
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(reference), rtol=1e-5, atol=1e-5)
    mid = (lo + hi) // 2
    halves = merge_partials([cache_partial(q, k, v, lo, mid), cache_partial(q, k, v, mid, hi)], jnp.float32)
    np.testing.assert_allclose(np.asarray(halves), np.asarray(reference), rtol=1e-5, atol=1e-5)
    # attend_partial with a mask that shows nothing: m = -inf, l = 0, acc = 0
    a, m, l = attend_partial(q, jnp.ones((2, 5, 2, 16)), jnp.ones((2, 5, 2, 16)), jnp.zeros((2, 2, 5), bool))
    assert np.isneginf(np.asarray(m)).all() and not np.asarray(l).any() and not np.asarray(a).any()


def test_long_calls_and_forced_reference_go_to_xla(monkeypatch):
    rng = np.random.default_rng(0)
    k, v, _, _ = _float_cache(rng, 1, 64, 2, 8, jnp.float32)
    assert cpu.attention_supported(jnp.ones((1, cpu.MAX_ATTENTION_TOKENS, 4, 8)), k, v)
    assert not cpu.attention_supported(jnp.ones((1, cpu.MAX_ATTENTION_TOKENS + 1, 4, 8)), k, v)  # prefill
    monkeypatch.setenv("CASCADE_ATTENTION_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CASCADE_ATTENTION_BACKEND"):
        cpu.attention_supported(jnp.ones((1, 1, 4, 8)), k, v)


SCALAR_SCRIPT = """
import numpy as np, jax.numpy as jnp
from cascade.quant.kernels import cpu
from tests.quant import test_kernels_cpu_attention as t
assert cpu.simd() == "scalar"
rng = np.random.default_rng(1)
for kv in ("int8", "int4", "int4-g16"):
    k, v, k64, v64 = t._kivi_cache(rng, 2, 64, 2, 32, kv)
    q, lo, hi = t._queries(rng, 2, 2, 4, 32, 64)
    t._check(q, k, v, k64, v64, lo, hi)
for dtype in (jnp.float32, jnp.float16):
    k, v, k64, v64 = t._float_cache(rng, 2, 64, 2, 16, dtype)
    q, lo, hi = t._queries(rng, 2, 1, 4, 16, 64)
    t._check(q, k, v, k64, v64, lo, hi)
print("scalar ok")
"""


@pytest.mark.system  # another process
def test_the_scalar_path_in_a_subprocess():
    env = {**os.environ, "CASCADE_CPU_KERNEL_SCALAR": "1", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", SCALAR_SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0 and "scalar ok" in proc.stdout, proc.stderr[-3000:]
