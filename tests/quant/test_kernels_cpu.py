"""The native CPU dequant-matmul kernel against the reference XLA backend and float64 numpy.

Every format the models produce (int8 per channel / per tensor / grouped, int4 per channel and
grouped, symmetric and asymmetric, GGUF Q4_1's float32 zeros), K and N that are not multiples of
the strip, chunk or group sizes (short last groups, odd K for int4), batches 1..64 (both the
direct and the tiled path), codes at the format's extremes, negative scales (GGUF Q4_0 has
them), float16 / bfloat16 / float32 scales and bfloat16 activations.  The scalar path (machines
without AVX2) runs the same cases in a subprocess with CASCADE_CPU_KERNEL_SCALAR=1.
"""

import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade import quant
from cascade.quant import dequant_matmul
from cascade.quant.kernels import cpu
from cascade.quant.qtensor import QuantizedTensor
from tests.quant.reference import dequantize_ref, expand_params, unpack
from tests.quant.weights import raw_weight

SPECS = ["int8", "int8-tensor", "int8-g64-asym", "int8-asym", "int4", "int4-asym", "int4-g32", "int4-g128",
         "int4-g32-asym", "int4-g64-asym", "int4-g16-mse", "int4-g32-full", "int8-full"]
SHAPES = [(64, 32), (173, 37), (300, 129), (1, 8), (33, 1)]  # (K, N): tails of 8-wide strips, short groups, odd K
ROWS = [1, 2, 4, 5, 16, 64]


def _native(x, w):
    return cpu.matmul(x, w)


def _reference(x, w):
    return dequant_matmul.xla_dequant_matmul(x, w)


def _f64(x, w):
    return np.asarray(x, np.float64) @ np.asarray(dequantize_ref(w), np.float64)


def _term_scale(x, w):
    """max over outputs of sum_k |x_k| * |s| * (|u - 2^(b-1)| + |z - 2^(b-1)|): the size of the
    terms the kernel adds, which float32 rounding is relative to (a result may cancel to ~0)."""
    spec = w.spec
    off = 2.0 ** (spec.bits - 1)
    u = unpack(np.asarray(w.packed), spec.bits, w.shape[0], 0).astype(np.float64)
    s_full, z_full = expand_params(w)
    z_term = 0.0 if w.zero is None else np.abs(z_full - off)
    return float((np.abs(np.asarray(x, np.float64)) @ (np.abs(s_full) * (np.abs(u - off) + z_term))).max())


def _check(x, w, rtol=2e-5, against_xla=True):
    """The kernel equals the float64 product of the documented dequantization to float32
    rounding, and (where asked: it compiles another program per shape) the xla backend too."""
    assert cpu.supports(x, w), (w, x.dtype, x.shape)
    got = np.asarray(jax.jit(_native)(x, w), np.float64)
    exact = _f64(x, w)
    scale = _term_scale(x, w) + 1e-30
    assert np.abs(got - exact).max() / scale < rtol, np.abs(got - exact).max() / scale
    if against_xla:  # both backends are float32 computations of the same float64 product
        ref = np.asarray(jax.jit(_reference)(x, w), np.float64)
        assert np.abs(got - ref).max() / scale < 2 * rtol


def test_the_native_backend_is_built_and_selected_on_cpu():
    """CI builds the kernel from a clean clone: a silent fallback to the reference must fail here."""
    assert cpu.unavailable() is None, cpu.unavailable()
    assert cpu.simd() in ("avx2+fma", "scalar")
    w = quant.quantize(np.ones((64, 32), np.float32), "int4-g32")
    x = jnp.ones((1, 64), jnp.float32)
    assert dequant_matmul.select_backend(x, w).name == "cpu"
    assert dequant_matmul.select_backend(jnp.ones((cpu.MAX_ROWS + 1, 64), jnp.float32), w).name == "xla"  # large batch
    assert dequant_matmul.select_backend(x, quant.quantize(np.ones((64, 32), np.float32), "int3-g32")).name == "xla"


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_and_shape_against_the_reference(spec):
    rng = np.random.default_rng(zlib.crc32(spec.encode()))
    for k, n in SHAPES:
        w = quant.quantize(rng.standard_normal((k, n)).astype(np.float32), spec, scale_dtype="float32")
        for m in (1, 6):
            _check(jnp.asarray(rng.standard_normal((m, k)), jnp.float32), w, against_xla=m == 1)


@pytest.mark.parametrize("rows", ROWS)
def test_batches_on_both_paths(rows):
    rng = np.random.default_rng(rows)
    for spec in ("int4-g32", "int8", "int4-g64-asym"):
        w = quant.quantize(rng.standard_normal((256, 200)).astype(np.float32), spec)
        _check(jnp.asarray(rng.standard_normal((rows, 256)), jnp.float32), w)


def test_leading_dims_and_large_n_split_over_threads():
    rng = np.random.default_rng(1)
    w = quant.quantize(rng.standard_normal((512, 2100)).astype(np.float32), "int4-g128")
    x = jnp.asarray(rng.standard_normal((2, 3, 512)), jnp.float32)
    got = jax.jit(_native)(x, w)
    assert got.shape == (2, 3, 2100)
    _check(x.reshape(6, 512), w)


@pytest.mark.parametrize("spec", ["int4-g32-asym", "int8-g32", "int4-g64"])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_shapes_split_over_k_bands(spec, rows):
    """Batches up to 4 with many groups run as bands of whole groups, one partial sum per band
    (K = 1000: a short last group; n = 333: a scalar column tail inside every band)."""
    rng = np.random.default_rng(rows)
    w = quant.quantize(rng.standard_normal((1000, 333)).astype(np.float32), spec)
    _check(jnp.asarray(rng.standard_normal((rows, 1000)), jnp.float32), w)


def _raw(codes_u, scale, zero, bits, group, k):
    """A QuantizedTensor built from unsigned codes (k, n), packed by the documented layout."""
    return raw_weight(codes_u, scale, zero, bits, group, k)


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_at_the_extremes_and_negative_scales(bits):
    k, n, g = 96, 40, 32
    top = 2**bits - 1
    rng = np.random.default_rng(bits)
    scale = rng.uniform(-0.2, 0.2, (k // g, n)).astype(np.float16)  # GGUF Q4_0 stores negative d too
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
    for codes in (np.zeros((k, n)), np.full((k, n), top), rng.choice([0, top], size=(k, n))):
        _check(x, _raw(codes, scale, None, bits, g, k))
        zero = rng.uniform(0, top, (k // g, n)).astype(np.float32)
        _check(x, _raw(codes, scale, zero, bits, g, k))


def test_gguf_q4_1_float32_zeros_and_odd_k():
    """Q4_1 imports as int4-g32-asym with a real-valued float32 zero (z = -m / d)."""
    rng = np.random.default_rng(3)
    for k in (64, 95):
        codes = rng.integers(0, 16, (k, 24))
        groups = -(-k // 32)
        d = rng.uniform(0.001, 0.05, (groups, 24)).astype(np.float16)
        m = rng.uniform(-0.3, 0.1, (groups, 24)).astype(np.float16)
        zero = (-m.astype(np.float32) / d.astype(np.float32)).astype(np.float32)
        _check(jnp.asarray(rng.standard_normal((2, k)), jnp.float32), _raw(codes, d, zero, 4, 32, k))


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_scale_dtypes(scale_dtype):
    rng = np.random.default_rng(5)
    for spec in ("int8-g32", "int4-g64-asym"):
        w = quant.quantize(rng.standard_normal((128, 48)).astype(np.float32), spec, scale_dtype=scale_dtype)
        _check(jnp.asarray(rng.standard_normal((2, 128)), jnp.float32), w)


def test_bfloat16_activations():
    rng = np.random.default_rng(6)
    w = quant.quantize(rng.standard_normal((160, 72)).astype(np.float32), "int4-g32")
    x = jnp.asarray(rng.standard_normal((4, 160)), jnp.bfloat16)
    got = jax.jit(_native)(x, w)
    assert got.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float64) @ np.asarray(dequantize_ref(w), np.float64)
    # the kernel accumulates the exact weights in float32 and rounds once to bfloat16
    assert np.abs(np.asarray(got, np.float64) - exact).max() <= 2**-8 * np.abs(exact).max()
    ref = np.asarray(jax.jit(_reference)(x, w), np.float64)
    assert np.abs(np.asarray(got, np.float64) - ref).max() <= 2**-6 * np.abs(exact).max()


def test_unsupported_operands_go_to_the_reference():
    rng = np.random.default_rng(7)
    w = quant.quantize(rng.standard_normal((64, 16)).astype(np.float32), "int4-g32")
    assert not cpu.supports(jnp.ones((1, 64), jnp.float16), w)  # float16 activations
    assert not cpu.supports(jnp.ones((1, 64), jnp.float32), quant.quantize(np.ones((64, 16), np.float32), "int4-g3"))
    assert not cpu.supports(jnp.ones((cpu.MAX_ROWS + 1, 64), jnp.float32), w)
    assert dequant_matmul.select_backend(jnp.ones((1, 64)), quant.quantize(np.ones((64, 16), np.float32), "int2-g16")).name \
        == "xla"


def test_forced_backend_and_environment(monkeypatch):
    w = quant.quantize(np.ones((64, 32), np.float32), "int8")
    x = jnp.ones((1, 64), jnp.float32)
    monkeypatch.setenv("CASCADE_MATMUL_BACKEND", "xla")
    assert dequant_matmul.select_backend(x, w).name == "xla"
    monkeypatch.setenv("CASCADE_MATMUL_BACKEND", "cpu")
    assert dequant_matmul.select_backend(x, w).name == "cpu"
    with pytest.raises(ValueError, match="does not support"):
        dequant_matmul.select_backend(x, quant.quantize(np.ones((64, 32), np.float32), "int3-g32"))


SCALAR_SCRIPT = """
import numpy as np, jax, jax.numpy as jnp
from cascade import quant
from cascade.quant.kernels import cpu
from cascade.quant import dequant_matmul
from tests.quant.reference import dequantize_ref, expand_params, unpack
from tests.quant.weights import raw_weight
assert cpu.simd() == "scalar"
rng = np.random.default_rng(0)
for spec in ("int8", "int8-g32-asym", "int4-g32", "int4-g64-asym", "int4"):
    for k, n in ((173, 37), (64, 40)):
        w = quant.quantize(rng.standard_normal((k, n)).astype(np.float32), spec)
        for m in (1, 6):
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
            got = np.asarray(jax.jit(cpu.matmul)(x, w), np.float64)
            exact = np.asarray(x, np.float64) @ np.asarray(dequantize_ref(w), np.float64)
            assert np.abs(got - exact).max() / np.abs(exact).max() < 2e-5, (spec, k, n, m)
print("scalar ok")
"""


@pytest.mark.system  # another process
def test_the_scalar_path_in_a_subprocess():
    env = {**os.environ, "CASCADE_CPU_KERNEL_SCALAR": "1", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", SCALAR_SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0 and "scalar ok" in proc.stdout, proc.stderr[-3000:]


FALLBACK_SCRIPT = """
import sys
sys.modules["cascade.quant.kernels._cpu"] = None  # as if the extension was never built: importing it fails
import jax.numpy as jnp, numpy as np
from cascade import quant
from cascade.quant import dequant_matmul
w = quant.quantize(np.ones((64, 32), np.float32), "int4-g32-narrow")  # the narrow grid: ones land exactly on +7 x 1/7
for _ in range(3):
    y = quant.matmul(jnp.ones((1, 64)), w)
assert dequant_matmul.select_backend(jnp.ones((1, 64)), w).name == "xla"
print("fallback ok", float(y[0, 0]))
"""


@pytest.mark.system  # another process
def test_a_missing_extension_falls_back_to_the_reference_with_one_warning_line():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_MATMUL_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0 and "fallback ok 64.0" in proc.stdout, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "native CPU matmul kernel unavailable" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: cascade: "), proc.stderr[-3000:]


# the float kernel's paths this machine has: scalar always, AVX2 where the processor has it
FLOAT_PATHS = ["scalar"] + (["avx2"] if cpu.hardware_isa() in ("avx2", "avx512vnni") else [])


@pytest.mark.parametrize("spec", ["int4-g32", "int4-g32-asym", "int8", "int8-g64-asym", "int4"])
@pytest.mark.parametrize("rows", [1, 5])
def test_several_weights_in_one_call_equal_their_own_calls_exactly(spec, rows, monkeypatch):
    """matmul_many (q/k/v, gate/up) of float-activation weights: one call, each result bit-identical to
    the weight's own call, on every path (576 x 576 bands over K, 576 x 192 does not, 576 x 36 has a
    scalar column tail); weights that do not fuse (another group size, a float weight, -a8) run one by
    one, and the fused call is in the compiled program."""
    rng = np.random.default_rng(rows + len(spec))
    ws = [quant.quantize(rng.standard_normal((576, n)).astype(np.float32), spec) for n in (576, 192, 36)]
    x = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
    assert dequant_matmul.fuses(x, ws)
    text = jax.jit(dequant_matmul.matmul_many).lower(x, ws).as_text()
    assert cpu.MANY_TARGET in text and f'"{cpu.TARGET}"' not in text
    for path in FLOAT_PATHS:
        monkeypatch.setenv(cpu.ISA_ENV, path)
        many = jax.jit(dequant_matmul.matmul_many)(x, ws)
        for y, w in zip(many, ws):
            assert (np.asarray(y) == np.asarray(jax.jit(cpu.matmul)(x, w))).all(), (path, w.shape)
            _check(x, w, against_xla=False)
    other = quant.quantize(rng.standard_normal((576, 64)).astype(np.float32), "int4-g128")
    a8 = quant.quantize(rng.standard_normal((576, 64)).astype(np.float32), spec + "-a8")
    for odd in (other, a8, jnp.ones((576, 8))):
        assert not dequant_matmul.fuses(x, ws[:1] + [odd])
    mixed = dequant_matmul.matmul_many(x, ws[:1] + [other])
    _check(x, other)
    assert np.allclose(np.asarray(mixed[1]), np.asarray(cpu.matmul(x, other)))
    monkeypatch.setenv("CASCADE_MATMUL_BACKEND", "xla")
    assert not dequant_matmul.fuses(x, ws)


def test_bfloat16_activations_in_one_call():
    rng = np.random.default_rng(7)
    ws = [quant.quantize(rng.standard_normal((256, n)).astype(np.float32), "int4-g32-asym") for n in (256, 64)]
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.bfloat16)
    many = jax.jit(dequant_matmul.matmul_many)(x, ws)
    for y, w in zip(many, ws):
        assert y.dtype == jnp.bfloat16
        assert (np.asarray(y, np.float32) == np.asarray(jax.jit(cpu.matmul)(x, w), np.float32)).all()


@pytest.mark.parametrize("spec, k, n", [("int4-g32-asym", 1536, 576), ("int8-g32", 576, 1536),
                                        ("int4-g32", 576, 192), ("int4-g32", 576, 576)])
def test_a_row_is_the_same_alone_or_with_others(spec, k, n, monkeypatch):
    """Each row of an M-row call equals the same row computed alone, bit for bit, on every path: the
    K-band split never depends on the number of rows, so a speculative verification (k + 1 rows)
    agrees exactly with one-row decode steps.  Mutation check: the split this kernel once had (bands
    for batches up to 4 whose whole product is large, columns otherwise) fails 576 x 192 (bands only
    with several rows) and 1536 x 576 (bands only with up to 4 rows)."""
    rng = np.random.default_rng(k + n)
    w = quant.quantize(rng.standard_normal((k, n)).astype(np.float32), spec)
    x = jnp.asarray(rng.standard_normal((20, k)) * rng.uniform(0.1, 3, k), jnp.float32)
    for path in FLOAT_PATHS:
        monkeypatch.setenv(cpu.ISA_ENV, path)
        for rows in (3, 9, 20):
            together = np.asarray(jax.jit(cpu.matmul)(x[:rows], w))
            for m in range(rows):
                alone = np.asarray(jax.jit(cpu.matmul)(x[m:m + 1], w))[0]
                assert (together[m] == alone).all(), (path, rows, m)
