"""Small calls inside rsvd/rsvd_tol run on one BLAS thread (issue 13 item 5).

The one-thread scopes must change speed only: the BLAS thread count NumPy sees is the same after
every call (also under threadpoolctl limits and with calls from several Python threads at once),
and the results equal those with the scopes disabled: bit for bit in float32; in float64 to a few
ulps, because OpenBLAS's own dgemm with a long inner dimension rounds differently at 1 and 2
threads (measured with NumPy alone: `Q.T @ W`, Q and W 1024 x 74 float64, differs by 7e-14
between threadpool_limits(1) and (2); the sgemm and all other calls here were bit-identical).
"""


import numpy as np
import pytest

import rslora
from rslora import _core
from testutil import run_in_threads

threadpoolctl = pytest.importorskip("threadpoolctl")


def _openblas_info():
    for info in threadpoolctl.threadpool_info():
        if info.get("internal_api") == "openblas":
            return info
    return None


def _version_tuple(text):
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@pytest.fixture
def scopes_off():
    prev = _core._blas_single_thread_scopes(False)
    try:
        yield
    finally:
        _core._blas_single_thread_scopes(prev)


def _spectrum_matrix(m, n, dtype, seed, decay):
    rng = np.random.default_rng(seed)
    p = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, p)))
    V, _ = np.linalg.qr(rng.standard_normal((n, p)))
    s = decay(np.arange(p))
    return ((U * s) @ V.T).astype(dtype)


def _assert_same(got, ref, M):
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == np.float32:
            np.testing.assert_array_equal(a, b)
        else:  # factors' entries are O(1); S is O(||M||): 64 ulps of that scale
            scale = np.abs(b).max() if a.ndim == 1 else 1.0
            np.testing.assert_allclose(a, b, rtol=0, atol=64 * np.finfo(a.dtype).eps * scale)


def _rsvd_cases():
    cases = []
    for dtype in (np.float32, np.float64):
        for shape in ((300, 200), (180, 420)):
            cases.append((dtype, shape, dict()))  # n_iter="auto": ritz values + small SVD
            cases.append((dtype, shape, dict(n_iter=2)))
            cases.append((dtype, shape, dict(n_iter=2, normalizer="lu")))
            cases.append((dtype, shape, dict(n_iter=2, method="krylov")))
    return cases


@pytest.mark.parametrize("dtype,shape,kw", _rsvd_cases())
def test_rsvd_bit_identical_without_scopes(dtype, shape, kw):
    M = _spectrum_matrix(*shape, dtype, 7, lambda i: (1.0 + i) ** -0.5)
    with_scopes = rslora.rsvd(M, 12, seed=3, **kw)
    prev = _core._blas_single_thread_scopes(False)
    try:
        without = rslora.rsvd(M, 12, seed=3, **kw)
    finally:
        _core._blas_single_thread_scopes(prev)
    _assert_same(with_scopes, without, M)
    # and the factors are a real rank-12 approximation (the comparison is not of two garbages)
    U, S, Vt = with_scopes
    M64 = M.astype(np.float64)
    opt = np.linalg.svd(M64, compute_uv=False)
    err = np.linalg.norm(M64 - (U * S) @ Vt)
    assert err <= 1.05 * np.sqrt(np.sum(opt[12:] ** 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rsvd_tol_bit_identical_without_scopes(dtype):
    M = _spectrum_matrix(260, 340, dtype, 11, lambda i: np.exp(-i / 10.0))
    a = rslora.rsvd_tol(M, 1e-3, block=8, seed=5)
    prev = _core._blas_single_thread_scopes(False)
    try:
        b = rslora.rsvd_tol(M, 1e-3, block=8, seed=5)
    finally:
        _core._blas_single_thread_scopes(prev)
    assert a[0].shape == b[0].shape  # the same rank chosen
    np.testing.assert_allclose(a[3], b[3], rtol=1e-9)
    _assert_same(a[:3], b[:3], M)


def test_setter_found_on_new_openblas():
    info = _openblas_info()
    if info is None or "openblas" not in rslora._core.blas_info()["path"].lower():
        pytest.skip("the bound BLAS is not OpenBLAS")
    assert _core.blas_has_local_thread_setter() == (_version_tuple(info["version"]) >= (0, 3, 27))


def _blas_threads():
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def test_numpy_thread_count_unchanged_after_calls():
    M = np.random.default_rng(0).standard_normal((400, 300)).astype(np.float32)
    before = _blas_threads()
    rslora.rsvd(M, 20, seed=1)
    rslora.rsvd(M, 20, seed=1, method="krylov", n_iter=2)
    rslora.rsvd_tol(M, 0.5, block=8, seed=1)
    assert _blas_threads() == before
    if before:
        assert _core.blas_num_threads() == before[0]


def test_thread_count_under_limits_restored_to_the_limit():
    M = np.random.default_rng(1).standard_normal((300, 300))
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        rslora.rsvd(M, 10, seed=2)
        assert _blas_threads() and set(_blas_threads()) == {1}
    before = _blas_threads()
    rslora.rsvd(M, 10, seed=2)
    assert _blas_threads() == before


def test_concurrent_calls_restore_the_count():
    # Scopes opened and closed from several threads at once (the GIL is released in rsvd) must
    # leave the count NumPy set, never a 1 saved by a scope that opened inside another.
    before = _blas_threads()
    M = np.random.default_rng(2).standard_normal((256, 200)).astype(np.float32)
    ref = rslora.rsvd(M, 8, seed=4)

    def work():
        for _ in range(15):
            out = rslora.rsvd(M, 8, seed=4)
            for a, b in zip(out, ref):
                np.testing.assert_array_equal(a, b)

    run_in_threads(work)
    assert _blas_threads() == before
