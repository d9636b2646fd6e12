"""HQQ on one tensor: lower weight error than RTN on heavy-tailed weights, against a plain float64
numpy transcription of the half-quadratic loop, in RTN's storage format, and bad inputs."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from cascade import quant
from cascade.quant.hqq import hqq_quantize
from cascade.quant.spec import parse_spec
from tests.quant import reference


@functools.lru_cache(maxsize=None)
def _heavy_tailed():
    """A (512, 256) kernel with Student-t (4 degrees of freedom) entries: a few large outliers."""
    return (np.random.default_rng(0).standard_t(4, size=(512, 256)) * 0.02).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _hqq_and_rtn(spec):
    w = _heavy_tailed()
    return hqq_quantize(w, spec), quant.quantize(w, spec)


def _rel(w, qt):
    """Relative Frobenius error of ``qt`` (dequantized in float64 from its bytes) against ``w``."""
    return np.linalg.norm(reference.dequantize_ref(qt) - w) / np.linalg.norm(w)


# measured HQQ/RTN ratios of the relative Frobenius error on this matrix (seeds 0-3 agree to +-0.02):
# 0.958, 0.941, 0.922, 0.973, 0.922, 0.941 (symmetric: with the scale floor that keeps the largest
# weights on the grid; without it 0.972, 0.909, 0.792); each bound sits ~half-way between the measurement and 1
@pytest.mark.parametrize("spec, bound", [("int4-g64-asym", 0.975), ("int3-g32-asym", 0.96), ("int2-g16-asym", 0.95),
                                         ("int4-g32", 0.985), ("int3-g32", 0.96), ("int4", 0.97)])
def test_lower_error_than_rtn(spec, bound):
    w = _heavy_tailed()
    hqq, rtn = _hqq_and_rtn(spec)
    ratio = _rel(w, hqq) / _rel(w, rtn)
    assert ratio < bound, (spec, ratio)


@pytest.mark.parametrize("spec", ["int4-g64-asym", "int3-g32"])
def test_lp_objective_never_worse_than_rtn_per_group(spec):
    """Each group keeps its best iterate, the RTN start included: its sum |W - W_hat|^0.7 does not go up."""
    w = _heavy_tailed()
    hqq, rtn = _hqq_and_rtn(spec)
    p = parse_spec(spec)
    e_h = np.abs(reference.dequantize_ref(hqq) - w) ** 0.7
    e_r = np.abs(reference.dequantize_ref(rtn) - w) ** 0.7
    per_group = lambda e: e.reshape(-1, p.group_size, e.shape[1]).sum(1)  # noqa: E731  (axis 0, K % g == 0)
    gh, gr = per_group(e_h), per_group(e_r)
    assert (gh <= gr * (1 + 1e-4) + 1e-6).all(), float((gh - gr).max())
    assert (gh < gr * 0.999).mean() > 0.5  # and most groups improve


@pytest.mark.parametrize("spec", ["int4", "int4-g32", "int3-g32", "int3-g32-full"])
def test_symmetric_fit_keeps_the_largest_weights_on_the_grid(spec):
    """The scale never shrinks below max|W| / (qmax + 1/2) (per sign): each group's largest weight is
    within half a step of its dequantized value, where an unconstrained l_p fit clipped outliers."""
    w = _heavy_tailed()
    qt = hqq_quantize(w, spec)
    p = parse_spec(spec)
    g = p.group_size or w.shape[0]
    err = np.abs(reference.dequantize_ref(qt) - w).reshape(-1, g, w.shape[1])
    scale = np.asarray(qt.scale, np.float64).reshape(-1, w.shape[1])
    at_max = np.take_along_axis(err, np.abs(w).reshape(-1, g, w.shape[1]).argmax(1)[:, None], 1)[:, 0]
    tol = (max(p.qmax, -p.qmin) + 1) * 2.0 ** -11  # the scale is stored rounded to float16
    assert (at_max <= scale * (0.5 + tol)).all(), float((at_max / scale).max())
    rtn = quant.quantize(w, spec)
    assert (scale < np.asarray(rtn.scale, np.float64).reshape(scale.shape) * 0.999).any()  # still free to shrink


def _rtn_params(v, spec):
    """Min-max scale (float16, rounded up so the range fits) and zero point of one group, float64."""
    lo, hi = v.min(), v.max()
    if spec.symmetric:
        s = max(-lo, hi) / (spec.qmax + 0.5 if spec.full_range else spec.qmax)  # full grid: absmax / (qmax + 1/2)
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = (hi - lo) / (spec.qmax - spec.qmin)
    s = s if s > 0 else 1.0
    s16 = np.float16(s)
    if float(s16) < s:
        s16 = np.nextafter(s16, np.float16(np.inf))
    s = float(s16)
    z = None if spec.symmetric else float(np.clip(np.round(-lo / np.float32(s)), spec.qmin, spec.qmax))
    return s, z


def hqq_group_reference(v, spec, iters=20, p=0.7, beta=10.0, kappa=1.01):
    """The half-quadratic loop on one group ``v`` (1-D), float64: returns (codes, scale, zero)."""
    s, z = _rtn_params(v, spec)

    def codes(s, z):
        return np.clip(np.round(v / s + (z or 0.0)), spec.qmin, spec.qmax)

    def err(s, z):
        return np.sum(np.abs(v - (codes(s, z) - (z or 0.0)) * s) ** p)

    def shrink(x, beta):
        out = np.zeros_like(x)
        nz = x != 0
        out[nz] = np.sign(x[nz]) * np.maximum(np.abs(x[nz]) - np.abs(x[nz]) ** (p - 1) / beta, 0.0)
        return out

    start = (s, z)
    best, best_err = start, np.inf
    for _ in range(iters):
        if err(s, z) < best_err:
            best, best_err = (s, z), err(s, z)
        q = codes(s, z)
        w_e = shrink(v - (q - (z or 0.0)) * s, beta)
        if spec.symmetric:  # least-squares scale of the shrunk target on the codes, the largest weights kept on the grid
            den = np.sum(q * q)
            new = np.sum(q * (v - w_e)) / den if den > 0 else np.nan
            floor = max(max(v.max(), 0.0) / (spec.qmax + 0.5), -min(v.min(), 0.0) / (-spec.qmin + 0.5))
            s = max(new, floor) if np.isfinite(new) else s
        else:  # the zero point: mean(Q - (W - W_e) / s)
            z = float(np.mean(q - (v - w_e) / s))
        beta *= kappa
    if err(s, z) < best_err:
        best = (s, z)
    if spec.symmetric:  # store in float16; keep the start if that rounding scores worse
        stored = (float(np.float16(best[0])), None)
    else:
        stored = (best[0], float(np.float16(best[1])))
    if not (np.isfinite(stored[0]) and stored[0] > 0) or err(*stored) > err(*start):
        stored = start
    return codes(*stored), stored[0], stored[1]


def _compare_with_reference(w, qt, axis, groups):
    """Codes and parameters of ``qt`` against :func:`hqq_group_reference` on the given groups."""
    p = qt.spec
    got_q = reference.unpack(np.asarray(qt.packed), p.bits, w.shape[axis], axis) - p.code_offset
    got_s = np.asarray(qt.scale, np.float64)
    got_z = None if qt.zero is None else np.asarray(qt.zero, np.float64)
    same, n, param_err = 0, 0, []
    for idx in groups:
        pidx = reference._param_index(idx, p.granularity, p.group_size, axis)
        q, s, z = hqq_group_reference(w[idx].astype(np.float64), p)
        same += int((got_q[idx] == q).sum())
        n += q.size
        if p.symmetric:
            param_err.append(abs(got_s[pidx] - s) / s)
        else:
            assert got_s[pidx] == s  # the scale is RTN's
            param_err.append(abs(got_z[pidx] - z))
    # float32 against float64 may round a value on a .5 boundary the other way, which nudges that
    # group's later iterates: compare codes (almost all equal) and the parameters (almost all exact)
    param_err = np.asarray(param_err)
    assert same / n > 0.99, same / n
    assert np.mean(param_err <= 1e-3) > 0.95, np.sort(param_err)[-5:]
    assert param_err.max() < 0.05, param_err.max()


@pytest.mark.parametrize("spec, shape, axis", [("int4-g32-asym", (100, 24), 0), ("int2-g16-asym", (24, 70), 1),
                                               ("int4-tensor", (40, 24), 1)])
def test_equals_the_float64_reference(spec, shape, axis):
    rng = np.random.default_rng(5)
    w = (rng.standard_t(4, size=shape) * 0.02).astype(np.float32)  # K % g != 0: a short last group
    p = parse_spec(spec)
    _compare_with_reference(w, hqq_quantize(w, spec, axis=axis), axis,
                            list(reference.groups(w.shape, p.granularity, p.group_size, axis)))


@pytest.mark.parametrize("spec", ["int4-g64-asym", "int3-g32-asym", "int3-g32", "int4"])
def test_equals_the_float64_reference_on_sampled_groups(spec):
    """The (512, 256) results of the RTN comparison, on 64 random groups (groups are independent)."""
    w = _heavy_tailed()
    p = parse_spec(spec)
    groups = list(reference.groups(w.shape, p.granularity, p.group_size, 0))
    pick = np.random.default_rng(6).choice(len(groups), size=min(64, len(groups)), replace=False)
    _compare_with_reference(w, _hqq_and_rtn(spec)[0], 0, [groups[i] for i in pick])


@pytest.mark.parametrize("spec", ["int4-g64-asym", "int3-g32-asym", "int2-g16-asym", "int4-g32", "int3-g32", "int4"])
def test_same_format_as_rtn(spec):
    w = _heavy_tailed()
    qt, rtn = _hqq_and_rtn(spec)
    p = parse_spec(spec)
    assert (qt.spec, qt.shape, qt.axis, qt.dtype) == (rtn.spec, rtn.shape, rtn.axis, rtn.dtype)
    assert (qt.packed.shape, qt.packed.dtype) == (rtn.packed.shape, rtn.packed.dtype)
    assert (qt.scale.shape, qt.scale.dtype) == (rtn.scale.shape, jnp.float16)
    assert (qt.zero is None) == p.symmetric and (qt.zero is None or qt.zero.shape == rtn.zero.shape)
    assert qt.nbytes == rtn.nbytes == quant.storage_nbytes(w.shape, spec)
    assert bool(jnp.isfinite(qt.scale).all()) and bool((qt.scale > 0).all())
    if qt.zero is not None:
        assert bool(jnp.isfinite(qt.zero).all())
        assert not bool((qt.zero == jnp.round(qt.zero)).all())  # real zero points, not RTN's integers
    u = reference.unpack(np.asarray(qt.packed), p.bits, w.shape[0], 0)
    assert u.min() - p.code_offset >= p.qmin and u.max() - p.code_offset <= p.qmax
    if spec in ("int2-g16-asym", "int4"):  # (the others would only add dequantize compiles)
        # the round trip: our dequantize agrees with the float64 dequantizer reading the documented layout
        xh = np.asarray(quant.dequantize(qt, jnp.float32), np.float64)
        np.testing.assert_allclose(xh, reference.dequantize_ref(qt), rtol=1e-6, atol=1e-7)


def test_iters_zero_is_rtn_and_scale_dtype():
    w = _heavy_tailed()
    for spec in ("int4-g64-asym", "int3-g32"):  # the RTN results are cached; only HQQ compiles again
        np.testing.assert_array_equal(reference.dequantize_ref(hqq_quantize(w, spec, iters=0)),
                                      reference.dequantize_ref(_hqq_and_rtn(spec)[1]))
    qt = hqq_quantize(w[:64, :16], "int4-g32-asym", scale_dtype="float32")
    assert qt.scale.dtype == jnp.float32 and qt.zero.dtype == jnp.float32


@pytest.mark.parametrize("w, spec, kwargs, match", [
    (np.arange(64).reshape(8, 8), "int4", {}, "floating-point"),
    (np.full((8, 8), np.nan, np.float32), "int4", {}, "NaN/Inf"),
    (np.ones((8, 8), np.float32), "bf16", {}, "float spec"),
    (np.ones((8, 8), np.float32), "int5", {}, "unknown precision spec"),
    (np.ones((8, 8), np.float32), "int4", {"axis": 2}, "axis"),
    (np.ones((8, 8), np.float32), "int4", {"scale_dtype": "int8"}, "scale_dtype"),
    (np.ones((8, 8), np.float32), "int4", {"lp_norm": 1.5}, "lp_norm"),
    (np.ones((8, 8), np.float32), "int4", {"beta": 0.0}, "beta"),
    (np.ones((8, 8), np.float32), "int4", {"kappa": 0.5}, "kappa"),
    (np.ones((8, 8), np.float32), "int4", {"iters": -1}, "iters"),
    (np.full((40, 24), 1e9, np.float32), "int4-tensor", {"axis": 1}, "overflow.*float32"),  # compiled above
])
def test_bad_input(w, spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hqq_quantize(w, spec, **kwargs)
