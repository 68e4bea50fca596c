"""Multi-adapter forward (lora_linear_multi, lora_add_multi) against a float64 per-row loop."""

from __future__ import annotations

import numpy as np
import pytest

import rslora
from rslora import _core

TOL = {np.float32: 3e-5, np.float64: 1e-12}


def make(rng, n, d_in, d_out, r, na, dtype=np.float64):
    x = rng.standard_normal((n, d_in))
    W = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    A = rng.standard_normal((na, r, d_in)) / np.sqrt(d_in)
    B = rng.standard_normal((na, d_out, r))
    scales = rng.uniform(0.1, 3.0, na)
    return tuple(a.astype(dtype) for a in (x, W, A, B)) + (scales,)


def reference(x, W, A, B, ids, scales, bias=None):
    """Row by row in float64: the definition."""
    f = lambda a: np.asarray(a, dtype=np.float64)
    x, W, A, B = map(f, (x, W, A, B))
    X = x.reshape(int(np.prod(x.shape[:-1])), x.shape[-1])
    y = X @ W.T + (0.0 if bias is None else f(bias))
    for i, a in enumerate(np.asarray(ids).reshape(-1)):
        if a >= 0:
            y[i] += scales[a] * (A[a] @ X[i]) @ B[a].T
    return y.reshape(x.shape[:-1] + (W.shape[0],))


def close(got, want, dtype):
    big = np.abs(want).max() if np.size(want) else 0.0
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * big)


def ids_for(rng, n, na, layout):
    if layout == "random":
        return rng.integers(-1, na, n)
    if layout == "sorted":  # consecutive groups, as serving systems batch them
        return np.sort(rng.integers(-1, na, n))
    if layout == "one adapter":
        return np.full(n, na - 1)
    if layout == "each its own":  # decode: one row per adapter
        return rng.permutation(na)[:n]
    if layout == "large groups":  # > 32 rows per adapter: the GEMM paths
        return rng.integers(0, 2, n)
    raise ValueError(layout)


LAYOUTS = ["random", "sorted", "one adapter", "each its own", "large groups"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,d_in,d_out,r,na", [(40, 37, 45, 5, 40), (90, 64, 48, 16, 90),
                                               (9, 3, 2, 1, 9)])
def test_matches_reference(dtype, layout, n, d_in, d_out, r, na):
    rng = np.random.default_rng(n + r)
    x, W, A, B, scales = make(rng, n, d_in, d_out, r, na, dtype)
    ids = ids_for(rng, n, na, layout)
    bias = rng.standard_normal(d_out).astype(dtype)
    y = rslora.lora_linear_multi(x, W, A, B, ids, scales=scales, bias=bias)
    assert y.dtype == dtype and y.shape == (n, d_out)
    close(y, reference(x, W, A, B, ids, scales, bias), dtype)
    # the adapter part alone, added onto an existing output
    y0 = rng.standard_normal((n, d_out)).astype(dtype)
    got = rslora.lora_add_multi(y0.copy(), x, A, B, ids, scales=scales)
    want = y0 + reference(x, W, A, B, ids, scales) - reference(x, W, A[:, :0], B[:, :, :0], ids, scales)
    close(got, want, dtype)


def test_agrees_with_lora_linear_per_adapter():
    rng = np.random.default_rng(3)
    x, W, A, B, scales = make(rng, 60, 20, 30, 4, 5)
    ids = rng.integers(-1, 5, 60)
    y = rslora.lora_linear_multi(x, W, A, B, ids, scales=scales)
    for a in range(-1, 5):
        m = ids == a
        want = (x[m] @ W.T if a < 0 else
                rslora.lora_linear(x[m], W, A[a], B[a], scale=scales[a]))
        np.testing.assert_allclose(y[m], want, rtol=1e-12, atol=1e-12)


def test_base_rows_are_untouched_and_batch_dims():
    rng = np.random.default_rng(4)
    x, W, A, B, scales = make(rng, 24, 8, 6, 2, 3)
    x = x.reshape(2, 3, 4, 8)
    ids = rng.integers(-1, 3, (2, 3, 4))
    y = rslora.lora_linear_multi(x, W, A, B, ids, scales=scales)
    assert y.shape == (2, 3, 4, 6)
    close(y, reference(x, W, A, B, ids, scales), np.float64)
    y0 = rng.standard_normal((2, 3, 4, 6))
    y1 = rslora.lora_add_multi(y0.copy(), x, A, B, ids, scales=scales)
    np.testing.assert_array_equal(y1[ids == -1], y0[ids == -1])
    assert rslora.lora_add_multi(y0, x, A, B, ids, scales=scales) is y0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_strided_and_fortran_inputs(dtype):
    rng = np.random.default_rng(5)
    x, W, A, B, scales = make(rng, 50, 16, 12, 3, 6, dtype)
    ids = rng.integers(-1, 6, 50)
    ids[:20] = 2  # one group large enough for the GEMM path
    want = reference(x, W, A, B, ids, scales)
    variants = [
        (np.asfortranarray(x), np.asfortranarray(W), np.asfortranarray(A), np.asfortranarray(B)),
        (np.repeat(x, 2, axis=1)[:, ::2], W, np.repeat(A, 2, axis=2)[:, :, ::2],
         np.repeat(B, 3, axis=0)[::3]),
        (x, W.T.copy().T, A.transpose(0, 2, 1).copy().transpose(0, 2, 1), B),
    ]
    for xv, Wv, Av, Bv in variants:
        close(rslora.lora_linear_multi(xv, Wv, Av, Bv, ids[::-1][::-1], scales=scales), want, dtype)
    # a strided y (every other column) is updated in place
    big = np.zeros((50, 24), dtype)
    y = big[:, ::2]
    rslora.lora_add_multi(y, x, A, B, ids, scales=scales)
    close(big[:, ::2], want - reference(x, W, A[:, :0], B[:, :, :0], ids, scales), dtype)
    np.testing.assert_array_equal(big[:, 1::2], 0)
    # a y whose batch dims cannot be flattened as a view: the result is written back
    y3 = np.zeros((10, 5, 12), dtype).transpose(1, 0, 2)
    x3 = x.reshape(5, 10, 16)
    ids3 = ids.reshape(5, 10)
    rslora.lora_add_multi(y3, x3, A, B, ids3, scales=scales)
    close(y3.reshape(50, 12), want - reference(x, W, A[:, :0], B[:, :, :0], ids, scales), dtype)


def test_out_and_edge_cases():
    rng = np.random.default_rng(6)
    x, W, A, B, scales = make(rng, 7, 5, 4, 2, 3)
    ids = np.array([0, -1, 2, 2, 1, -1, 0])
    out = np.empty((7, 4))
    assert rslora.lora_linear_multi(x, W, A, B, ids, scales=scales, out=out) is out
    close(out, reference(x, W, A, B, ids, scales), np.float64)
    # all rows on the base model; zero adapters; rank 0; empty batch
    np.testing.assert_allclose(rslora.lora_linear_multi(x, W, A, B, np.full(7, -1), scales=scales),
                               x @ W.T, rtol=1e-14)
    np.testing.assert_allclose(rslora.lora_linear_multi(x, W, A[:0], B[:0], np.full(7, -1),
                                                        scales=[]), x @ W.T, rtol=1e-14)
    np.testing.assert_allclose(rslora.lora_linear_multi(x, W, A[:, :0], B[:, :, :0], ids,
                                                        scales=scales), x @ W.T, rtol=1e-14)
    assert rslora.lora_linear_multi(x[:0], W, A, B, ids[:0], scales=scales).shape == (0, 4)
    # ids of any integer dtype
    close(rslora.lora_linear_multi(x, W, A, B, ids.astype(np.int8), scales=scales),
          reference(x, W, A, B, ids, scales), np.float64)


# --- bad input: each one a clear error, before any work ------------------------------------------

@pytest.fixture
def ops():
    rng = np.random.default_rng(0)
    return make(rng, 6, 5, 4, 2, 3)


@pytest.mark.parametrize("bad,row", [(3, 4), (-2, 1), (10**6, 5)])
def test_bad_adapter_id(ops, bad, row):
    x, W, A, B, scales = ops
    ids = np.array([0, 1, 2, -1, 0, 1])
    ids[row] = bad
    y0 = np.ones((6, 4))
    y = y0.copy()
    pattern = rf"adapter_ids\[{row}\] = {bad} is out of range for 3 adapters"
    with pytest.raises(IndexError, match=pattern):
        rslora.lora_add_multi(y, x, A, B, ids, scales=scales)
    np.testing.assert_array_equal(y, y0)  # nothing was done
    with pytest.raises(IndexError, match=pattern):
        rslora.lora_linear_multi(x, W, A, B, ids, scales=scales)
    # the core checks on its own too (never an out-of-bounds read), before touching y
    with pytest.raises(IndexError, match=pattern):
        _core.lora_add_multi(y, x, A, B, ids.astype(np.int64), np.asarray(scales))
    np.testing.assert_array_equal(y, y0)
    out = np.full((6, 4), 7.0)
    with pytest.raises(IndexError, match=pattern):
        _core.lora_linear_multi(x, W, A, B, ids.astype(np.int64), np.asarray(scales), None, out)
    np.testing.assert_array_equal(out, 7.0)


def test_bad_id_in_batch_dims_named_by_index(ops):
    x, W, A, B, scales = ops
    ids = np.zeros((2, 3), dtype=np.uint16)
    ids[1, 2] = 3
    with pytest.raises(IndexError, match=r"adapter_ids\[1, 2\] = 3"):
        rslora.lora_linear_multi(x.reshape(2, 3, 5), W, A, B, ids, scales=scales)


def test_bad_ids_type_and_shape(ops):
    x, W, A, B, scales = ops
    with pytest.raises(TypeError, match="adapter_ids must be integers, got float64"):
        rslora.lora_linear_multi(x, W, A, B, np.zeros(6), scales=scales)
    with pytest.raises(TypeError, match="adapter_ids must be integers, got bool"):
        rslora.lora_linear_multi(x, W, A, B, np.zeros(6, bool), scales=scales)
    with pytest.raises(ValueError, match=r"adapter_ids has shape \(5,\) but x has batch shape \(6,\)"):
        rslora.lora_linear_multi(x, W, A, B, np.zeros(5, int), scales=scales)
    with pytest.raises(TypeError, match="adapter_ids must be a contiguous 1-D int64"):
        _core.lora_add_multi(np.zeros((6, 4)), x, A, B, np.zeros(6, np.int32), np.asarray(scales))


def test_scales_of_the_wrong_length(ops):
    x, W, A, B, scales = ops
    ids = np.zeros(6, int)
    with pytest.raises(ValueError, match=r"scales has shape \(2,\) but there are 3 adapters"):
        rslora.lora_linear_multi(x, W, A, B, ids, scales=scales[:2])
    with pytest.raises(ValueError, match=r"scales has shape \(\) but there are 3 adapters"):
        rslora.lora_add_multi(np.zeros((6, 4)), x, A, B, ids, scales=1.0)
    with pytest.raises(ValueError, match="scales must be finite"):
        rslora.lora_linear_multi(x, W, A, B, ids, scales=[1.0, np.nan, 1.0])
    with pytest.raises(TypeError, match="scales must be real numbers"):
        rslora.lora_linear_multi(x, W, A, B, ids, scales=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"scales has shape \(4,\) but there are 3"):
        _core.lora_add_multi(np.zeros((6, 4)), x, A, B, ids.astype(np.int64), np.ones(4))


def test_mixed_dtypes(ops):
    x, W, A, B, scales = ops
    ids = np.zeros(6, int)
    with pytest.raises(TypeError, match="B_all is float32 but x is float64"):
        rslora.lora_linear_multi(x, W, A, B.astype(np.float32), ids, scales=scales)
    with pytest.raises(TypeError, match="x is float64 but y is float32"):
        rslora.lora_add_multi(np.zeros((6, 4), np.float32), x, A, B, ids, scales=scales)
    with pytest.raises(TypeError, match="A_all must be float32 or float64, got int64"):
        rslora.lora_linear_multi(x, W, A.astype(int), B, ids, scales=scales)


def test_bad_shapes(ops):
    x, W, A, B, scales = ops
    ids = np.zeros(6, int)
    with pytest.raises(ValueError, match=r"A_all has shape \(3, 2, 4\) but x has d_in=5"):
        rslora.lora_linear_multi(x, W, A[:, :, :4], B, ids, scales=scales)
    with pytest.raises(ValueError, match=r"B_all has shape \(3, 4, 1\)"):
        rslora.lora_linear_multi(x, W, A, B[:, :, :1], ids, scales=scales)
    with pytest.raises(ValueError, match=r"B_all has shape \(3, 3, 2\) but W has d_out=4"):
        rslora.lora_linear_multi(x, W, A, B[:, :3], ids, scales=scales)
    with pytest.raises(ValueError, match="A_all must be 3-D"):
        rslora.lora_linear_multi(x, W, A[0], B, ids, scales=scales)
    with pytest.raises(ValueError, match=r"y has shape \(6, 3\)"):
        rslora.lora_add_multi(np.zeros((6, 3)), x, A, B, ids, scales=scales)
    with pytest.raises(ValueError, match="y overlaps x"):
        rslora.lora_add_multi(x[:, :4], x, A, B, ids, scales=scales)
    with pytest.raises(ValueError, match=r"out has shape \(6, 5\)"):
        rslora.lora_linear_multi(x, W, A, B, ids, scales=scales, out=np.empty((6, 5)))
    ro = np.zeros((6, 4))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="y is read-only"):
        rslora.lora_add_multi(ro, x, A, B, ids, scales=scales)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r", [16, 8, 12, 20])
def test_groups_of_every_size_threaded_and_not(dtype, r):
    """Group sizes 1..33 (every register tile and remainder of the small-group kernels, and the
    first GEMM-sized group), d not a multiple of the SIMD width, r on and off the fast paths;
    enough work for the threaded path, which must give the single-thread result bit for bit
    (each group is computed the same way whichever thread takes it)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(r)
    sizes = np.arange(1, 34)
    na, d_in, d_out = len(sizes) + 1, 403, 317
    ids = rng.permutation(np.concatenate([np.full(c, a) for a, c in enumerate(sizes)] + [[-1] * 5]))
    x, W, A, B, scales = make(rng, len(ids), d_in, d_out, r, na, dtype)
    y0 = rng.standard_normal((len(ids), d_out)).astype(dtype)
    got = rslora.lora_add_multi(y0.copy(), x, A, B, ids, scales=scales)
    want = y0 + reference(x, W, A, B, ids, scales) - reference(x, W, A[:, :0], B[:, :, :0], ids, scales)
    close(got, want, dtype)
    with threadpoolctl.threadpool_limits(1):
        one = rslora.lora_add_multi(y0.copy(), x, A, B, ids, scales=scales)
    np.testing.assert_array_equal(got, one)


def test_reversed_rows_and_columns_of_x(rng):
    # negative strides reach the small-group kernels and the gemv path as they are
    x = rng.standard_normal((5, 12))[::-1, ::-1]
    A_all = rng.standard_normal((3, 2, 12))
    B_all = rng.standard_normal((3, 7, 2))
    ids = np.array([0, 2, -1, 1, 2])
    y = rslora.lora_add_multi(np.zeros((5, 7)), x, A_all, B_all, ids, scales=[0.5, 1.0, 2.0])
    ref = np.zeros((5, 7))
    for i, a in enumerate(ids):
        if a >= 0:
            ref[i] = [0.5, 1.0, 2.0][a] * (x[i] @ A_all[a].T) @ B_all[a].T
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reversed_columns_of_y_with_small_groups(dtype):
    # Issue 11: groups of 1-2 rows go through gemv, which refused a reversed y *after* earlier
    # groups had been added, leaving y half-updated. Groups of 1, 2, 3 and 40 rows here.
    rng = np.random.default_rng(7)
    x, W, A, B, scales = make(rng, 46, 9, 7, 3, 4, dtype)
    ids = np.array([0] * 40 + [1, 2, 2, 3, 3, 3])
    rng.shuffle(ids)
    y0 = rng.standard_normal((46, 7)).astype(dtype)
    want = reference(x, np.zeros_like(W), A, B, ids, scales) + y0
    for view in (lambda a: a[:, ::-1], lambda a: a[::-1, ::-1], lambda a: a[::-1]):
        buf = view(y0).copy()
        y = view(buf)  # y0's values, stored reversed
        assert rslora.lora_add_multi(y, x, A, B, ids, scales=scales) is y
        close(y, want, dtype)
        out = view(np.empty_like(y0))
        got = rslora.lora_linear_multi(x, W, A, B, ids, scales=scales, out=out)
        close(got, reference(x, W, A, B, ids, scales), dtype)


@pytest.mark.parametrize("d_in,d_out,r,n", [(0, 4, 2, 3), (5, 0, 2, 3), (0, 0, 2, 3),
                                            (5, 4, 0, 3), (5, 4, 2, 0), (0, 4, 2, 0)])
def test_zero_size_dims(d_in, d_out, r, n):
    # Issue 11: d_in = 0 or d_out = 0 failed ("cannot reshape array of size 0"); every empty
    # dimension gives what the NumPy expression gives (the adapter adds x @ A.T = 0).
    rng = np.random.default_rng(1)
    x, W, A, B, scales = make(rng, n, d_in, d_out, r, 2)
    bias = rng.standard_normal(d_out)
    ids = np.array([0, 1, -1][:n], dtype=np.int64)
    got = rslora.lora_linear_multi(x, W, A, B, ids, scales=scales, bias=bias)
    assert got.shape == (n, d_out)
    close(got, reference(x, W, A, B, ids, scales, bias), np.float64)
    y = rng.standard_normal((n, d_out))
    want = y.copy()
    assert rslora.lora_add_multi(y, x, A, B, ids, scales=scales) is y
    assert np.array_equal(y, want)
    if d_in == 0 and d_out and r and n:  # 0 * Inf = NaN, as in x @ A.T @ B.T
        B[0, 0, 0] = np.inf
        y = np.zeros((n, d_out))
        rslora.lora_add_multi(y, x, A, B, ids, scales=scales)
        assert np.isnan(y[0, 0]) and np.isfinite(np.delete(y.ravel(), 0)).all()
