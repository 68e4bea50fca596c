"""Property tests (hypothesis) over every public op, against float64 NumPy references.

Hypothesis draws the shapes (0 and 1 included), dtypes, layouts (C, Fortran, strided, reversed
axes, read-only), scales, ids and where NaN/Inf go; the values come from a NumPy generator
seeded by hypothesis (fast, and reproducible from the failing example).

Error bounds are derived from the algorithm, not tuned: a sum of k products computed in
precision u is off by at most ~k u sum|terms| (Higham, gamma_k), so every comparison is
``|got - ref| <= (k + c) * eps * (the same expression on absolute values)`` with k the longest
chain of sums in the op (d_in + r for the forward, and so on).

Examples per property: RSLORA_FUZZ_EXAMPLES (default 150; CI and a soak run can raise it).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import rslora

EXAMPLES = int(os.environ.get("RSLORA_FUZZ_EXAMPLES", "150"))
settings.register_profile(
    "rslora-fuzz", max_examples=EXAMPLES, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ = settings.get_profile("rslora-fuzz")

DTYPES = st.sampled_from([np.float32, np.float64])
LAYOUTS = st.sampled_from(["C", "F", "strided", "reversed", "readonly"])
SIZE = st.integers(0, 7)
POS = st.integers(1, 7)


def place(values: np.ndarray, dtype, layout: str) -> np.ndarray:
    """values (float64) as a dtype array in the given memory layout, same logical content."""
    v = values.astype(dtype)
    nd = v.ndim
    if layout == "F":
        return np.asfortranarray(v)
    if layout == "strided":
        big = np.zeros(tuple(2 * s + 1 for s in v.shape), dtype)
        view = big[tuple(slice(1, None, 2) for _ in range(nd))]
        view[...] = v
        return view
    if layout == "reversed":
        buf = np.empty(v.shape, dtype)
        view = buf[tuple(slice(None, None, -1) for _ in range(nd))]
        view[...] = v
        return view
    a = np.ascontiguousarray(v)
    if layout == "readonly":
        a.flags.writeable = False
    return a


def writable(layout: str) -> str:
    return "C" if layout == "readonly" else layout


@st.composite
def arrays(draw, shape, dtype, scale=1.0):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return place(rng.standard_normal(shape) * scale, dtype, draw(LAYOUTS))


def f64(a):
    return np.array(a, dtype=np.float64)  # a copy: the ops under test write in place


def eps(dtype) -> float:
    return float(np.finfo(dtype).eps)


def assert_within(got, ref, bound, what):
    """|got - ref| <= bound elementwise (bound from the magnitudes of the terms summed).

    The relative model fl(a op b) = (a op b)(1 + d) misses underflow: a product or sum that lands
    among the subnormals also carries an absolute error of up to half the smallest subnormal, and
    later products scale it by the other operands (standard normal, sums of <= 7 terms here). A
    few thousand smallest subnormals cover that and stay far below any real error."""
    underflow = 4096 * float(np.finfo(got.dtype).smallest_subnormal)
    got = f64(got)
    assert got.shape == ref.shape, what
    bound = bound + underflow
    err = np.abs(got - ref)
    worst = np.argmax(err - bound) if err.size else None
    assert np.all(err <= bound), (what, float(err.flat[worst]), float(bound.flat[worst]))


SCALES = st.one_of(st.floats(-4, 4, allow_nan=False), st.sampled_from([0.0, -0.0, 1.0]))


# --- lora_linear ---------------------------------------------------------------------------

@FUZZ
@given(data=st.data(), dtype=DTYPES, n=SIZE, d_in=SIZE, d_out=SIZE, r=SIZE, s=SCALES,
       batched=st.booleans(), with_bias=st.booleans(), out_layout=st.sampled_from(
           [None, "C", "F", "reversed", "strided"]))
def test_lora_linear(data, dtype, n, d_in, d_out, r, s, batched, with_bias, out_layout):
    batch = (n, 2) if batched else (n,)
    x = data.draw(arrays(batch + (d_in,), dtype))
    W, A, B = (data.draw(arrays(sh, dtype)) for sh in [(d_out, d_in), (r, d_in), (d_out, r)])
    b = data.draw(arrays((d_out,), dtype)) if with_bias else None
    out = None if out_layout is None else place(np.zeros(batch + (d_out,)), dtype, out_layout)
    y, xa = rslora.lora_linear(x, W, A, B, scale=s, bias=b, out=out, return_xa=True)
    if out is not None:
        assert y is out
    assert y.dtype == dtype and xa.dtype == dtype
    X, Wd, Ad, Bd = map(f64, (x, W, A, B))
    s_t = float(np.asarray(s, dtype))  # the scale as the dtype holds it
    bias = 0.0 if b is None else f64(b)
    ref = X @ Wd.T + bias + s_t * (X @ Ad.T) @ Bd.T
    mag = np.abs(X) @ np.abs(Wd).T + np.abs(bias) + abs(s_t) * (np.abs(X) @ np.abs(Ad).T) @ np.abs(Bd).T
    assert_within(y, ref, (d_in + r + 4) * eps(dtype) * mag, "y")
    assert_within(xa, X @ Ad.T, (d_in + 2) * eps(dtype) * (np.abs(X) @ np.abs(Ad).T), "xa")


@FUZZ
@given(data=st.data(), dtype=DTYPES, n=POS, d_in=POS, d_out=POS, r=SIZE,
       where=st.sampled_from(["x", "W", "A", "B"]), bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       s=SCALES)
def test_lora_linear_nan_inf_as_numpy(data, dtype, n, d_in, d_out, r, where, bad, s):
    arrs = {"x": data.draw(arrays((n, d_in), dtype)), "W": data.draw(arrays((d_out, d_in), dtype)),
            "A": data.draw(arrays((r, d_in), dtype)), "B": data.draw(arrays((d_out, r), dtype))}
    tgt = np.array(arrs[where])
    if tgt.size == 0:
        return
    i = data.draw(st.integers(0, tgt.size - 1))
    tgt.flat[i] = bad
    arrs[where] = tgt
    y = rslora.lora_linear(arrs["x"], arrs["W"], arrs["A"], arrs["B"], scale=s)
    X, Wd, Ad, Bd = (f64(arrs[k]) for k in "xWAB")
    with np.errstate(invalid="ignore", over="ignore"):
        ref = X @ Wd.T + float(np.asarray(s, dtype)) * (X @ Ad.T) @ Bd.T
    # which entries are NaN and which are +-Inf does not depend on the order of the sums
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(ref))


@FUZZ
@given(data=st.data(), dtype=DTYPES, n=POS, d=POS)
def test_out_overlapping_an_input_is_refused(data, dtype, n, d):
    # out= sharing memory with x (square shapes so that both fit): refused, x untouched
    x = place(np.random.default_rng(n * 31 + d).standard_normal((n, d)), dtype, "C")
    W = np.eye(d, dtype=dtype)
    A, B = np.ones((1, d), dtype), np.ones((d, 1), dtype)
    before = x.copy()
    out = data.draw(st.sampled_from([x, x[::-1], x.T if n == d else x, x[:, ::-1]]))
    with pytest.raises(ValueError, match="overlaps"):
        rslora.lora_linear(x, W, A, B, scale=1.0, out=out)
    np.testing.assert_array_equal(x, before)
    shared = np.lib.stride_tricks.as_strided(np.zeros(d, dtype), shape=(n, d),
                                             strides=(0, np.dtype(dtype).itemsize))
    if n > 1:  # elements aliasing each other: no result can be written there
        with pytest.raises(ValueError, match="overlapping elements"):
            rslora.lora_linear(x, W, A, B, scale=1.0, out=shared)


# --- merge / unmerge -----------------------------------------------------------------------

@FUZZ
@given(data=st.data(), dtype=DTYPES, d_out=SIZE, d_in=SIZE, r=SIZE, s=SCALES,
       W_layout=st.sampled_from(["C", "F", "strided", "reversed"]))
def test_merge_unmerge(data, dtype, d_out, d_in, r, s, W_layout):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    W0 = rng.standard_normal((d_out, d_in))
    W = place(W0, dtype, W_layout)
    A, B = data.draw(arrays((r, d_in), dtype)), data.draw(arrays((d_out, r), dtype))
    Wd, Ad, Bd = f64(W), f64(A), f64(B)
    s_t = float(np.asarray(s, dtype))
    assert rslora.merge(W, A, B, scale=s) is W
    mag = np.abs(Wd) + abs(s_t) * np.abs(Bd) @ np.abs(Ad)
    assert_within(W, Wd + s_t * Bd @ Ad, (r + 3) * eps(dtype) * mag, "merged")
    rslora.unmerge(W, A, B, scale=s)
    assert_within(W, Wd, 2 * (r + 3) * eps(dtype) * mag, "unmerged")
    ro = place(W0, dtype, "readonly")
    with pytest.raises(ValueError, match="read-only"):
        rslora.merge(ro, A, B, scale=s)
    if r and d_in and d_out:  # A a view into W: refused before any write
        Wbig = place(np.zeros((max(d_out, r), d_in)), dtype, "C")
        with pytest.raises(ValueError, match="overlaps"):
            rslora.merge(Wbig[:d_out], Wbig[:r], B, scale=s)


# --- lora_linear_backward ------------------------------------------------------------------

@FUZZ
@given(data=st.data(), dtype=DTYPES, n=SIZE, d_in=SIZE, d_out=SIZE, r=SIZE, s=SCALES,
       need=st.sets(st.sampled_from(["x", "A", "B"])), use_xa=st.booleans())
def test_lora_linear_backward(data, dtype, n, d_in, d_out, r, s, need, use_xa):
    dy, x = data.draw(arrays((n, d_out), dtype)), data.draw(arrays((n, d_in), dtype))
    W, A, B = (data.draw(arrays(sh, dtype)) for sh in [(d_out, d_in), (r, d_in), (d_out, r)])
    xa = rslora.lora_linear(x, W, A, B, scale=s, return_xa=True)[1] if use_xa else None
    dx, dA, dB = rslora.lora_linear_backward(dy, x, W, A, B, scale=s, need=need, xa=xa)
    G, X, Wd, Ad, Bd = map(f64, (dy, x, W, A, B))
    aG, aX, aW, aA, aB = map(np.abs, (G, X, Wd, Ad, Bd))
    s_t, e = float(np.asarray(s, dtype)), eps(dtype)
    for name, got in (("x", dx), ("A", dA), ("B", dB)):
        assert (got is None) == (name not in need)
    if dx is not None:
        mag = aG @ aW + abs(s_t) * (aG @ aB) @ aA
        assert_within(dx, G @ Wd + s_t * (G @ Bd) @ Ad, (d_out + r + 4) * e * mag, "dx")
    if dA is not None:
        assert_within(dA, s_t * (G @ Bd).T @ X, (d_out + n + 4) * e * abs(s_t) * (aG @ aB).T @ aX,
                      "dA")
    if dB is not None:
        assert_within(dB, s_t * G.T @ (X @ Ad.T), (n + d_in + 4) * e * abs(s_t) * aG.T @ (aX @ aA.T),
                      "dB")


# --- multi-adapter ops ---------------------------------------------------------------------

@st.composite
def multi_case(draw):
    dtype = draw(DTYPES)
    n, d_in, d_out, r, na = (draw(SIZE) for _ in range(5))
    n = n * draw(st.sampled_from([1, 1, 6]))  # some batches with groups over 32 rows
    x = draw(arrays((n, d_in), dtype))
    W = draw(arrays((d_out, d_in), dtype))
    A_all, B_all = draw(arrays((na, r, d_in), dtype)), draw(arrays((na, d_out, r), dtype))
    ids = np.array(draw(st.lists(st.integers(-1, na - 1), min_size=n, max_size=n)), dtype=np.int64)
    scales = np.array(draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=na, max_size=na)))
    return dtype, x, W, A_all, B_all, ids, scales


def multi_ref(x, A_all, B_all, ids, scales, dtype):
    X, Ad, Bd = map(f64, (x, A_all, B_all))
    add = np.zeros((X.shape[0], Bd.shape[1]))
    mag = np.zeros_like(add)
    for i, a in enumerate(ids):
        if a >= 0:
            s = float(np.asarray(scales[a], dtype))
            add[i] = s * (Ad[a] @ X[i]) @ Bd[a].T
            mag[i] = abs(s) * (np.abs(Ad[a]) @ np.abs(X[i])) @ np.abs(Bd[a]).T
    return add, mag


@FUZZ
@given(case=multi_case(), bias=st.booleans(), y_layout=st.sampled_from(["C", "F", "strided",
                                                                          "reversed"]))
def test_multi_ops(case, bias, y_layout):
    dtype, x, W, A_all, B_all, ids, scales = case
    n, d_in, d_out, r = x.shape[0], x.shape[1], W.shape[0], A_all.shape[1]
    add, mag = multi_ref(x, A_all, B_all, ids, scales, dtype)
    b = np.linspace(-1, 1, d_out).astype(dtype) if bias else None
    X, Wd = f64(x), f64(W)
    base = X @ Wd.T + (0.0 if b is None else f64(b))
    bmag = np.abs(X) @ np.abs(Wd).T + (0.0 if b is None else np.abs(f64(b)))
    e = eps(dtype)
    out = place(np.zeros((n, d_out)), dtype, y_layout)
    y = rslora.lora_linear_multi(x, W, A_all, B_all, ids, scales=scales, bias=b, out=out)
    assert y is out
    assert_within(y, base + add, (d_in + r + 4) * e * (bmag + mag), "lora_linear_multi")
    y0 = np.random.default_rng(n).standard_normal((n, d_out))
    y = place(y0, dtype, y_layout)
    y0 = f64(y)
    assert rslora.lora_add_multi(y, x, A_all, B_all, ids, scales=scales) is y
    assert_within(y, y0 + add, (d_in + r + 4) * e * (np.abs(y0) + mag), "lora_add_multi")


@FUZZ
@given(case=multi_case(), bad=st.sampled_from([-2, -(2**62), 2**62, "na", "float", "nan-scale",
                                                 "inf-scale", "short-scales"]))
def test_multi_bad_ids_and_scales_write_nothing(case, bad):
    dtype, x, W, A_all, B_all, ids, scales = case
    n, na = x.shape[0], A_all.shape[0]
    ids, scales = ids.copy(), scales.copy()
    if isinstance(bad, int) or bad == "na":
        assume(n > 0)
        ids[n // 2] = na if bad == "na" else bad
        err = IndexError
    elif bad == "float":
        assume(n > 0)  # an empty float array is the ids of an empty batch: ids=[] is accepted
        ids = ids.astype(np.float64)
        err = TypeError
    elif bad in ("nan-scale", "inf-scale"):
        assume(na > 0)
        scales[-1] = np.nan if bad == "nan-scale" else np.inf
        err = ValueError
    else:
        scales = scales[:-1] if na else np.ones(1)
        err = ValueError
    y = np.random.default_rng(0).standard_normal((n, W.shape[0])).astype(dtype)
    before = y.copy()
    with pytest.raises(err):
        rslora.lora_add_multi(y, x, A_all, B_all, ids, scales=scales)
    np.testing.assert_array_equal(y, before)
    with pytest.raises(err):
        rslora.lora_linear_multi(x, W, A_all, B_all, ids, scales=scales)


# --- randomized SVD and what is built on it ------------------------------------------------

@st.composite
def matrix_case(draw):
    dtype = draw(DTYPES)
    m, n = draw(st.integers(1, 14)), draw(st.integers(1, 14))
    p = min(m, n)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["decay", "flat", "lowrank", "zero", "huge", "tiny"]))
    s = {"decay": np.exp(-np.arange(p) / 2.0), "flat": np.ones(p),
         "lowrank": np.r_[np.ones(min(p, 2)), np.zeros(p - min(p, 2))], "zero": np.zeros(p),
         "huge": np.exp(-np.arange(p) / 2.0), "tiny": np.exp(-np.arange(p) / 2.0)}[kind]
    U = np.linalg.qr(rng.standard_normal((m, p)))[0]
    V = np.linalg.qr(rng.standard_normal((n, p)))[0]
    M = (U * s) @ V.T
    fi = np.finfo(dtype)
    if kind == "huge":  # entries whose squares overflow the dtype
        M *= float(fi.max) / (4 * max(s[0], 1e-300) * math.sqrt(m * n))
    elif kind == "tiny":  # whose squares underflow
        M *= float(fi.tiny) * 1e3
    return place(M, dtype, draw(LAYOUTS)), dtype


def sv_ref(M):
    return np.linalg.svd(f64(M), compute_uv=False)


def check_orthonormal(Q, dtype, what):
    Q = f64(Q)
    k, size = Q.shape[1], Q.shape[0]
    err = np.abs(Q.T @ Q - np.eye(k)).max() if k else 0.0
    assert err <= 16 * eps(dtype) * max(4.0, math.sqrt(size)) * max(1, k) ** 0.5, (what, err)


# oversample 0-3 leaves "auto" no Ritz values to estimate from: it may stop at its cap, and says so
@pytest.mark.filterwarnings("ignore:rsvd. n_iter='auto' stopped at its iteration cap:RuntimeWarning")
@FUZZ
@given(case=matrix_case(), data=st.data(), method=st.sampled_from(["subspace", "krylov"]),
       normalizer=st.sampled_from(["qr", "lu"]), full=st.booleans())
def test_rsvd(case, data, method, normalizer, full):
    M, dtype = case
    p = min(M.shape)
    k = data.draw(st.integers(1, p))
    if method == "krylov":
        normalizer = "qr"
    over = p if full else data.draw(st.integers(0, 3))
    U, S, Vt = rslora.rsvd(M, k, oversample=over, method=method, normalizer=normalizer, seed=1)
    assert U.shape == (M.shape[0], k) and S.shape == (k,) and Vt.shape == (k, M.shape[1])
    assert np.isfinite(U).all() and np.isfinite(S).all() and np.isfinite(Vt).all()
    assert np.all(np.diff(f64(S)) <= 0) and np.all(S >= 0)
    check_orthonormal(U, dtype, "U")
    check_orthonormal(Vt.T, dtype, "Vt")
    ref = sv_ref(M)
    # backward error of the computed SVD: c u ||M|| with c ~ the sizes of the sums
    tol_abs = 8 * eps(dtype) * (M.shape[0] + M.shape[1]) * ref[0]
    if full:  # the sketch spans the short side: the exact truncated SVD, up to rounding
        assert np.all(np.abs(f64(S) - ref[:k]) <= tol_abs + 8 * eps(dtype) * ref[:k])
    else:  # Rayleigh-Ritz values never exceed the true ones (interlacing)
        assert np.all(f64(S) <= ref[:k] + tol_abs)


@FUZZ
@given(case=matrix_case(), data=st.data(), tol=st.floats(1e-3, 0.9), n_iter=st.integers(0, 2))
def test_rsvd_tol(case, data, tol, n_iter):
    M, dtype = case
    p = min(M.shape)
    max_rank = data.draw(st.integers(1, p))
    block = data.draw(st.integers(1, p + 2))
    U, S, Vt, err = rslora.rsvd_tol(M, tol, max_rank=max_rank, block=block, n_iter=n_iter, seed=2)
    r = S.shape[0]
    assert r <= max_rank and U.shape == (M.shape[0], r) and Vt.shape == (r, M.shape[1])
    assert np.isfinite(U).all() and np.isfinite(S).all() and np.isfinite(Vt).all()
    Md = f64(M)
    if not np.abs(Md).max() > 0:
        assert r == 0 and err == 0
        return
    assert err <= tol or r == max_rank
    # the reported error is the true one, to the precision ||M||_F^2 - ||B||_F^2 allows;
    # compared on M * 2^-e, since ||M||_F itself may overflow float64
    e = int(np.frexp(np.abs(Md).max())[1])
    Md = np.ldexp(Md, -e)
    norm = np.linalg.norm(Md)
    true = np.linalg.norm(Md - (f64(U) * np.ldexp(f64(S), -e)) @ f64(Vt)) / norm
    assert abs(true - err) <= 1e-3 * err + 50 * eps(dtype) * math.sqrt(M.size), (true, err)
    # never more rank than the exact optimum needs, up to the block rounding of the search
    # no rank-r matrix beats the truncated SVD (Eckart-Young): err is never below it
    ref = sv_ref(Md)
    tails = np.r_[np.sqrt(np.cumsum(ref[::-1] ** 2)[::-1]), 0.0] / norm  # best error of rank j
    assert tails[r] <= err * (1 + 1e-3) + 50 * eps(dtype) * math.sqrt(M.size), (tails[r], err)


@FUZZ
@given(case=matrix_case(), data=st.data(), s=st.floats(0.01, 10), neg=st.booleans())
def test_lora_from_delta(case, data, s, neg):
    M, dtype = case
    r = data.draw(st.integers(1, min(M.shape)))
    scale_ = -s if neg else s
    A, B = rslora.lora_from_delta(M, r, scale=scale_, seed=3, n_iter=2)
    U, S, Vt = rslora.rsvd(M, r, seed=3, n_iter=2)
    assert A.shape == (r, M.shape[1]) and B.shape == (M.shape[0], r) and A.dtype == dtype
    assert np.isfinite(A).all() and np.isfinite(B).all()
    want = (f64(U) * f64(S)) @ f64(Vt)
    got = scale_ * f64(B) @ f64(A)
    big = float(np.max(f64(S))) if r else 0.0
    assert np.abs(got - want).max(initial=0) <= 16 * eps(dtype) * (r + 2) * big


@FUZZ
@given(case=matrix_case(), data=st.data())
def test_spectrum(case, data):
    M, dtype = case
    p = min(M.shape)
    k = data.draw(st.one_of(st.none(), st.integers(p, p)))
    sp = rslora.spectrum(M, k, seed=4)
    ref = sv_ref(M)
    assert sp.singular_values.dtype == dtype and len(sp) == p
    assert np.all(np.abs(f64(sp.singular_values) - ref) <=
                  8 * eps(dtype) * (M.shape[0] + M.shape[1]) * ref[0])
    assert np.all(np.diff(sp.energy) >= -eps(dtype)) and np.isfinite(sp.energy).all()
    if ref[0] > 0:
        assert abs(sp.energy[-1] - 1) <= 8 * eps(dtype) * p
        assert 1 <= sp.rank_for(1.0) <= p


# --- LoRALinear ----------------------------------------------------------------------------

@FUZZ
@given(data=st.data(), dtype=DTYPES, n=SIZE, d_in=POS, d_out=POS, r=POS,
       alpha=st.floats(0.5, 32), rule=st.sampled_from(["rslora", "standard"]))
def test_lora_linear_layer(data, dtype, n, d_in, d_out, r, alpha, rule):
    W, A, B = (data.draw(arrays(sh, dtype)) for sh in [(d_out, d_in), (r, d_in), (d_out, r)])
    x, dy = data.draw(arrays((n, d_in), dtype)), data.draw(arrays((n, d_out), dtype))
    layer = rslora.LoRALinear(W, A, B, alpha=alpha, rule=rule)
    s = rslora.scale(alpha, r, rule)
    assert layer.scaling == s
    y = layer.forward(x)
    Wc, Ac, Bc = map(np.ascontiguousarray, (W, A, B))  # what the layer holds
    X, Wd, Ad, Bd = map(f64, (x, W, A, B))
    mag = np.abs(X) @ (np.abs(Wd) + abs(s) * np.abs(Bd) @ np.abs(Ad)).T
    # the packed forward ([W; A] in one GEMM) rounds like lora_linear, not bitwise as it
    assert_within(y, f64(rslora.lora_linear(x, Wc, Ac, Bc, scale=s)),
                  2 * (d_in + r + 4) * eps(dtype) * mag, "forward")
    g = layer.backward(dy)  # bitwise the same op, given the x @ A.T the forward kept
    want = rslora.lora_linear_backward(dy, x, Wc, Ac, Bc, scale=s, xa=layer._cache[1])
    for got, w in zip(g, want):
        np.testing.assert_array_equal(got, w)
    layer.merge()
    assert_within(layer.forward(x), f64(y), 2 * (d_in + r + 4) * eps(dtype) * mag, "merged forward")
    state = layer.state_dict()
    assert_within(state["base_layer.weight"], Wd,
                  2 * (r + 3) * eps(dtype) * (np.abs(Wd) + abs(s) * np.abs(Bd) @ np.abs(Ad)), "W")
    layer.unmerge()
    assert np.array_equal(W, place(f64(W), dtype, "C"))  # the caller's weight is never touched
