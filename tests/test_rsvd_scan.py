"""The read of M before rsvd's passes (max|M|, ||M||_F^2, the NaN/Inf check), on every kernel path.

The scan is compiled once per SIMD path (AVX-512, AVX2, baseline) with the same lanes and the same
folding order, so every path must give the same bits; ||M||_F^2 must be summed in float64 (rsvd_tol
divides by it: its reported error carries its bits); a NaN or Inf anywhere, in the vectorized body
of a row or in its tail, must be found with the same message. Paths the CPU lacks are skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import rslora

PATHS = ["avx512", "avx2", "baseline"]
MSG = r"^M contains NaN or Inf \(pass check_finite=False to skip this check\)$"


def _paths():
    return [p for p in PATHS if not rslora.kernel_paths()[p]]


def _layouts(M):
    """M in views the core reads in place: by rows, by columns, with gaps between rows or columns."""
    return {"C": M, "F": np.asfortranarray(M), "row gaps": np.repeat(M, 2, axis=0)[::2],
            "column gaps": np.asfortranarray(np.repeat(M, 2, axis=1))[:, ::2]}


@pytest.mark.parametrize("n", [3, 31, 32, 33, 70, 97])
def test_same_bits_on_every_path(n):
    rng = np.random.default_rng(n)
    M = (rng.standard_normal((40, n)) * np.linspace(0.1, 3.0, n)).astype(np.float32)
    for name, X in _layouts(M).items():
        got = {}
        for p in _paths():
            with rslora.use_kernel_path(p):
                # rsvd_tol's reported error is sqrt(E / ||M||_F^2): a bit of the sum shows in it
                got[p] = (rslora.rsvd_tol(X, 0.5, max_rank=2, n_iter=0, seed=1),
                          rslora.rsvd(X, 2, seed=1))
        first = got[_paths()[0]]
        for p, (tol_res, res) in got.items():
            assert tol_res.error == first[0].error, (name, p)
            for a, b in zip(tuple(tol_res[:3]) + tuple(res), tuple(first[0][:3]) + tuple(first[1])):
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {p}")


@pytest.mark.parametrize("path", PATHS)
def test_sum_of_squares_is_float64(path):
    """||M||_F^2 of 4M entries: a float32 sum, even in 32 lanes, is 5e-4 too large here.

    M = 0.1 (ones) + 0.1 (a zero-sum sign pattern, orthogonal to the ones) has two equal singular
    values, so the best rank-1 error is exactly sqrt(1/2) of ||M||_F; rsvd_tol reports it as
    sqrt((||M||^2 - ||B||^2) / ||M||^2) with ||M||^2 from the scan (||B||^2 is float32 work:
    the reported error is within ~2e-6 of the truth).
    """
    if rslora.kernel_paths()[path]:
        pytest.skip(rslora.kernel_paths()[path])
    m, n = 2048, 2048
    signs = np.where((np.arange(m)[:, None] + np.arange(n)[None, :]) % 2 == 0, 1.0, -1.0)
    M = (0.1 + 0.1 * signs).astype(np.float32)  # entries 0.2 and 0.0
    with rslora.use_kernel_path(path):
        res = rslora.rsvd_tol(M, 0.9, max_rank=1, n_iter=1, seed=0)
    assert len(res.S) == 1
    assert abs(res.error - np.sqrt(0.5)) <= 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("n", [5, 32, 45, 100])
def test_non_finite_found_anywhere(path, bad, n):
    if rslora.kernel_paths()[path]:
        pytest.skip(rslora.kernel_paths()[path])
    rng = np.random.default_rng(3)
    M0 = rng.standard_normal((9, n)).astype(np.float32)
    with rslora.use_kernel_path(path):
        for j in sorted({0, n // 2, n - 1}):  # first entry, inside the vector body, the row's tail
            M = M0.copy()
            M[4, j] = bad
            for X in _layouts(M).values():
                with pytest.raises(ValueError, match=MSG):
                    rslora.rsvd(X, 2, seed=0)
                with pytest.raises(ValueError, match="NaN or Inf"):
                    rslora.rsvd_tol(X, 0.1, seed=0)
                U, S, Vt = rslora.rsvd(X, 2, seed=0, check_finite=False)
                assert np.isnan(S).all()


@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (123, 123)])
def test_sign_convention_tall_and_wide(shape):
    """In every column of U the first entry of largest magnitude is positive (U is row-major: the
    convention is found a row at a time), and the factors still reproduce the approximation."""
    rng = np.random.default_rng(sum(shape))
    p = min(shape)
    Ul, _ = np.linalg.qr(rng.standard_normal((shape[0], p)))
    Vr, _ = np.linalg.qr(rng.standard_normal((shape[1], p)))
    M = ((Ul * np.exp(-np.arange(p) / 2.0)) @ Vr.T).astype(np.float32)
    U, S, Vt = rslora.rsvd(M, 6, seed=2)
    for j in range(U.shape[1]):
        i = int(np.argmax(np.abs(U[:, j])))  # argmax: the first on ties
        assert U[i, j] > 0
    M64 = M.astype(np.float64)
    s = np.linalg.svd(M64, compute_uv=False)
    err = np.linalg.norm(M64 - (U.astype(np.float64) * S) @ Vt)
    assert err <= 1.001 * np.sqrt(np.sum(s[6:] ** 2))  # n_iter="auto"'s contract
