"""rslora.dask.rsvd and rsvd_tol: accuracy against a float64 full SVD (both routes: the Gram
and the subspace iteration), determinism, layouts, arguments.

Runs on Dask's synchronous scheduler, a threads-only LocalCluster and one module-scoped
LocalCluster of 2 worker processes: seconds in all.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import rslora  # noqa: E402
import rslora.dask  # noqa: E402

from threadpoolctl import threadpool_limits  # noqa: E402

impl = importlib.import_module("rslora.dask.rsvd")
blocks = importlib.import_module("rslora.dask.blocks")
distributed = pytest.importorskip("distributed")

SPECTRA = {
    "style": lambda n: np.exp(-np.arange(n) / 8.0),
    "facts": lambda n: (1.0 + np.arange(n)) ** -0.5,
    "noisy": lambda n: np.where(np.arange(n) < 20, 1.0, 0.0) + 0.03 * (1.0 + np.arange(n) / n),
}


@pytest.fixture(autouse=True)
def _sync():
    with dask.config.set(scheduler="synchronous"), threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def cluster():
    """2 worker processes x 1 thread (their BLAS runs 1 thread: dask sets it)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as c, \
            distributed.Client(c, set_as_default=False) as client:
        yield client


@contextlib.contextmanager
def _on(client):
    """Run rslora.dask's computations on ``client`` (its workers hold the persisted blocks)."""
    with dask.config.set(scheduler=client):
        yield


@contextlib.contextmanager
def _route(name):
    old, impl._FORCE_ROUTE = impl._FORCE_ROUTE, name
    try:
        yield
    finally:
        impl._FORCE_ROUTE = old


def _matrix(m, n, spectrum, dtype, seed=0, rank=None):
    """U diag(s) V^T with random orthonormal U, V; s from ``spectrum`` (zero beyond ``rank``)."""
    rng = np.random.default_rng(seed)
    p = min(m, n)
    U = np.linalg.qr(rng.standard_normal((m, p)))[0]
    V = np.linalg.qr(rng.standard_normal((n, p)))[0]
    s = SPECTRA[spectrum](p) if isinstance(spectrum, str) else spectrum
    if rank is not None:
        s = np.where(np.arange(p) < rank, s, 0.0)
    return ((U * s) @ V.T).astype(dtype)


def _optimum(A, k):
    s = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    return np.sqrt(np.sum(s[k:] ** 2)), s


def _check(A, U, S, Vt, k, bar=None):
    """Shapes, dtypes, orthonormality, order, signs; returns err / optimum."""
    U, S, Vt = dask.compute(U, S, Vt)
    m, n = A.shape
    assert U.shape == (m, k) and S.shape == (k,) and Vt.shape == (k, n)
    assert U.dtype == S.dtype == Vt.dtype == A.dtype
    u = np.finfo(A.dtype).eps
    U64, V64 = U.astype(np.float64), Vt.astype(np.float64)
    assert np.abs(U64.T @ U64 - np.eye(k)).max() < 20 * u * np.sqrt(m)
    assert np.abs(V64 @ V64.T - np.eye(k)).max() < 20 * u * np.sqrt(n)
    assert np.all(np.diff(S.astype(np.float64)) <= 0) and np.all(S >= 0)
    big = np.argmax(np.abs(U), axis=0)
    assert np.all(U[big, np.arange(k)] > 0)  # the sign convention of rslora.rsvd
    opt, s = _optimum(A, k)
    err = np.linalg.norm(A.astype(np.float64) - (U64 * S.astype(np.float64)) @ V64)
    # the top values are those of A to about u ||A|| plus the subspace error
    top = min(5, k)
    assert np.allclose(S[:top], s[:top], rtol=1e-3, atol=50 * u * s[0])
    if bar is not None:
        assert err <= bar * opt + 50 * u * s[0], (err / opt, bar)
    return err / opt if opt > 0 else 0.0


@pytest.mark.parametrize("route", ["gram", "iterate"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spectrum", ["style", "facts", "noisy"])
def test_auto_meets_the_contract(spectrum, dtype, route):
    A = _matrix(2000, 120, spectrum, dtype)
    X = da.from_array(A, chunks=(300, 120))  # 7 chunks, the last one shorter
    with _route(route):
        U, S, Vt = rslora.dask.rsvd(X, 16, seed=3)
    _check(A, U, S, Vt, 16, bar=1.001)
    assert U.chunks[0] == X.chunks[0]
    run = impl._LAST_RUN
    assert run["route"] == route and not run["tsqr"]
    # the Gram route: two reads; the iteration: one read per iteration
    assert run["passes"] == (2 if route == "gram" else run["n_iter"] + 1)


@pytest.mark.parametrize("route", ["gram", "iterate"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spectrum, chunks", [("facts", (500, 90)),
                                              ("noisy", ((700, 13, 1000, 387), (40, 50)))],
                         ids=["facts-even", "noisy-uneven-both-axes"])
def test_routes_on_a_cluster(cluster, spectrum, chunks, dtype, route):
    A = _matrix(2100, 90, spectrum, dtype, seed=4)
    X = da.from_array(A, chunks=chunks)
    with _on(cluster), _route(route):
        U, S, Vt = rslora.dask.rsvd(X, 12, seed=5)
        _check(A, U, S, Vt, 12, bar=1.001)
    assert impl._LAST_RUN["route"] == route and U.chunks[0] == X.chunks[0]


def test_default_route_follows_the_cost_model():
    A = _matrix(2000, 120, "facts", np.float32)
    rslora.dask.rsvd(da.from_array(A, chunks=500), 16, seed=0)  # Gram: ~2.6 reads
    assert impl._LAST_RUN["route"] == "gram"
    rslora.dask.rsvd(da.from_array(A, chunks=500), 16, n_iter=3, seed=0)  # a count: iterate
    assert impl._LAST_RUN["route"] == "iterate" and impl._LAST_RUN["n_iter"] == 3
    # a short side of 40 l: the Gram would cost more than the iterations
    assert not impl.gram.worth_it(40 * 26, 16, 26, np.float32)
    assert impl.gram.worth_it(9 * 26, 16, 26, np.float32)
    assert impl.gram.worth_it(18 * 26, 16, 26, np.float64)


def test_gram_route_reads_m_twice(monkeypatch):
    calls = []
    for name in ("gram_block", "times_block", "power_block"):
        real = getattr(blocks, name)
        monkeypatch.setattr(blocks, name,
                            lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    A = _matrix(1500, 100, "facts", np.float32)
    rslora.dask.rsvd(da.from_array(A, chunks=(300, 100)), 20, seed=0)
    assert sorted(calls) == ["gram_block"] * 5 + ["times_block"] * 5


def test_deep_tail_float64_falls_back_and_meets_the_contract():
    # s_i = e^(-i/2): at k = 40 the tail is ~1e-9 of s_1, below what the Gram resolves
    # (~sqrt(m u64) = 5e-7): the eigenvalues cannot certify the result; the iteration can
    A = _matrix(3000, 80, np.exp(-np.arange(80) / 2.0), np.float64, seed=14)
    U, S, Vt = rslora.dask.rsvd(da.from_array(A, chunks=500), 40, seed=0)
    assert impl._LAST_RUN["gram"] == "not certified" and impl._LAST_RUN["route"] == "iterate"
    _check(A, U, S, Vt, 40, bar=1.001)
    # in float32 the last read's rounding (s_1 / s_k ~ 90 here) is what the bound cannot
    # clear: whichever route runs, the contract holds
    U, S, Vt = rslora.dask.rsvd(da.from_array(A.astype(np.float32), chunks=500), 10, seed=0)
    _check(A.astype(np.float32), U, S, Vt, 10, bar=1.001)


@pytest.mark.parametrize("auto_tol", [1e-2, 1e-4])
def test_auto_tol(auto_tol):
    A = _matrix(2000, 120, "facts", np.float64)
    U, S, Vt = rslora.dask.rsvd(da.from_array(A, chunks=500), 16, seed=1, auto_tol=auto_tol)
    _check(A, U, S, Vt, 16, bar=1 + auto_tol)


@pytest.mark.parametrize("n_iter", [1, 2, 4])
def test_fixed_iterations_read_m_once_each(n_iter, monkeypatch):
    calls = []
    real = blocks.power_block
    monkeypatch.setattr(blocks, "power_block", lambda *a: calls.append(1) or real(*a))
    A = _matrix(1500, 100, "noisy", np.float32)
    X = da.from_array(A, chunks=(300, 100))
    U, S, Vt = rslora.dask.rsvd(X, 20, n_iter=n_iter, seed=0)
    assert len(calls) == (n_iter + 1) * 5
    assert impl._LAST_RUN == {"route": "iterate", "n_iter": n_iter, "passes": n_iter + 1,
                              "tsqr": False}
    # as accurate as rslora.rsvd with the same number of iterations (the same subspace in
    # exact arithmetic, a different Gaussian sketch)
    err = _check(A, U, S, Vt, 20)
    Ur, Sr, Vtr = rslora.rsvd(A, 20, n_iter=n_iter, seed=0)
    ref = np.linalg.norm(A - (Ur * Sr) @ Vtr) / _optimum(A, 20)[0]
    assert err <= 1 + 1.5 * (ref - 1) + 1e-4


@pytest.mark.parametrize("route", ["gram", "iterate"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_wide_works_on_the_transpose(route, dtype):
    A = _matrix(120, 2500, "style", dtype, seed=2)
    X = da.from_array(A, chunks=((50, 70), 600))  # column-chunked (and two row chunks)
    with _route(route):
        U, S, Vt = rslora.dask.rsvd(X, 16, seed=5)
    assert impl._LAST_RUN["route"] == route
    _check(A, U, S, Vt, 16, bar=1.001)
    assert Vt.chunks[1] == X.chunks[1] and U.chunks[0] == X.chunks[0]


def test_both_axes_chunked_and_uneven_chunks():
    A = _matrix(2100, 90, "facts", np.float64, seed=4)
    X = da.from_array(A, chunks=((700, 13, 1000, 387), (40, 50)))  # one chunk shorter than l
    U, S, Vt = rslora.dask.rsvd(X, 12, seed=5)
    _check(A, U, S, Vt, 12, bar=1.001)
    assert U.chunks[0] == X.chunks[0]


def test_every_chunk_smaller_than_l():
    A = _matrix(600, 60, "style", np.float32, seed=6)
    U, S, Vt = rslora.dask.rsvd(da.from_array(A, chunks=(17, 60)), 20, seed=1)  # l = 30
    _check(A, U, S, Vt, 20, bar=1.001)


@pytest.mark.parametrize("route", ["gram", "iterate"])
def test_same_seed_and_chunking_give_identical_bits(route):
    A = _matrix(1800, 80, "facts", np.float32, seed=7)
    X = da.from_array(A, chunks=(300, 80))
    with _route(route):
        one = dask.compute(*rslora.dask.rsvd(X, 10, seed=42))
        two = dask.compute(*rslora.dask.rsvd(X, 10, seed=42))
        for a, b in zip(one, two):
            np.testing.assert_array_equal(a, b)
        other = dask.compute(*rslora.dask.rsvd(X, 10, seed=43))
        # the Gram route draws nothing: the seed does not matter
        assert np.array_equal(one[0], other[0]) == (route == "gram")
        # a different chunking sums in another order: the same result to rounding
        again = dask.compute(*rslora.dask.rsvd(X.rechunk((450, 80)), 10, seed=42))
    np.testing.assert_allclose(again[1], one[1], rtol=1e-4)


@pytest.mark.parametrize("route", ["gram", "iterate"])
def test_worker_count_and_scheduler_do_not_change_the_bits(route, cluster):
    A = _matrix(2000, 70, "noisy", np.float64, seed=8)
    X = da.from_array(A, chunks=(250, 70))
    with _route(route):
        ref = dask.compute(*rslora.dask.rsvd(X, 12, seed=9))
        assert impl._LAST_RUN["route"] == route
        for workers in (3,):  # (1: the synchronous reference; 2: the process cluster below)
            with distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                          processes=False, dashboard_address=":0") as lc, \
                    distributed.Client(lc) as client:
                got = client.compute(list(rslora.dask.rsvd(X, 12, seed=9)), sync=True)
                for a, b in zip(ref, got):
                    np.testing.assert_array_equal(a, b)
        with dask.config.set(scheduler="threads", num_workers=4):
            got = dask.compute(*rslora.dask.rsvd(X, 12, seed=9))
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a, b)
        with _on(cluster):  # 2 worker processes
            got = dask.compute(*rslora.dask.rsvd(X, 12, seed=9))
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a, b)


def test_rank_deficient_falls_back_to_tsqr():
    A = _matrix(1200, 50, "facts", np.float64, seed=10, rank=5)
    U, S, Vt = rslora.dask.rsvd(da.from_array(A, chunks=200), 8, seed=0)
    assert impl._LAST_RUN["gram"] == "not certified"  # lam_6..8 are rounding: no V S^-1
    assert impl._LAST_RUN["tsqr"]  # the Gram of M Z is singular: no Cholesky
    _check(A, U, S, Vt, 8)
    s = _optimum(A, 8)[1]
    np.testing.assert_allclose(S[:5], s[:5], rtol=1e-10)
    assert np.all(np.asarray(S[5:]) < 1e-12 * s[0])
    np.testing.assert_allclose((np.asarray(U) * S) @ np.asarray(Vt), A, atol=1e-12)


def test_ill_conditioned_sketch_falls_back_to_tsqr():
    # n_iter=0: the one basis is M Omega, conditioned like the spectrum (1e-6 across l)
    A = _matrix(1000, 80, np.exp(-np.arange(80) / 2.0), np.float64, seed=11)
    U, S, Vt = rslora.dask.rsvd(da.from_array(A, chunks=250), 10, n_iter=0, seed=0)
    assert impl._LAST_RUN == {"route": "iterate", "n_iter": 0, "passes": 2, "tsqr": True}
    err = _check(A, U, S, Vt, 10)
    Ur, Sr, Vtr = rslora.rsvd(A, 10, n_iter=0, seed=0)
    ref = np.linalg.norm(A - (Ur * Sr) @ Vtr) / _optimum(A, 10)[0]
    assert err < 3 * ref
    # with iterations the basis is preconditioned (M V S^-1): Cholesky suffices
    rslora.dask.rsvd(da.from_array(A, chunks=250), 10, n_iter=2, seed=0)
    assert not impl._LAST_RUN["tsqr"]


@pytest.mark.parametrize("k", [1, 40])
def test_k_edges(k):
    A = _matrix(900, 40, "facts", np.float32, seed=12)
    U, S, Vt = rslora.dask.rsvd(da.from_array(A, chunks=(100, 40)), k, seed=0)
    err = _check(A, U, S, Vt, k, bar=1.001 if k < 40 else None)
    if k == 40:  # l spans the short side: exact, whatever oversample says
        assert impl._LAST_RUN["n_iter"] == 0
        np.testing.assert_allclose((np.asarray(U, np.float64) * S) @ np.asarray(Vt), A, atol=2e-5)
    assert np.isfinite(err)


def test_zero_matrix():
    U, S, Vt = rslora.dask.rsvd(da.zeros((500, 30), chunks=100, dtype=np.float32), 4, seed=0)
    U, S, Vt = dask.compute(U, S, Vt)
    assert np.all(S == 0) and np.isfinite(U).all() and np.isfinite(Vt).all()
    np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-6)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(4), atol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e25])
def test_entries_far_from_one_are_rescaled(scale):
    A = _matrix(800, 40, "style", np.float64, seed=13)
    A32 = (A * scale).astype(np.float32)
    U, S, Vt = rslora.dask.rsvd(da.from_array(A32, chunks=200), 8, seed=0)
    S = np.asarray(S, np.float64) / scale
    np.testing.assert_allclose(S, np.linalg.svd(A, compute_uv=False)[:8], rtol=1e-4)
    assert np.isfinite(np.asarray(U)).all()


def test_nan_is_refused_or_propagated():
    A = _matrix(400, 30, "facts", np.float32)
    A[123, 7] = np.nan
    X = da.from_array(A, chunks=100)
    with pytest.raises(ValueError, match=r"^M contains NaN or Inf \(pass check_finite=False"):
        rslora.dask.rsvd(X, 3, seed=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rslora.rsvd(A, 3, seed=0)  # the same message
    U, S, Vt = dask.compute(*rslora.dask.rsvd(X, 3, seed=0, check_finite=False))
    assert np.isnan(S).all()


GOOD = np.ones((40, 20), np.float32)
BAD_ARGS = [
    dict(k=0), dict(k=21), dict(k=2.0), dict(k=True), dict(k=None),
    dict(oversample=-1), dict(oversample=1.5),
    dict(n_iter=-1), dict(n_iter="fast"), dict(n_iter=1.0), dict(n_iter=2**31),
    dict(seed=-1), dict(seed=2**64), dict(seed="a"),
    dict(auto_tol=0.0), dict(auto_tol=1.0), dict(auto_tol="x"), dict(auto_tol=True),
]


@pytest.mark.parametrize("bad", BAD_ARGS, ids=lambda d: "-".join(f"{k}={v!r}" for k, v in d.items()))
def test_bad_arguments_as_rslora_rsvd(bad):
    _same_error(rslora.rsvd, rslora.dask.rsvd, "k", dict(k=3) | bad)


def _same_error(in_memory, on_dask, first: str, kwargs: dict) -> None:
    """``on_dask`` refuses these arguments with the exception and message of ``in_memory``."""
    lead = kwargs.pop(first)
    with pytest.raises((TypeError, ValueError)) as ref:
        in_memory(GOOD, lead, **kwargs)
    with pytest.raises(ref.type) as got:
        on_dask(da.from_array(GOOD, chunks=10), lead, **kwargs)
    assert str(got.value) == str(ref.value)


@pytest.mark.parametrize("M", [GOOD.astype(np.int64), np.ones((4, 5, 6), np.float32)],
                         ids=["int64", "3-D"])
def test_bad_arrays_as_rslora_rsvd(M):
    with pytest.raises((TypeError, ValueError)) as ref:
        rslora.rsvd(M, 2)
    with pytest.raises(ref.type) as got:
        rslora.dask.rsvd(da.from_array(M), 2)
    assert str(got.value) == str(ref.value)


def test_not_a_dask_array():
    with pytest.raises(TypeError, match="M must be a dask array, got ndarray"):
        rslora.dask.rsvd(GOOD, 2)


def test_importing_rslora_does_not_import_dask():
    code = "import sys, rslora; assert not any(m == 'dask' or m.startswith('dask.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- rsvd_tol -----------------------------------------------------------------------------------

def _needed_rank(A, tol):
    s = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    tails = np.sqrt(np.append(np.cumsum((s ** 2)[::-1])[::-1], 0.0) / np.sum(s ** 2))
    return int(np.argmax(tails <= tol)), tails


def _tol_check(A, res, tol):
    U, S, Vt = dask.compute(res.U, res.S, res.Vt)
    r = S.shape[0]
    assert U.shape == (A.shape[0], r) and Vt.shape == (r, A.shape[1])
    assert U.dtype == S.dtype == Vt.dtype == A.dtype
    u = np.finfo(A.dtype).eps
    A64 = A.astype(np.float64)
    err = np.linalg.norm(A64 - (U.astype(np.float64) * S) @ Vt.astype(np.float64))
    err /= np.linalg.norm(A64)
    assert abs(res.error - err) <= 1e-3 * err + 20 * u, (res.error, err)  # the reported error
    U64 = U.astype(np.float64)
    np.testing.assert_allclose(U64.T @ U64, np.eye(r), atol=20 * u * np.sqrt(A.shape[0]))
    return r, err


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spectrum", ["facts", "style"])
@pytest.mark.parametrize("tol", [0.5, 0.1, 1e-2])
def test_rsvd_tol_smallest_rank(spectrum, dtype, tol):
    A = _matrix(1500, 100, spectrum, dtype, seed=15)
    res = rslora.dask.rsvd_tol(da.from_array(A, chunks=(400, 100)), tol)
    r, err = _tol_check(A, res, tol)
    need, tails = _needed_rank(A, tol)
    assert err <= tol + 20 * np.finfo(dtype).eps
    # the smallest rank, or one more where the optimum is within rounding of tol
    assert r == need or (r == need + 1 and tails[need] > tol * (1 - 1e-5)), (r, need)
    run = impl._LAST_RUN
    assert (run["tsqr"], run["route"], run["rank"]) == (False, "gram", r)
    assert run["passes"] == 2 or err < 0.1 * tol  # + 1 to measure an error near rounding


def test_rsvd_tol_wide_and_on_a_cluster(cluster):
    A = _matrix(90, 1700, "facts", np.float32, seed=16)
    X = da.from_array(A, chunks=((40, 50), 500))
    with _on(cluster):
        res = rslora.dask.rsvd_tol(X, 0.2)
        r, err = _tol_check(A, res, 0.2)
    assert r == _needed_rank(A, 0.2)[0] and err <= 0.2
    assert res.U.chunks[0] == X.chunks[0] and res.Vt.chunks[1] == X.chunks[1]


def test_rsvd_tol_max_rank_short_of_tol():
    A = _matrix(1200, 80, "facts", np.float64, seed=17)
    res = rslora.dask.rsvd_tol(da.from_array(A, chunks=300), 0.05, max_rank=10)
    r, err = _tol_check(A, res, 0.05)
    assert r == 10 and res.error > 0.05
    np.testing.assert_allclose(err, _needed_rank(A, 0.05)[1][10], rtol=1e-9)  # the optimum


def test_rsvd_tol_rank_deficient_and_exact():
    A = _matrix(1000, 60, "facts", np.float64, seed=18, rank=7)
    # (the Gram certifies down to ~sqrt(2 r m u64) = 1.3e-6 here)
    res = rslora.dask.rsvd_tol(da.from_array(A, chunks=250), 1e-5)
    r, err = _tol_check(A, res, 1e-5)
    assert r == 7 and err < 1e-12


def test_rsvd_tol_small_tol_uses_the_residual():
    # float32, tol 1e-3: ||M||^2 - sum S^2 is within 100 u ||M||^2, so the error is measured
    A = _matrix(1200, 60, "style", np.float32, seed=19)
    res = rslora.dask.rsvd_tol(da.from_array(A, chunks=300), 1e-3)
    r, err = _tol_check(A, res, 1e-3)
    assert impl._LAST_RUN["passes"] == 3 and err <= 1e-3


def test_rsvd_tol_zero_nan_and_unreachable():
    res = rslora.dask.rsvd_tol(da.zeros((300, 20), chunks=100, dtype=np.float32), 0.1)
    assert res.U.shape == (300, 0) and res.S.shape == (0,) and res.Vt.shape == (0, 20)
    assert res.error == 0.0
    A = _matrix(400, 30, "facts", np.float32)
    A[5, 5] = np.inf
    for cf in (True, False):
        with pytest.raises(ValueError) as ref:
            rslora.rsvd_tol(A, 0.1, check_finite=cf)
        with pytest.raises(ValueError) as got:
            rslora.dask.rsvd_tol(da.from_array(A, chunks=100), 0.1, check_finite=cf)
        assert str(got.value) == str(ref.value)
    deep = _matrix(2000, 60, np.exp(-np.arange(60) / 1.0), np.float64, seed=20)
    with pytest.raises(ValueError, match=r"^tol=1e-13 is below what the float64 Gram"):
        rslora.dask.rsvd_tol(da.from_array(deep, chunks=500), 1e-13)


TOL_BAD = [
    dict(tol=0.0), dict(tol=1.0), dict(tol="x"), dict(tol=True), dict(tol=float("nan")),
    dict(max_rank=0), dict(max_rank=21), dict(max_rank=2.0),
    dict(block=0), dict(block=1.5), dict(n_iter=-1), dict(n_iter=1.0), dict(seed=-1),
]


@pytest.mark.parametrize("bad", TOL_BAD, ids=lambda d: "-".join(f"{k}={v!r}" for k, v in d.items()))
def test_rsvd_tol_bad_arguments_as_rslora_rsvd_tol(bad):
    _same_error(rslora.rsvd_tol, rslora.dask.rsvd_tol, "tol", dict(tol=0.1) | bad)


@pytest.mark.parametrize("M", [GOOD.astype(np.int64), np.ones((4, 5, 6), np.float32),
                               np.ones((0, 4), np.float32)], ids=["int64", "3-D", "empty"])
def test_rsvd_tol_bad_arrays_as_rslora_rsvd_tol(M):
    with pytest.raises((TypeError, ValueError)) as ref:
        rslora.rsvd_tol(M, 0.1)
    with pytest.raises(ref.type) as got:
        rslora.dask.rsvd_tol(da.from_array(M), 0.1)
    assert str(got.value) == str(ref.value)
    with pytest.raises(TypeError, match="M must be a dask array, got ndarray"):
        rslora.dask.rsvd_tol(GOOD, 0.1)
