"""The integer-domain CPU kernel (``-a8`` specs) against its XLA reference and numpy's int64 arithmetic.

The numpy reference here is written from the formulas in :mod:`cascade.quant.activations` and the
byte layout (``tests/quant/reference.py``), without the code under test.  Every case runs on every
instruction-set path this machine has (``CASCADE_CPU_ISA`` caps the kernel at each call: scalar
always, avx2 and avx512 where the processor has them).  The mutation checks show that the
comparison can fail: swapped nibbles or activation blocks of the wrong size give other numbers.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from cascade import quant
from cascade.quant import dequant_matmul
from cascade.quant.activations import a8_reference
from cascade.quant.kernels import cpu
from cascade.quant.qtensor import QuantizedTensor
from tests.quant.reference import expand_params, unpack
from tests.quant.weights import raw_weight

ORDER = ["scalar", "avx2", "avx512vnni"]
PATHS = ORDER[: ORDER.index(cpu.hardware_isa() or "scalar") + 1]
CAP = {"scalar": "scalar", "avx2": "avx2", "avx512vnni": "avx512"}

SPECS = ["int4-g32-a8", "int4-g32-asym-a8", "int4-a8", "int4-asym-a8", "int4-g64-narrow-a8", "int4-g128-a8",
         "int8-a8", "int8-g32-a8", "int8-g32-asym-a8", "int8-full-a8", "int8-tensor-a8", "int4-tensor-a8", "int4-g16-a8"]
SHAPES = [(64, 64), (96, 40), (173, 37), (300, 129), (2, 1), (576, 192)]  # (K, N): strip tails, short blocks, odd K


def a8_numpy(x, w, transposed=False, block=None):
    """float64 result of the documented -a8 arithmetic with int64 sums (``block``: activation blocks
    of another size, for the mutation check; weight blocks of a group are then split or joined)."""
    spec = w.spec
    k = w.shape[w.axis]
    u = unpack(np.asarray(w.packed), spec.bits, k, w.axis).astype(np.int64)
    s_full, z_full = expand_params(w)
    if transposed:
        u, s_full = u.T, s_full.T
        z_full = None if z_full is None else z_full.T
    block = block or (min(spec.group_size, k) if spec.granularity == "group" else k)
    xs = np.asarray(x, np.float32).reshape(-1, k)
    y = np.zeros((xs.shape[0], u.shape[1]))
    for k0 in range(0, k, block):
        k1 = min(k, k0 + block)
        xb = xs[:, k0:k1]
        amax = np.abs(xb).max(axis=1)
        d = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        xq = np.clip(np.rint(xb / d[:, None]), -127, 127).astype(np.int64)
        z = 2 ** (spec.bits - 1) if z_full is None else z_full[k0:k1]
        y += d[:, None].astype(np.float64) * (xq @ (s_full[k0:k1] * (u[k0:k1] - z)))
    return y.reshape(*np.shape(x)[:-1], u.shape[1])


def _scale(x, w, transposed=False):
    """The size of the terms summed (what float32 rounding is relative to): sum |d s (u - z) xq|."""
    spec = w.spec
    k = w.shape[w.axis]
    u = unpack(np.asarray(w.packed), spec.bits, k, w.axis).astype(np.float64)
    s_full, z_full = expand_params(w)
    z = 2.0 ** (spec.bits - 1) if z_full is None else z_full
    wabs = np.abs(s_full) * (np.abs(u) + np.abs(z))
    wabs = wabs.T if transposed else wabs
    return float((np.abs(np.asarray(x, np.float64)).reshape(-1, k) @ wabs).max()) + 1e-30


def _run(x, w, path, transposed=False, monkeypatch=None):
    monkeypatch.setenv(cpu.ISA_ENV, CAP[path])
    assert cpu.isa() == path
    fn = (lambda a, b: cpu.matmul_a8(a, b, transposed=True)) if transposed else cpu.matmul_a8
    return np.asarray(jax.jit(fn)(x, w), np.float64)


def _check(x, w, monkeypatch, transposed=False, rtol=3e-6):
    assert cpu.supports_a8(x, w, transposed=transposed)
    want = a8_numpy(x, w, transposed)
    ref = np.asarray(jax.jit(lambda a, b: a8_reference(a, b, transposed=transposed))(x, w), np.float64)
    tol = rtol * _scale(x, w, transposed)
    assert np.abs(ref - want).max() <= tol, ("reference", w.spec)
    for path in PATHS:
        got = _run(x, w, path, transposed, monkeypatch)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= tol, (path, str(w.spec), x.shape, np.abs(got - want).max(), tol)
        assert np.abs(got - ref).max() <= tol, (path, str(w.spec))


def test_this_machine_runs_the_simd_paths():
    """The kernel is built, and on x86 with AVX2 (every CI machine) at least two paths are tested."""
    assert cpu.unavailable() is None
    assert len(PATHS) >= 2, PATHS


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_and_shape_on_every_path(spec, monkeypatch):
    rng = np.random.default_rng(len(spec))
    for k, n in SHAPES:
        if "g128" in spec and k < 128 or "g64" in spec and k < 64:
            continue
        w = quant.quantize(rng.standard_normal((k, n)).astype(np.float32), spec)
        assert w.spec.a8
        _check(jnp.asarray(rng.standard_normal((3, k)) * rng.uniform(0.1, 3, k), jnp.float32), w, monkeypatch)


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 8, 16, 17, 64])
def test_rows(rows, monkeypatch):
    rng = np.random.default_rng(rows)
    for spec in ("int4-g32-asym-a8", "int8-g32-a8"):
        w = quant.quantize(rng.standard_normal((256, 96)).astype(np.float32), spec)
        x = jnp.asarray(rng.standard_normal((rows, 256)), jnp.float32)
        if rows == 0:
            for path in PATHS:
                assert _run(x, w, path, monkeypatch=monkeypatch).shape == (0, 96)
            continue
        _check(x, w, monkeypatch)


@pytest.mark.parametrize("spec", ["int4-g32-a8", "int4-g32-asym-a8", "int8-g32-a8", "int8-a8", "int4-a8",
                                  "int8-g64-full-a8", "int8-g32-asym-a8", "int4-g64-a8"])
@pytest.mark.parametrize("rows", [1, 5])
def test_transposed_tied_head(spec, rows, monkeypatch):
    """A tied head (the embedding (vocab, dim) quantized along dim) read in place: the avx2 chunk path
    where K and the block allow it (K = 576 as SmolLM2), the scalar path otherwise (K = 100)."""
    rng = np.random.default_rng(rows)
    for k in (576, 100):
        if "g64" in spec and k < 64:
            continue
        e = quant.quantize(rng.standard_normal((77, k)).astype(np.float32), spec, axis=1)
        _check(jnp.asarray(rng.standard_normal((rows, k)), jnp.float32), e, monkeypatch, transposed=True)


def _raw(codes_u, scale, zero, bits, group, k, full=False):
    return raw_weight(codes_u, scale, zero, bits, group, k, full=full, a8=True)


@pytest.mark.parametrize("bits", [4, 8])
def test_extreme_codes_activations_and_negative_scales(bits, monkeypatch):
    """Codes at 0 and 2^b - 1 everywhere (the largest 16-bit partial sums), activations that are
    all +-max, one huge value among tiny ones, exact zeros (scale 1), and negative scales (GGUF Q4_0)."""
    k, n, g = 256, 64, 32
    top = 2**bits - 1
    rng = np.random.default_rng(bits)
    scale = rng.uniform(-0.2, 0.2, (k // g, n)).astype(np.float16)
    xs = [np.full((2, k), 3.0), -np.full((2, k), 3.0), np.zeros((2, k)), rng.standard_normal((2, k)) * 1e-3]
    xs[3][:, 5] = 1e4
    for codes in (np.zeros((k, n)), np.full((k, n), top), rng.choice([0, top], size=(k, n))):
        for x in xs:
            x = jnp.asarray(x, jnp.float32)
            _check(x, _raw(codes, scale, None, bits, g, k, full=True), monkeypatch)
            zero = rng.uniform(0, top, (k // g, n)).astype(np.float32)
            _check(x, _raw(codes, scale, zero, bits, g, k), monkeypatch)


def test_bfloat16_activations_and_scale_dtypes(monkeypatch):
    rng = np.random.default_rng(7)
    for scale_dtype in ("float16", "bfloat16", "float32"):
        w = quant.quantize(rng.standard_normal((128, 64)).astype(np.float32), "int4-g32-asym-a8",
                           scale_dtype=scale_dtype)
        _check(jnp.asarray(rng.standard_normal((2, 128)), jnp.float32), w, monkeypatch)
    x = jnp.asarray(rng.standard_normal((2, 128)), jnp.bfloat16)
    w = quant.quantize(rng.standard_normal((128, 64)).astype(np.float32), "int8-g32-a8")
    want = a8_numpy(np.asarray(x, np.float32), w)
    for path in PATHS:
        got = _run(x, w, path, monkeypatch=monkeypatch)
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()  # bfloat16 output rounding


def test_mutations_are_caught(monkeypatch):
    """The checks above can fail: the kernel's result on the real weight differs from the numpy
    reference of the weight with its nibbles swapped, and from activation blocks the size of the row."""
    rng = np.random.default_rng(11)
    w = quant.quantize(rng.standard_normal((128, 64)).astype(np.float32), "int4-g32-a8")
    x = jnp.asarray(rng.standard_normal((2, 128)) * np.repeat([0.01, 1, 10, 0.1], 32), jnp.float32)
    got = _run(x, w, PATHS[-1], monkeypatch=monkeypatch)
    tol = 3e-6 * _scale(x, w)
    assert np.abs(got - a8_numpy(x, w)).max() <= tol
    p = np.asarray(w.packed)
    swapped = QuantizedTensor(jnp.asarray(((p & 0xF) << 4) | (p >> 4)), w.scale, w.zero, spec=w.spec, shape=w.shape,
                              axis=0)
    assert np.abs(got - a8_numpy(x, swapped)).max() > 100 * tol
    assert np.abs(got - a8_numpy(x, w, block=128)).max() > 100 * tol  # one block per row, not per group


def test_dispatch_names_forcing_and_the_environment(monkeypatch):
    w = quant.quantize(np.ones((64, 32), np.float32), "int4-g32-a8")
    x = jnp.ones((1, 64), jnp.float32)
    assert dequant_matmul.a8_backend(x, w) == "cpu-a8"
    monkeypatch.setenv("CASCADE_MATMUL_BACKEND", "xla")
    assert dequant_matmul.a8_backend(x, w) == "xla-a8"
    monkeypatch.setenv("CASCADE_MATMUL_BACKEND", "pallas")
    with pytest.raises(ValueError, match="does not run -a8"):
        dequant_matmul.a8_backend(x, w)
    monkeypatch.delenv("CASCADE_MATMUL_BACKEND")
    monkeypatch.setenv(cpu.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="CASCADE_CPU_ISA"):
        dequant_matmul.a8_backend(x, w)
    monkeypatch.setenv(cpu.ISA_ENV, "scalar")
    assert cpu.isa() == "scalar" and cpu.simd() == "scalar"  # the float kernel takes the cap too


def test_the_compiled_matmul_calls_the_kernel():
    """No silent fallback: the program quant.matmul compiles for an -a8 weight holds the custom call."""
    w = quant.quantize(np.ones((64, 32), np.float32), "int4-g32-a8")
    text = jax.jit(quant.matmul).lower(jnp.ones((1, 64), jnp.float32), w).as_text()
    assert cpu.A8_TARGET in text
    w2 = quant.quantize(np.ones((64, 32), np.float32), "int4-g32")
    assert cpu.A8_TARGET not in jax.jit(quant.matmul).lower(jnp.ones((1, 64), jnp.float32), w2).as_text()


@pytest.mark.parametrize("rows", [1, 5])
def test_several_weights_in_one_call_equal_their_own_calls_exactly(rows, monkeypatch):
    """matmul_many (q/k/v, gate/up): one call, each result bit-identical to the weight's own call, on
    every path; weights that do not fuse (another group size, a float weight) run one by one."""
    rng = np.random.default_rng(rows)
    ws = [quant.quantize(rng.standard_normal((576, n)).astype(np.float32), "int4-g32-asym-a8") for n in (576, 192, 192)]
    x = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
    assert dequant_matmul.fuses(x, ws)
    assert cpu.A8_MANY_TARGET in jax.jit(dequant_matmul.matmul_many).lower(x, ws).as_text()
    for path in PATHS:
        monkeypatch.setenv(cpu.ISA_ENV, CAP[path])
        many = jax.jit(dequant_matmul.matmul_many)(x, ws)
        for y, w in zip(many, ws):
            assert (np.asarray(y) == np.asarray(jax.jit(cpu.matmul_a8)(x, w))).all(), path
    other = quant.quantize(rng.standard_normal((576, 64)).astype(np.float32), "int4-g64-asym-a8")
    assert not dequant_matmul.fuses(x, ws[:1] + [other])
    assert not dequant_matmul.fuses(x, ws[:1] + [jnp.ones((576, 8))])
    mixed = dequant_matmul.matmul_many(x, ws[:1] + [other])
    assert np.allclose(np.asarray(mixed[1]), a8_numpy(x, other), atol=3e-6 * _scale(x, other))
    monkeypatch.setenv("CASCADE_MATMUL_BACKEND", "xla")
    assert not dequant_matmul.fuses(x, ws)


@pytest.mark.parametrize("spec, k, n", [("int4-g32-asym-a8", 1536, 576), ("int8-g32-a8", 576, 1536),
                                        ("int4-g32-a8", 576, 192)])
def test_a_row_is_the_same_alone_or_with_others(spec, k, n, monkeypatch):
    """Each row of an M-row call equals the same row computed alone, bit for bit, on every path: the
    split of the work (K bands on the larger shapes here) never depends on the number of rows, so a
    speculative verification (k + 1 rows) agrees exactly with one-row decode steps.  Mutation check:
    a split decided by M (as it once was) fails the smallest shape, which bands only with several rows."""
    rng = np.random.default_rng(k + n)
    w = quant.quantize(rng.standard_normal((k, n)).astype(np.float32), spec)
    x = jnp.asarray(rng.standard_normal((9, k)) * rng.uniform(0.1, 3, k), jnp.float32)
    for path in PATHS:
        monkeypatch.setenv(cpu.ISA_ENV, CAP[path])
        together = np.asarray(jax.jit(cpu.matmul_a8)(x, w))
        for m in range(x.shape[0]):
            alone = np.asarray(jax.jit(cpu.matmul_a8)(x[m:m + 1], w))[0]
            assert (together[m] == alone).all(), (path, m)
