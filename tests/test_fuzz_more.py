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
@pytest.mark.parametrize("where", ["x", "A", "B"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_multi_scale_zero_keeps_nan(path, threads, dtype, rows, layout, where, bad):
    """y += 0 * (x A^T) B^T is NaN where x, A or B holds NaN/Inf, on every route of the rows:
    the kernels did this, but the BLAS routes (big groups, strided rows) passed alpha = 0 to
    BLAS, which skipped the product and left y as it was."""
    rng = np.random.default_rng(rows)
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
