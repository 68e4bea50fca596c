"""Backward of the fused LoRA linear layer against the NumPy expressions and its GEMM floor.

    python -m pytest bench/bench_backward.py --benchmark-json=/tmp/bw.json
    python bench/report.py /tmp/bw.json

The "gemm floor" entry runs the GEMMs the backward must do, back to back into preallocated
outputs (dy W, dy B, (dy B) A, (dy B)^T x, dy^T xa): no code doing the same math can go below it.
"""

from __future__ import annotations

import numpy as np
import pytest
from benchutil import set_case

import rslora

SIZES = {
    "f32 n=2048 d=4096 r=64": (np.float32, 2048, 4096, 4096, 64),
    "f64 n=512 d=2048 r=16": (np.float64, 512, 2048, 2048, 16),
}
ALPHA = 16.0


@pytest.fixture(scope="module", params=list(SIZES))
def case(request):
    dtype, n, d_in, d_out, r = SIZES[request.param]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d_in), dtype=np.float32).astype(dtype)
    W = (rng.standard_normal((d_out, d_in), dtype=np.float32) / np.float32(np.sqrt(d_in))).astype(dtype)
    A = (rng.standard_normal((r, d_in), dtype=np.float32) / np.float32(np.sqrt(d_in))).astype(dtype)
    B = rng.standard_normal((d_out, r), dtype=np.float32).astype(dtype)
    dy = rng.standard_normal((n, d_out), dtype=np.float32).astype(dtype)
    s = rslora.scale(ALPHA, r)
    xa = x @ A.T
    # float64 references: dA and dB in full, dx on a subset of rows (its full GEMM is the cost)
    f = lambda a: a.astype(np.float64)
    g64 = s * f(dy) @ f(B)
    rows = np.arange(0, n, max(1, n // 16))
    ref = dict(dx_rows=rows, dx=f(dy[rows]) @ f(W) + g64[rows] @ f(A), dA=g64.T @ f(x),
               dB=s * f(dy).T @ (f(x) @ f(A).T))
    tol = 2e-3 if dtype == np.float32 else 1e-9
    return dict(name=request.param, x=x, W=W, A=A, B=B, dy=dy, s=s, xa=xa, ref=ref, tol=tol)


def check(c, dx, dA, dB):
    ref = c["ref"]
    for got, want in ((dx[ref["dx_rows"]] if dx is not None else None, ref["dx"]), (dA, ref["dA"]),
                      (dB, ref["dB"])):
        if got is None:
            continue
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < c["tol"], err


def run(benchmark, fn):
    return benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


def test_rslora(benchmark, case):
    c = case
    set_case(benchmark, f"backward {c['name']}", "rslora")
    res = run(benchmark, lambda: rslora.lora_linear_backward(c["dy"], c["x"], c["W"], c["A"],
                                                             c["B"], scale=c["s"], xa=c["xa"]))
    check(c, *res)


def test_rslora_xa_recomputed(benchmark, case):
    c = case
    set_case(benchmark, f"backward {c['name']}", "rslora, xa recomputed")
    res = run(benchmark, lambda: rslora.lora_linear_backward(c["dy"], c["x"], c["W"], c["A"],
                                                             c["B"], scale=c["s"]))
    check(c, *res)


def numpy_backward(dy, x, W, A, B, s, xa):
    g = s * (dy @ B)  # shared by dx and dA, as a careful NumPy user would write it
    return dy @ W + g @ A, g.T @ x, s * (dy.T @ xa)


def test_numpy(benchmark, case):
    c = case
    set_case(benchmark, f"backward {c['name']}", "numpy")
    s = c["x"].dtype.type(c["s"])
    res = run(benchmark, lambda: numpy_backward(c["dy"], c["x"], c["W"], c["A"], c["B"], s, c["xa"]))
    check(c, *res)


def test_gemm_floor(benchmark, case):
    c = case
    dy, x, W, A, B, xa = (c[k] for k in ("dy", "x", "W", "A", "B", "xa"))
    n, d_in, r, d_out = x.shape[0], x.shape[1], A.shape[0], W.shape[0]
    bufs = [np.empty(sh, x.dtype) for sh in ((n, d_in), (n, r), (n, d_in), (r, d_in), (d_out, r))]
    base, g, lora, dA, dB = bufs

    def gemms():
        np.matmul(dy, W, out=base)
        np.matmul(dy, B, out=g)
        np.matmul(g, A, out=lora)
        np.matmul(g.T, x, out=dA)
        np.matmul(dy.T, xa, out=dB)

    set_case(benchmark, f"backward {c['name']}", "gemm floor")
    run(benchmark, gemms)
    s = c["s"]
    check(c, base + s * lora, s * dA, s * dB)


def test_rslora_only_adapter_grads(benchmark, case):
    """First layer of a network: no dx wanted, only the adapter's gradients."""
    c = case
    set_case(benchmark, f"backward A,B only {c['name']}", "rslora")
    res = run(benchmark, lambda: rslora.lora_linear_backward(
        c["dy"], c["x"], c["W"], c["A"], c["B"], scale=c["s"], xa=c["xa"], need=("A", "B")))
    assert res[0] is None
    check(c, *res)


def test_numpy_only_adapter_grads(benchmark, case):
    c = case
    set_case(benchmark, f"backward A,B only {c['name']}", "numpy")
    s = c["x"].dtype.type(c["s"])

    def grads():
        g = s * (c["dy"] @ c["B"])
        return None, g.T @ c["x"], s * (c["dy"].T @ c["xa"])

    check(c, *run(benchmark, grads))
