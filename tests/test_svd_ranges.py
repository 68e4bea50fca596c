"""Extreme magnitudes and extreme size arguments for rsvd, rsvd_tol, lora_from_delta and
spectrum (issue 11): finite input never gives NaN, sizes never wrap."""

from __future__ import annotations

import numpy as np
import pytest

import rslora
from rslora import _core
from testutil import make

# (dtype, magnitude of the singular values): squares of entries overflow or underflow the
# dtype (float32 entries ~1e37 gave NaN; float64 ~1e-300 made rsvd_tol see a "zero" M).
EXTREMES = [(np.float32, 2e38), (np.float32, 1e-30), (np.float32, 1e20), (np.float64, 1e300),
            (np.float64, 1e-300), (np.float64, 1e160)]


def svals(M):
    return np.linalg.svd(M.astype(np.float64), compute_uv=False)


@pytest.mark.parametrize("dtype,mag", EXTREMES)
def test_extreme_magnitudes_are_scaled_not_nan(dtype, mag):
    s = mag * np.array([1.0, 0.5, 0.25, 0.1, 1e-3])
    M = make(40, 30, s, np.float64, seed=2)
    M = M.astype(dtype)  # representable: the top value is below the dtype's max
    ref = svals(M)[:3]
    rtol = 50 * np.finfo(dtype).eps * 30
    for method in ("subspace", "krylov"):
        U, S, Vt = rslora.rsvd(M, 3, method=method, seed=0)
        assert np.isfinite(S).all() and np.isfinite(U).all() and np.isfinite(Vt).all()
        np.testing.assert_allclose(S, ref, rtol=rtol)
    res = rslora.rsvd_tol(M, 1e-2, seed=0)
    assert len(res.S) == 4  # s[4] / ||s|| = 8e-4 < 1e-2: rank 4, not 0 (underflow) or NaN
    np.testing.assert_allclose(res.S[:3], ref, rtol=rtol)
    assert res.error <= 1e-2
    A, B = rslora.lora_from_delta(M, 3, seed=0)
    assert np.isfinite(A).all() and np.isfinite(B).all()
    np.testing.assert_allclose(np.linalg.svd(B.astype(np.float64) @ A, compute_uv=False)[:3], ref,
                               rtol=rtol)
    for k in (None, 3):
        sp = rslora.spectrum(M, k, seed=0)
        assert sp.singular_values.dtype == dtype
        np.testing.assert_allclose(sp.singular_values[:3], ref, rtol=rtol)
        share = np.cumsum((s[:3] / mag) ** 2) / np.sum((s / mag) ** 2)
        np.testing.assert_allclose(sp.energy[:3], share, rtol=1e-4)
        assert sp.rank_for(0.5) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_singular_values_beyond_the_dtype_raise(dtype):
    M = np.full((20, 10), np.finfo(dtype).max / 4, dtype)  # sigma = max/4 * sqrt(200)
    for call in (lambda: rslora.rsvd(M, 2, seed=0), lambda: rslora.rsvd_tol(M, 0.1, seed=0),
                 lambda: rslora.lora_from_delta(M, 2, seed=0), lambda: rslora.spectrum(M),
                 lambda: rslora.spectrum(M, 2, seed=0)):
        with pytest.raises(ValueError, match=f"overflow {np.dtype(dtype)}"):
            call()


def test_nan_and_inf_still_named():
    M = np.ones((20, 10), np.float32)
    M[3, 4] = np.nan
    for call in (lambda: rslora.rsvd(M, 2), lambda: rslora.rsvd_tol(M, 0.1)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            call()
    U, S, Vt = rslora.rsvd(M, 2, check_finite=False, seed=0)
    assert np.isnan(S).all()


def test_huge_size_arguments_do_not_wrap():
    M = make(30, 20, 1.0 / (1 + np.arange(20)), np.float64, seed=1)
    full = rslora.rsvd(M, 5, oversample=15, seed=3)
    for over in (2**63 - 1, 2**64, 2**200):  # l = min(k + oversample, 20) = 20 for all
        got = rslora.rsvd(M, 5, oversample=over, seed=3)
        for a, b in zip(got, full):
            np.testing.assert_array_equal(a, b)
    # the core guards itself too (k + oversample computed without overflow)
    got = _core.rsvd(M, 5, 2**63 - 1, -1, "subspace", "qr", 3, True)
    np.testing.assert_array_equal(got[1], full[1])
    assert _core.rsvd_auto_iters("subspace", 30, 20, 5, 2**63 - 1) == 0
    want = rslora.rsvd_tol(M, 0.1, block=20, seed=3)
    for block in (2**62, 2**63 - 1, 2**80):
        got = rslora.rsvd_tol(M, 0.1, block=block, seed=3)
        assert got.error == want.error and np.array_equal(got.S, want.S)
    got = _core.rsvd_tol(M, 0.1, 20, 2**62, 2, 3, True)
    assert np.array_equal(got[1], want.S)


@pytest.mark.parametrize("call,name", [
    (lambda M: rslora.rsvd(M, 2**63), "k"),
    (lambda M: rslora.rsvd(M, -2**70), "k"),
    (lambda M: rslora.rsvd(M, 2, n_iter=2**31), "n_iter"),
    (lambda M: rslora.rsvd(M, 2, oversample=-1), "oversample"),
    (lambda M: rslora.rsvd_tol(M, 0.1, n_iter=2**40), "n_iter"),
    (lambda M: rslora.rsvd_tol(M, 0.1, max_rank=2**64), "max_rank"),
    (lambda M: rslora.rsvd_tol(M, 0.1, block=0), "block"),
    (lambda M: rslora.rsvd_tol(M, 0.1, block=-2**63), "block"),
    (lambda M: rslora.lora_from_delta(M, 2**64), "r"),
    (lambda M: rslora.lora_from_delta(M, tol=0.1, max_rank=2**63), "max_rank"),
    (lambda M: rslora.spectrum(M, 2**64), "k"),
    (lambda M: rslora.rsvd(M, 2, seed=2**64), "seed"),
])
def test_out_of_range_sizes_name_the_argument(call, name):
    M = np.ones((6, 5))
    with pytest.raises(ValueError, match=rf"^{name} must"):
        call(M)


def test_lora_from_delta_factors_near_the_float64_limit():
    # found by tests/test_fuzz_ops.py: sqrt(S / |s|) overflowed in the quotient (S = 4.5e307,
    # s = 0.125) although the factors, sqrt(S) / sqrt(|s|) ~ 1.9e154, are representable
    M = np.array([[4.49423284e307]])
    A, B = rslora.lora_from_delta(M, 1, scale=0.125, seed=0)
    np.testing.assert_allclose(0.125 * B @ A, M, rtol=1e-15)
    with pytest.raises(ValueError, match="too small for this delta"):
        rslora.lora_from_delta(np.float32(3e38) * np.ones((1, 1), np.float32), 1, scale=1e-60)
