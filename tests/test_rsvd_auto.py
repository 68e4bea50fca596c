"""rsvd(n_iter="auto"): stops when the rank-k result meets its accuracy contract,
||M - U S Vt||_F <= (1 + auto_tol) ||M - M_k||_F, checked against a float64 full SVD.

The matrices have known spectra (random orthogonal factors from NumPy's QR) that converge at very
different rates: a fast exponential decay ("style": one iteration is plenty), a slow power law
("facts": several), a flat block with a cliff after k, and a low-rank signal under a noise
floor. The iteration count must adapt (fewer for fast decay) and the contract must hold.
"""

from __future__ import annotations

import numpy as np
import pytest
import rslora
from rslora import _core

M_ROWS, N_COLS, K = 400, 300, 16
SPECTRA = {
    "style": lambda n: np.exp(-np.arange(n) / 2.0),
    "facts": lambda n: (1.0 + np.arange(n)) ** -0.5,
    "cliff": lambda n: np.where(np.arange(n) < K + 4, 1.0, 1e-2 * (1.0 + np.arange(n)) ** -0.5),
    "noisy low rank": lambda n: np.where(np.arange(n) < K - 4, 1.0, 0.0) + 0.03,
}


def matrix(spec, dtype, seed=0):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((M_ROWS, N_COLS)))
    V, _ = np.linalg.qr(rng.standard_normal((N_COLS, N_COLS)))
    s = SPECTRA[spec](N_COLS)
    return ((U * s) @ V.T).astype(dtype)


def ratio(M, U, S, Vt, k):
    M64 = M.astype(np.float64)
    sig = np.linalg.svd(M64, compute_uv=False)
    opt = np.sqrt(np.sum(sig[k:] ** 2))
    err = np.linalg.norm(M64 - (U.astype(np.float64) * S) @ Vt.astype(np.float64))
    return err / opt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec", list(SPECTRA))
def test_auto_meets_the_contract(spec, dtype):
    M = matrix(spec, dtype)
    for seed in range(3):
        U, S, Vt = rslora.rsvd(M, K, seed=seed)
        it = _core.rsvd_last_n_iter()
        assert 0 <= it <= 12  # 0: the sketch alone met the contract (a bound, not a guess)
        assert ratio(M, U, S, Vt, K) <= 1.001, (spec, seed, it)


def test_auto_adapts_to_the_decay():
    counts = {}
    for spec in ("style", "facts"):
        M = matrix(spec, np.float32)
        rslora.rsvd(M, K, seed=1)
        counts[spec] = _core.rsvd_last_n_iter()
    assert counts["style"] < counts["facts"], counts
    assert counts["style"] <= 2


@pytest.mark.parametrize("spec", ["facts", "style"])
def test_auto_tol_tighter_and_looser(spec):
    M = matrix(spec, np.float64, seed=3)
    got = {}
    for tol in (1e-1, 1e-3, 1e-5):
        U, S, Vt = rslora.rsvd(M, K, seed=2, auto_tol=tol)
        got[tol] = _core.rsvd_last_n_iter()
        assert ratio(M, U, S, Vt, K) <= 1 + tol, (tol, got[tol])
    assert got[1e-1] <= got[1e-3] <= got[1e-5], got
    if spec == "facts":
        assert got[1e-1] < got[1e-5], got


def test_fixed_n_iter_is_reported_and_auto_tol_ignored():
    M = matrix("facts", np.float32)
    a = rslora.rsvd(M, K, seed=4, n_iter=2, auto_tol=0.5)
    assert _core.rsvd_last_n_iter() == 2
    b = rslora.rsvd(M, K, seed=4, n_iter=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_auto_is_deterministic_per_seed():
    M = matrix("facts", np.float32)
    a = rslora.rsvd(M, K, seed=9)
    b = rslora.rsvd(M, K, seed=9)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_sketch_spanning_the_short_side_needs_no_iteration():
    M = matrix("facts", np.float64)[:, :20]
    U, S, Vt = rslora.rsvd(M, 12, seed=0)
    assert _core.rsvd_last_n_iter() == 0
    assert ratio(M, U, S, Vt, 12) <= 1 + 1e-9


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-3, float("nan"), float("inf")])
def test_auto_tol_out_of_range(bad):
    with pytest.raises(ValueError, match="auto_tol must be in \\(0, 1\\)"):
        rslora.rsvd(np.eye(8), 2, auto_tol=bad)


@pytest.mark.parametrize("bad", ["0.1", None, True])
def test_auto_tol_type(bad):
    with pytest.raises(TypeError, match="auto_tol must be a real number"):
        rslora.rsvd(np.eye(8), 2, auto_tol=bad)


def test_sketch_alone_when_the_basis_holds_all_but_a_sliver():
    # cliff: the l = k + 10 columns hold the flat block and the tail beyond it has ~1e-4 of the
    # optimum's energy, so the a-posteriori bound stops at the sketch; noisy/facts must not.
    M = matrix("cliff", np.float32)
    U, S, Vt = rslora.rsvd(M, K, seed=5)
    assert _core.rsvd_last_n_iter() == 0
    assert ratio(M, U, S, Vt, K) <= 1.001
    rslora.rsvd(matrix("facts", np.float32), K, seed=5)
    assert _core.rsvd_last_n_iter() >= 1


def test_buffers_reused_across_calls_leave_no_trace():
    # rsvd keeps its scratch per thread between calls: a call between two identical ones (other
    # shape, other dtype, other path) must not change the second one's result by a bit.
    A = matrix("facts", np.float32)
    first = rslora.rsvd(A, K, seed=7)
    rslora.rsvd(matrix("style", np.float64), K + 5, seed=1)
    rslora.rsvd(A[:50, :40], 8, seed=2, method="krylov", n_iter=2)
    rslora.rsvd(np.ones((600, 500), np.float32), 30, seed=3)
    again = rslora.rsvd(A, K, seed=7)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)


# --- The contract on many spectra, shapes, dtypes, layouts and seeds -----------------------
# Each case: (spectrum of the short side p, shape, k). The error is checked against NumPy's
# float64 SVD of the very matrix rsvd gets (its float32 rounding included); "exact low rank"
# has an optimum at float32's rounding, where the contract is judged with that rounding added.
def _spec(name, p, k):
    i = np.arange(p)
    return {
        "style": np.exp(-i / 4.0),
        "facts": (1.0 + i) ** -0.5,
        "slow": (1.0 + i) ** -0.25,
        "cliff": np.where(i < k + 4, 1.0, 1e-2 * (1.0 + i) ** -0.5),
        "noisy": np.where(i < k - 4, 1.0, 0.0) + 0.03 * (1.0 + i / p),
        "flat": np.ones(p),
        "exact low rank": np.where(i < k // 2, 1.0 / (1.0 + i), 0.0),
    }[name]


CASES = [(350, 300, 12), (120, 500, 20), (40, 33, 3), (600, 64, 8)]  # tall, wide, tiny, thin


def _matrix(name, m, n, k, dtype, seed):
    rng = np.random.default_rng(seed)
    p = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, p)))
    V, _ = np.linalg.qr(rng.standard_normal((n, p)))
    return ((U * _spec(name, p, k)) @ V.T).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["style", "facts", "slow", "cliff", "noisy", "flat",
                                  "exact low rank"])
def test_contract_on_many_spectra(name, dtype):
    for ci, (m, n, k) in enumerate(CASES):
        M = _matrix(name, m, n, k, dtype, seed=ci)
        sig = np.linalg.svd(M.astype(np.float64), compute_uv=False)
        opt = np.sqrt(np.sum(sig[k:] ** 2))
        # rounding of M's dtype (the result is in it): what any method returns on top
        floor = 30 * np.finfo(dtype).eps * np.sqrt(np.sum(sig ** 2))
        views = [M, np.asfortranarray(M), M[::-1, ::-1]]  # C, F and negative strides
        for seed in range(4):
            X = views[seed % 3] if seed < 3 else np.repeat(M, 2, axis=1)[:, ::2]  # strided
            U, S, Vt = rslora.rsvd(X, k, seed=seed)
            assert U.dtype == dtype and S.shape == (k,)
            err = np.linalg.norm(X.astype(np.float64) - (U.astype(np.float64) * S) @ Vt)
            assert err <= (1 + 1e-3) * opt + floor, (name, (m, n, k), seed,
                                                    _core.rsvd_last_n_iter(), err / opt)


def _dct_orthogonal(n, rng):
    # dense random orthogonal in O(n^2 log n) (a QR of n^2 Gaussians is slow on CI's 2 cores)
    import scipy.fft

    X = np.eye(n)
    for _ in range(2):
        X = X[rng.permutation(n)] * rng.choice([-1.0, 1.0], n)[:, None]
        X = scipy.fft.dct(X, axis=0, norm="ortho")
    return X


def test_noisy_low_rank_stops_after_the_iteration_that_suffices():
    # A rank-60 signal over a flat noise floor (bench/bench_svd.py's "noisy", 2048^2): one
    # iteration meets the contract; the uncapped estimate made 4 (each noise direction's Ritz
    # value still moves, though any noise direction is as good for the error). Counts, not time.
    # (At 1024^2 the floor holds half the energy against the same shortfall: 5 iterations.)
    rng = np.random.default_rng(0)
    n, k = 2048, 64
    s = np.sort(np.where(np.arange(n) < k - 4, 1.0, 0.0) + 0.03 * (1.0 + np.arange(n) / n))[::-1]
    U = _dct_orthogonal(n, rng).astype(np.float32)
    M = (U * s.astype(np.float32)) @ _dct_orthogonal(n, rng).astype(np.float32).T
    opt = np.sqrt(np.sum(s[k:] ** 2))
    for seed in range(2):
        fewest = next(q for q in range(6) if ratio_to(M, rslora.rsvd(M, k, n_iter=q, seed=seed),
                                                       opt) <= 1.001)
        got = rslora.rsvd(M, k, seed=seed)
        it = _core.rsvd_last_n_iter()
        assert ratio_to(M, got, opt) <= 1.001
        assert it <= fewest + 1 and it <= 2, (seed, it, fewest)


def ratio_to(M, usv, opt):
    U, S, Vt = usv
    return np.linalg.norm(M.astype(np.float64) - (U.astype(np.float64) * S) @ Vt) / opt


# --- Slow decay: "auto" continues the sketch as block Krylov ------------------------------
# Where the sketch's Ritz values decay slowly and smoothly across index k (power laws, long
# exponentials, Gaussian matrices, k large enough that subspace iteration would need several
# iterations), "auto" keeps the sketch as the first Krylov block and stops on the rule of
# rsvd_converge.cpp applied to the whole Krylov basis. The contract must hold on every such case.
SLOW = {
    "power 1/4": lambda p: (1.0 + np.arange(p)) ** -0.25,
    "power 1/2": lambda p: (1.0 + np.arange(p)) ** -0.5,
    "power 1": lambda p: (1.0 + np.arange(p)) ** -1.0,
    "exp(-i/50)": lambda p: np.exp(-np.arange(p) / 50.0),
    "power 1/2 + floor": lambda p: (1.0 + np.arange(p)) ** -0.5 + 0.05,
    "power 1/2 to a floor": lambda p: np.maximum((1.0 + np.arange(p)) ** -0.5, 0.08),
    "gaussian": None,
}
SLOW_SHAPES = [(300, 500), (480, 240), (150, 600)]  # wide, tall, small short side


def _slow_matrix(name, m, n, dtype, seed):
    rng = np.random.default_rng(seed)
    if SLOW[name] is None:
        return rng.standard_normal((m, n)).astype(dtype)
    p = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, p)))
    V, _ = np.linalg.qr(rng.standard_normal((n, p)))
    return ((U * SLOW[name](p)) @ V.T).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(SLOW))
def test_contract_on_slow_decay(name, dtype):
    krylov = 0
    for si, (m, n) in enumerate(SLOW_SHAPES):
        M = _slow_matrix(name, m, n, dtype, seed=si)
        M64 = M.astype(np.float64)
        sig = np.linalg.svd(M64, compute_uv=False)
        for k in (2, 8, 32, 64):
            if 2 * (k + 10) >= min(m, n):
                continue
            opt = np.sqrt(np.sum(sig[k:] ** 2))
            for seed in range(2):
                U, S, Vt = rslora.rsvd(M, k, seed=seed)
                path = (_core.rsvd_last_krylov(), _core.rsvd_last_n_iter())
                krylov += path[0]
                err = np.linalg.norm(M64 - (U.astype(np.float64) * S) @ Vt.astype(np.float64))
                # (the subspace path's own limits, small k and a few shapes, are its tests')
                if path[0]:
                    assert err <= 1.001 * opt, (name, (m, n, k), seed, path, err / opt)
    assert krylov >= (4 if name not in ("power 1", "exp(-i/50)") else 0), krylov


def test_facts_takes_the_krylov_path_and_fewer_passes():
    # bench_svd.py's "facts" shape of spectrum at k = 64: subspace iteration needs 4-6
    # iterations (10-14 passes), block Krylov 3 steps (8 passes) for the same contract.
    rng = np.random.default_rng(3)
    n, k = 1024, 64
    s = (1.0 + np.arange(n)) ** -0.5
    M = ((_dct_orthogonal(n, rng) * s) @ _dct_orthogonal(n, rng).T).astype(np.float32)
    opt = np.sqrt(np.sum(s[k:] ** 2))
    for seed in range(3):
        got = rslora.rsvd(M, k, seed=seed)
        assert _core.rsvd_last_krylov() and _core.rsvd_last_n_iter() <= 3
        assert ratio_to(M, got, opt) <= 1.001
    # fast decay, a cliff or a noise floor keep subspace iteration (fewest passes there)
    for spec in ("style", "cliff", "noisy low rank"):
        rslora.rsvd(matrix(spec, np.float32), K, seed=0)
        assert not _core.rsvd_last_krylov(), spec
    rslora.rsvd(M, k, seed=0, n_iter=2)
    assert not _core.rsvd_last_krylov()
    rslora.rsvd(M, k, seed=0, n_iter=2, method="krylov")
    assert _core.rsvd_last_krylov()


# --- Never a silent miss: cases where the rule once stopped early -----------------------------
# From bench/sweep_rsvd_auto.py (the matrices are built as there: U diag(s) V^T, U and V from QR
# of Gaussians keyed by (seed, m, n); rsvd's seed = seed). Each stopped above (1 + auto_tol) x
# the optimum with no warning before the rule took s_L's rise into account (rsvd_converge.cpp):
# a power law at k = 2 (s_L far below sigma_{L+1}), a decay that steps down near k, and
# oversample 0 (no Ritz value beyond k: the estimate has nothing to extrapolate from). Now each
# must meet the contract, or say it did not (RuntimeWarning naming the estimated ratio).
def _sweep_spectrum(name, p, k):
    i = np.arange(p, dtype=np.float64)
    if name.startswith("floor"):  # "floor r<d> <f>": rank k + d of 1 over a floor f (1 + i/p)
        _, d, f = name.split()
        return np.where(i < k + int(d[1:]), 1.0, 0.0) + float(f) * (1 + i / p)
    a, _, rest = name.partition(" x")
    s = (1 + i) ** -float(a)
    if rest:  # " x<f>@k<d>": times f from index k + d on
        f, d = rest.split("@k")
        s = s * np.where(i < k + int(d), 1.0, float(f))
    return s


def _sweep_matrix(name, m, n, k, dtype, seed):
    rng = np.random.default_rng([seed, m, n])
    p = min(m, n)
    U = np.linalg.qr(rng.standard_normal((m, p)))[0]
    V = np.linalg.qr(rng.standard_normal((n, p)))[0]
    return ((U * np.sort(_sweep_spectrum(name, p, k))[::-1]) @ V.T).astype(dtype)


def _met_or_warned(M, k, oversample, tol, seed):
    import warnings

    M64 = M.astype(np.float64)
    sig = np.linalg.svd(M64, compute_uv=False)
    opt = np.sqrt(np.sum(sig[k:] ** 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        U, S, Vt = rslora.rsvd(M, k, oversample=oversample, auto_tol=tol, seed=seed)
    err = np.linalg.norm(M64 - (U.astype(np.float64) * S) @ Vt.astype(np.float64))
    rnd = 10 * np.finfo(M.dtype).eps * np.sqrt(np.sum(sig ** 2))  # M's rounding, in quadrature
    met = err ** 2 <= ((1 + tol) * opt) ** 2 + rnd ** 2
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return met, warned, err / opt, _core.rsvd_last_n_iter()


EARLY_STOPS = [  # (spectrum, m, n, k, dtype, seed, oversample, auto_tol): ratio before
    ("0.5", 200, 500, 2, np.float32, 1, 10, 1e-3),  # 1.00132 after 1 iteration
    ("0.25 x0.6@k+3", 200, 500, 2, np.float32, 2, 5, 1e-3),  # 1.00675
    ("0.25 x0.6@k+0", 200, 500, 2, np.float64, 2, 5, 1e-3),  # 1.00122
    ("0.5 x0.6@k+3", 200, 500, 2, np.float32, 2, 5, 1e-3),  # 1.00190
    ("0.25 x0.3@k-2", 200, 500, 32, np.float64, 2, 0, 1e-2),  # 1.04572
    ("floor r+4 0.05", 200, 500, 32, np.float64, 1, 0, 1e-3),  # 1.00329
]


@pytest.mark.parametrize("case", EARLY_STOPS, ids=lambda c: f"{c[0]}-k{c[3]}-os{c[6]}-{c[5]}")
def test_no_silent_early_stop(case):
    name, m, n, k, dtype, seed, oversample, tol = case
    M = _sweep_matrix(name, m, n, k, dtype, seed)
    met, warned, r, it = _met_or_warned(M, k, oversample, tol, seed)
    assert met or warned, (case, r, it)
    if oversample >= 4:  # the rule has a tail of Ritz values to read rates from: it certifies
        assert met and not warned and it < 12, (case, r, it, warned)
    else:  # oversample 0: nothing to extrapolate; at the cap it must say so
        assert it < 12 or "estimated error" in warned[0], (case, r, it, warned)


def test_the_cap_is_never_silent():
    # oversample 0 at auto_tol 1e-4 on a power law: the rule cannot certify the result within
    # the 12 iterations (before: it returned 1.00044x against 1.0001x, silently). The warning
    # names the rule's estimate of the ratio, which must be above the contract and not far from
    # the truth.
    M = _sweep_matrix("0.5", 200, 400, 16, np.float64, 0)
    met, warned, r, it = _met_or_warned(M, 16, 0, 1e-4, 1)
    assert it == 12 and len(warned) == 1, (it, warned)
    assert "stopped at its iteration cap" in warned[0] and "auto_tol=0.0001" in warned[0]
    est = float(warned[0].split("estimated error ")[1].split("x")[0])
    assert est > 1 + 1e-4 and abs(est - r) < 2e-3, (est, r)
    assert _core.rsvd_last_uncertified() == pytest.approx(est, rel=1e-5)
    rslora.rsvd(M, 16, seed=1)  # a certified call resets it
    assert _core.rsvd_last_uncertified() == 0.0
