"""Bad and unusual input on every public op, each case a defect found by fuzzing (and fixed).

Every kernel path this CPU runs (AVX-512, AVX2, baseline) and 1 or 2 BLAS threads where the
op's route depends on them. References are float64 NumPy; NaN/Inf must go where the NumPy
expression puts them (IEEE: 0 * Inf = NaN), bad arguments are a ValueError/TypeError naming them.
"""

from __future__ import annotations

import numpy as np
import pytest

import rslora

PATHS = ["avx512", "avx2", "baseline"]


@pytest.fixture(params=PATHS)
def path(request):
    why = rslora.kernel_paths()[request.param]
    if why:
        pytest.skip(f"kernel path {request.param} cannot run here: {why}")
    with rslora.use_kernel_path(request.param):
        yield request.param


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(request.param, user_api="blas"):
        yield request.param


def strided(a: np.ndarray) -> np.ndarray:
    """The same values in a view whose last axis has stride 2 (no unit-stride rows)."""
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def same_nonfinite(got: np.ndarray, want: np.ndarray) -> None:
    """NaN where the reference has NaN, the same Inf, and every finite value equal to it
    within rounding (the references below keep the finite part exact)."""
    got = np.asarray(got, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.where(np.isinf(got), got, 0), np.where(np.isinf(want), want, 0))
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-5)


# --- scale 0: NaN/Inf in the operands still reach the result (BLAS skips alpha == 0) ---------

def multi_case(rng, rows, layout, where, bad, dtype):
    d_in, d_out, r, na = 7, 6, 3, 2
    n = 2 * rows
    x = rng.standard_normal((n, d_in))
    A = rng.standard_normal((na, r, d_in))
    B = rng.standard_normal((na, d_out, r))
    {"x": x, "A": A, "B": B}[where][(0, 0) if where == "x" else (0, 0, 0)] = bad
    ids = np.repeat(np.arange(na), rows).astype(np.int64)
    x, A, B = (a.astype(dtype) for a in (x, A, B))
    if layout == "strided":  # rows BLAS reads: gemv for <= 2 rows, gathered GEMM above
        x = strided(x)
    return x, A, B, ids


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 2, 5, 40])  # rows per adapter: kernels up to 32, GEMM above
@pytest.mark.parametrize("layout", ["C", "strided"])
def test_multi_scale_zero_keeps_nan(path, threads, dtype, rows, layout):
    """y += 0 * (x A^T) B^T is NaN where x, A or B holds NaN/Inf, on every route of the rows:
    the kernels did this, but the BLAS routes (big groups, strided rows) passed alpha = 0 to
    BLAS, which skipped the product and left y as it was."""
    for where in ("x", "A", "B"):
        for bad in (np.nan, np.inf):
            _multi_scale_zero(np.random.default_rng(rows), dtype, rows, layout, where, bad)


def _multi_scale_zero(rng, dtype, rows, layout, where, bad):
    x, A, B, ids = multi_case(rng, rows, layout, where, bad, dtype)
    scales = np.zeros(2)
    y0 = rng.standard_normal((len(ids), 6)).astype(dtype)
    with np.errstate(all="ignore"):
        lora = np.stack([0.0 * ((x[i].astype(np.float64) @ A[a].T.astype(np.float64))
                                @ B[a].T.astype(np.float64)) for i, a in enumerate(ids)])
        got = rslora.lora_add_multi(y0.copy(), x, A, B, ids, scales=scales)
    same_nonfinite(got, y0 + lora)
    W = rng.standard_normal((6, 7)).astype(dtype)
    with np.errstate(all="ignore"):
        got = rslora.lora_linear_multi(x, W, A, B, ids, scales=scales)
    same_nonfinite(got, x.astype(np.float64) @ W.T.astype(np.float64) + lora)


@pytest.mark.parametrize("n", [1, 2, 9])  # one row: the GEMMs run as GEMVs
@pytest.mark.parametrize("where", ["dy", "x", "A", "B"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_backward_scale_zero_keeps_nan(threads, n, where, bad):
    """The gradients' ``s * (...)`` terms with s = 0 are NaN where the NumPy formulas are (a
    single row went through GEMV with alpha = 0, which BLAS skips)."""
    rng = np.random.default_rng(n)
    arr = {"dy": rng.standard_normal((n, 6)), "x": rng.standard_normal((n, 7)),
           "W": rng.standard_normal((6, 7)), "A": rng.standard_normal((3, 7)),
           "B": rng.standard_normal((6, 3))}
    arr[where][0, 1] = bad
    dy, x, W, A, B = (arr[k] for k in ("dy", "x", "W", "A", "B"))
    with np.errstate(all="ignore"):
        g = 0.0 * (dy @ B)
        want = (dy @ W + g @ A, g.T @ x, 0.0 * dy.T @ (x @ A.T))
        got = rslora.lora_linear_backward(dy, x, W, A, B, scale=0.0)
    for name, gv, wv in zip(("dx", "dA", "dB"), got, want):
        assert gv is not None, name
        same_nonfinite(gv, wv)


@pytest.mark.parametrize("d_out", [1, 4])  # one row of W: the merge GEMM runs as a GEMV
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("where", ["A", "B"])
def test_linear_and_merge_scale_zero_keep_nan(threads, d_out, n, where):
    rng = np.random.default_rng(d_out)
    W = rng.standard_normal((d_out, 5))
    A, B = rng.standard_normal((2, 5)), rng.standard_normal((d_out, 2))
    (A if where == "A" else B)[0, 0] = np.inf
    x = rng.standard_normal((n, 5))
    with np.errstate(all="ignore"):
        want = W + 0.0 * (B @ A)
        got = rslora.merge(W.copy(), A, B, scale=0.0)
        same_nonfinite(got, want)
        want = x @ W.T + 0.0 * (x @ A.T) @ B.T
        same_nonfinite(rslora.lora_linear(x, W, A, B, scale=0.0), want)


# --- data at an odd byte offset (np.frombuffer): the core reads whole elements --------------

def unaligned(a: np.ndarray) -> np.ndarray:
    """The values of ``a`` in a writable array whose data start one byte past an element."""
    buf = bytearray(a.nbytes + 1)
    u = np.frombuffer(buf, a.dtype, a.size, 1).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned and u.flags.writeable
    return u


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_arrays_are_read_and_written_through_copies(path, dtype):
    """Every op on misaligned inputs, outputs and in-place targets gives what it gives on aligned
    copies, and writes the caller's array (the core used to read them as they were: undefined
    behaviour, reported by UBSan in lora_add_multi and rsvd)."""
    rng = np.random.default_rng(3)
    n, d_in, d_out, r, na = 40, 37, 20, 4, 3
    x, W = rng.standard_normal((n, d_in)).astype(dtype), rng.standard_normal((d_out, d_in)).astype(dtype)
    A, B = rng.standard_normal((r, d_in)).astype(dtype), rng.standard_normal((d_out, r)).astype(dtype)
    bias = rng.standard_normal(d_out).astype(dtype)
    U = unaligned
    want = rslora.lora_linear(x, W, A, B, scale=0.5, bias=bias)
    np.testing.assert_array_equal(rslora.lora_linear(U(x), U(W), U(A), U(B), scale=0.5, bias=U(bias)), want)
    out = U(np.zeros((n, d_out), dtype))
    assert rslora.lora_linear(x, W, A, B, scale=0.5, bias=bias, out=out) is out
    np.testing.assert_array_equal(out, want)

    W2 = U(W)
    assert rslora.merge(W2, U(A), U(B), scale=0.5) is W2
    np.testing.assert_array_equal(W2, rslora.merge(W.copy(), A, B, scale=0.5))

    dy = rng.standard_normal((n, d_out)).astype(dtype)
    for g, h in zip(rslora.lora_linear_backward(U(dy), U(x), U(W), U(A), U(B), scale=0.5),
                    rslora.lora_linear_backward(dy, x, W, A, B, scale=0.5)):
        np.testing.assert_array_equal(g, h)

    A_all = rng.standard_normal((na, r, d_in)).astype(dtype)
    B_all = rng.standard_normal((na, d_out, r)).astype(dtype)
    ids, sc = rng.integers(-1, na, n), rng.uniform(-2, 2, na)
    y0 = rng.standard_normal((n, d_out)).astype(dtype)
    want = rslora.lora_add_multi(y0.copy(), x, A_all, B_all, ids, scales=sc)
    y = U(y0)
    assert rslora.lora_add_multi(y, U(x), U(A_all), U(B_all), U(ids), scales=U(sc)) is y
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(
        rslora.lora_linear_multi(U(x), U(W), U(A_all), U(B_all), U(ids), scales=U(sc), bias=U(bias)),
        rslora.lora_linear_multi(x, W, A_all, B_all, ids, scales=sc, bias=bias))

    for got, ref in zip(rslora.rsvd(U(x), 3, seed=0), rslora.rsvd(x, 3, seed=0)):
        np.testing.assert_array_equal(got, ref)
    for got, ref in zip(rslora.rsvd_tol(U(x), 0.5, seed=0), rslora.rsvd_tol(x, 0.5, seed=0)):
        np.testing.assert_array_equal(got, ref)


def test_core_refuses_unaligned_arrays():
    """The bindings (what C++ needs for memory safety) refuse misaligned data, naming it."""
    from rslora import _core

    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((8, 6)), rng.standard_normal((4, 6))
    A, B = rng.standard_normal((2, 6)), rng.standard_normal((4, 2))
    with pytest.raises(ValueError, match="x is not aligned"):
        _core.lora_linear(unaligned(x), W, A, B, 1.0, None, np.zeros((8, 4)), np.zeros((8, 2)))
    with pytest.raises(ValueError, match="W is not aligned"):
        _core.merge(unaligned(W), A, B, 1.0)
    with pytest.raises(ValueError, match="M is not aligned"):
        _core.rsvd(unaligned(x), 2, 2, 1, "subspace", "qr", 0, True)
    A_all, B_all = np.zeros((2, 3, 6)), np.zeros((2, 4, 3))
    ids, sc = np.zeros(8, np.int64), np.ones(2)
    for args, name in (((unaligned(np.zeros((8, 4))), x, A_all, B_all, ids, sc), "y"),
                       ((np.zeros((8, 4)), x, unaligned(A_all), B_all, ids, sc), "A_all"),
                       ((np.zeros((8, 4)), x, A_all, B_all, unaligned(ids), sc), "adapter_ids"),
                       ((np.zeros((8, 4)), x, A_all, B_all, ids, unaligned(sc)), "scales")):
        with pytest.raises(ValueError, match=f"{name} is not aligned"):
            _core.lora_add_multi(*args)


# --- arguments: named errors, never another library's exception or a truthy string ----------

def test_tensors_that_cannot_become_arrays_are_named():
    """A torch tensor that requires grad (np.asarray raises RuntimeError) or a ragged list is a
    TypeError naming the argument."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((5, 7)), rng.standard_normal((6, 7))
    A, B = rng.standard_normal((3, 7)), rng.standard_normal((6, 3))
    grad = torch.tensor(W, requires_grad=True)
    with pytest.raises(TypeError, match=r"^W cannot be read as a NumPy array \(RuntimeError: .*detach"):
        rslora.lora_linear(x, grad, A, B, scale=1.0)
    with pytest.raises(TypeError, match="^x cannot be read"):
        rslora.lora_linear([[1.0, 2.0], [3.0]], W, A, B, scale=1.0)
    with pytest.raises(TypeError, match="^dy cannot be read"):
        rslora.lora_linear_backward(torch.ones(5, 6, requires_grad=True), x, W, A, B, scale=1.0)
    with pytest.raises(TypeError, match="^M cannot be read"):
        rslora.rsvd(grad, 2)
    with pytest.raises(TypeError, match="^M cannot be read"):
        rslora.spectrum(grad)
    with pytest.raises(TypeError, match="^weight cannot be read"):
        rslora.LoRALinear(grad, A, B, alpha=8)
    y, A_all, B_all = np.zeros((5, 6)), np.zeros((2, 3, 7)), np.zeros((2, 6, 3))
    with pytest.raises(TypeError, match="^scales cannot be read"):
        rslora.lora_add_multi(y, x, A_all, B_all, np.zeros(5, np.int64),
                              scales=torch.ones(2, requires_grad=True))


def _flag_calls():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((8, 6))
    x, W = rng.standard_normal((5, 7)), rng.standard_normal((6, 7))
    A, B = rng.standard_normal((3, 7)), rng.standard_normal((6, 3))
    layer = rslora.LoRALinear(W, A, B, alpha=8)
    return {
        "rsvd": ("check_finite", lambda f: rslora.rsvd(M, 2, seed=0, check_finite=f)),
        "rsvd_tol": ("check_finite", lambda f: rslora.rsvd_tol(M, 0.5, seed=0, check_finite=f)),
        "spectrum": ("check_finite", lambda f: rslora.spectrum(M, check_finite=f)),
        "lora_linear": ("return_xa", lambda f: rslora.lora_linear(x, W, A, B, scale=1.0, return_xa=f)),
        "LoRALinear": ("copy", lambda f: rslora.LoRALinear(W, A, B, alpha=8, copy=f)),
        "forward": ("cache", lambda f: layer.forward(x, cache=f)),
    }


@pytest.mark.parametrize("op", list(_flag_calls()))
@pytest.mark.parametrize("bad", ["no", "False", 0, 1, None, np.array([True])])
def test_flags_must_be_bools(op, bad):
    """check_finite="no" read as True (a string is truthy) did the opposite of what was asked:
    a flag is a bool (Python's or NumPy's) or a TypeError naming it."""
    name, call = _flag_calls()[op]
    with pytest.raises(TypeError, match=f"^{name} must be True or False"):
        call(bad)
    call(True)
    call(np.False_)


def test_dask_flags_must_be_bools():
    da = pytest.importorskip("dask.array")
    import rslora.dask

    M = da.from_array(np.random.default_rng(0).standard_normal((40, 6)), chunks=(10, 6))
    with pytest.raises(TypeError, match="^check_finite must be True or False"):
        rslora.dask.rsvd(M, 2, check_finite="no")
    with pytest.raises(TypeError, match="^check_finite must be True or False"):
        rslora.dask.rsvd_tol(M, 0.5, check_finite="no")


def test_lora_from_delta_names_its_own_arguments():
    """Errors about the rank and the matrix name r and delta (they named rsvd's k and M)."""
    D = np.random.default_rng(0).standard_normal((8, 6))
    for r in (True, 2.0, "2"):
        with pytest.raises(TypeError, match="^r must be an integer"):
            rslora.lora_from_delta(D, r)
    with pytest.raises(TypeError, match="^delta must be float32 or float64, got float16"):
        rslora.lora_from_delta(D.astype(np.float16), 2)
    with pytest.raises(ValueError, match=r"^delta must be 2-D, got shape \(1, 8, 6\)"):
        rslora.lora_from_delta(D[None], 2)


# --- spectra of non-finite, subnormal and huge matrices ---------------------------------------

@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_spectrum_of_a_nonfinite_matrix_is_nan_not_a_rank(k, bad):
    """With check_finite=False a NaN/Inf in M gives NaN values and shares, and rank_for refuses:
    the energy shares were all 1 (a NaN total read as "no energy"), so rank_for(0.9) answered 1,
    and k=None raised LAPACK's LinAlgError."""
    M = np.random.default_rng(0).standard_normal((8, 6))
    M[3, 2] = bad
    sp = rslora.spectrum(M, k, seed=0, check_finite=False)
    assert len(sp) == (6 if k is None else k)
    assert np.isnan(sp.singular_values).all() and np.isnan(sp.energy).all()
    with pytest.raises(ValueError, match="NaN or Inf"):
        sp.rank_for(0.9)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rslora.spectrum(M, k, seed=0)


@pytest.mark.parametrize("dtype,tiny", [(np.float64, 1e-310), (np.float64, 5e-324),
                                        (np.float32, 1e-40), (np.float32, 1e-45)])
def test_dask_rsvd_of_subnormal_matrices(dtype, tiny):
    """rslora.dask scaled M by 2**-e with e from max|M|: for subnormal M that power is beyond
    the dtype (2**1030 for 1e-310), and math.ldexp raised OverflowError. The in-memory rsvd
    handles them; the dask one now gives the same singular values."""
    da = pytest.importorskip("dask.array")
    import rslora.dask
    from rslora.dask import rsvd as dask_rsvd

    rng = np.random.default_rng(1)
    M = (rng.standard_normal((40, 6)) * tiny / 4).astype(dtype)
    M[0, 0] = dtype(tiny)  # max|M| exactly the subnormal
    want = np.linalg.svd(M.astype(np.float64) / tiny, compute_uv=False) * tiny
    d = da.from_array(M, chunks=(10, 6))
    for route in ("gram", "iterate"):
        dask_rsvd._FORCE_ROUTE = route
        try:
            _, S, _ = rslora.dask.rsvd(d, 2, seed=0)
        finally:
            dask_rsvd._FORCE_ROUTE = None
        S = S.compute().astype(np.float64)
        # subnormals carry fewer bits: as exact as the input's spacing allows
        np.testing.assert_allclose(S, want[:2], rtol=1e-5, atol=8 * float(np.finfo(dtype).smallest_subnormal))
    res = rslora.dask.rsvd_tol(d, 0.5, seed=0)
    assert 0 <= res.error <= 0.5
    np.testing.assert_array_equal(rslora.rsvd(M, 2, seed=0)[1] > 0, True)


def test_float64_overflow_message_gives_a_real_magnitude_and_no_float64_advice():
    """Singular values past float64's range said "(the largest is ~inf): compute in float64",
    to a float64 matrix: the magnitude now comes from its logarithm."""
    M = np.full((20, 10), np.finfo(np.float64).max / 4)  # sigma_1 = max/4 * sqrt(200) ~ 6.4e308
    calls = [lambda: rslora.rsvd(M, 2, seed=0), lambda: rslora.spectrum(M)]
    da = pytest.importorskip("dask.array")
    import rslora.dask

    calls.append(lambda: rslora.dask.rsvd(da.from_array(M, chunks=(10, 10)), 2, seed=0))
    for call in calls:
        with pytest.raises(ValueError, match=r"overflow float64 \(the largest is ~6\.36e\+308\)") as e:
            call()
        assert "compute in float64" not in str(e.value)
    M32 = np.full((20, 10), np.finfo(np.float32).max / 4, np.float32)
    with pytest.raises(ValueError, match=r"float32 \(the largest is ~1\.2e\+39\): compute in float64"):
        rslora.rsvd(M32, 2, seed=0)


# --- LoRALinear ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["F", "reversed", "strided", "unaligned"])
def test_layer_copy_false_uses_the_callers_arrays(layout):
    """copy=False promised the caller's arrays "as they are", but took np.ascontiguousarray of
    them: a Fortran-order or strided weight was silently copied, so merge() updated the copy and
    the caller's weight stayed unmerged."""
    rng = np.random.default_rng(0)
    W0, A, B = rng.standard_normal((6, 7)), rng.standard_normal((3, 7)), rng.standard_normal((6, 3))
    W = {"F": np.asfortranarray(W0), "reversed": W0[::-1, ::-1].copy()[::-1, ::-1],
         "strided": strided(W0), "unaligned": unaligned(W0)}[layout]
    np.testing.assert_array_equal(W, W0)
    layer = rslora.LoRALinear(W, A, B, alpha=8, copy=False)
    assert layer.weight is W
    x = rng.standard_normal((5, 7))
    y = layer.forward(x)
    layer.merge()
    np.testing.assert_allclose(W, W0 + layer.scaling * B @ A, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(layer.forward(x), y, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(W, W0, rtol=1e-13, atol=1e-13)


def test_layer_copy_false_read_only_weight_is_refused_on_merge():
    rng = np.random.default_rng(0)
    W = np.broadcast_to(rng.standard_normal(7), (6, 7))
    layer = rslora.LoRALinear(W, rng.standard_normal((3, 7)), rng.standard_normal((6, 3)),
                              alpha=8, copy=False)
    with pytest.raises(ValueError, match="W is read-only"):
        layer.merge()
    assert not layer.merged


@pytest.mark.parametrize("need,err", [(3, TypeError), (None, TypeError), ("W", ValueError)])
def test_merged_layer_backward_judges_need_like_the_unmerged_one(need, err):
    """A merged layer read ``need`` with set(...): need=3 raised "'int' object is not iterable"
    (and need="W" the RuntimeError meant for "A"/"B") instead of the named error."""
    rng = np.random.default_rng(0)
    layer = rslora.LoRALinear(rng.standard_normal((6, 7)), rng.standard_normal((3, 7)),
                              rng.standard_normal((6, 3)), alpha=8)
    layer.forward(rng.standard_normal((5, 7)))
    dy = np.ones((5, 6))
    with pytest.raises(err, match="need"):
        layer.backward(dy, need=need)
    layer.merge()
    layer.forward(rng.standard_normal((5, 7)))
    with pytest.raises(err, match="need"):
        layer.backward(dy, need=need)


def test_multi_ids_and_scales_sharing_memory_with_the_output():
    """adapter_ids and scales that live in the memory out= (or y) is written to: they were read
    after the base GEMM overwrote them (an IndexError naming an id the caller never passed,
    after out was half written). They are now read once, before any write."""
    rng = np.random.default_rng(0)
    n, d_in, d_out, r, na = 8, 5, 4, 2, 3
    x, W = rng.standard_normal((n, d_in)), rng.standard_normal((d_out, d_in))
    A, B = rng.standard_normal((na, r, d_in)), rng.standard_normal((na, d_out, r))
    ids, sc = rng.integers(0, na, n), rng.uniform(1, 2, na)
    want = rslora.lora_linear_multi(x, W, A, B, ids, scales=sc)
    buf = np.zeros(n * d_out)
    out = buf.reshape(n, d_out)
    ids_v = buf.view(np.int64)[3:3 + n]
    sc_v = buf[20:20 + na]
    ids_v[:], sc_v[:] = ids, sc
    got = rslora.lora_linear_multi(x, W, A, B, ids_v, scales=sc_v, out=out)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)

    y0 = rng.standard_normal((n, d_out))
    buf = np.zeros(n * d_out)
    y = buf.reshape(n, d_out)
    y[...] = y0
    ids_v = buf.view(np.int64)[:n]  # the bits of y's first rows, read as ids ...
    ids_v[:] = ids  # ... set to valid ones (y0's rows 0-1 are replaced by them)
    y0 = y.copy()
    got = rslora.lora_add_multi(y, x, A, B, ids_v, scales=sc)
    np.testing.assert_allclose(got, rslora.lora_add_multi(y0, x, A, B, ids, scales=sc),
                               rtol=1e-13, atol=1e-13)


def test_multi_with_no_adapters_and_empty_batches():
    """Zero adapters: ids of -1 run the base model, an id of 0 names the empty range sensibly
    (it said "valid: ... 0..-1"); an empty batch takes ids=[] (NumPy makes [] float64, which
    was refused as "adapter_ids must be integers")."""
    from rslora import _core

    x, W = np.ones((3, 4)), np.ones((2, 4))
    A0, B0 = np.zeros((0, 2, 4)), np.zeros((0, 2, 2))
    np.testing.assert_array_equal(
        rslora.lora_linear_multi(x, W, A0, B0, np.full(3, -1), scales=[]), np.full((3, 2), 4.0))
    for call in (lambda: rslora.lora_linear_multi(x, W, A0, B0, [-1, 0, -1], scales=[]),
                 lambda: _core.lora_add_multi(np.zeros((3, 2)), x, A0, B0,
                                              np.array([-1, 0, -1]), np.zeros(0))):
        with pytest.raises(IndexError, match=r"^adapter_ids\[1\] = 0 is out of range for 0 "
                                             r"adapters \(valid: -1 for the base model only\)$"):
            call()
    A, B = np.ones((2, 2, 4)), np.ones((2, 2, 2))
    assert rslora.lora_linear_multi(x[:0], W, A, B, [], scales=[1, 2]).shape == (0, 2)
    assert rslora.lora_add_multi(np.zeros((0, 2)), x[:0], A, B, [], scales=[1, 2]).shape == (0, 2)
    with pytest.raises(TypeError, match="adapter_ids must be integers, got float64"):
        rslora.lora_add_multi(np.zeros((1, 2)), x[:1], A, B, [0.0], scales=[1, 2])


@pytest.mark.parametrize("seed,err,match", [(True, TypeError, "seed must be an integer, got bool"),
                                            (-1, ValueError, "seed must be >= 0"),
                                            (1.5, TypeError, "seed must be an integer, got float"),
                                            (2**64, ValueError, "seed must be < 2")])
def test_layer_init_seed_follows_the_seed_rule(seed, err, match):
    """LoRALinear.init handed seed to NumPy as it was: True ran as seed 1, and -1 or 1.5 gave
    NumPy's messages, which name no argument."""
    W = np.ones((4, 3))
    with pytest.raises(err, match=match):
        rslora.LoRALinear.init(W, 2, seed=seed)
    a = rslora.LoRALinear.init(W, 2, seed=np.int64(5)).lora_A
    np.testing.assert_array_equal(a, rslora.LoRALinear.init(W, 2, seed=5).lora_A)
    g = np.random.default_rng(5)
    np.testing.assert_array_equal(rslora.LoRALinear.init(W, 2, seed=g).lora_A, a)
