"""Fused forward and merge vs NumPy, side by side (float32, d_in = d_out = 4096).

    python -m pytest bench/bench_linear.py --benchmark-json=/tmp/linear.json
    python bench/report.py /tmp/linear.json

Roles in each group: rslora = lora_linear; numpy = ``x @ W.T + s * ((x @ A.T) @ B.T)``;
base = ``x @ W.T`` alone (the floor: the LoRA branch should cost no more than its own FLOPs).
Group "layer forward": rslora = packed LoRALinear (two GEMMs), unpacked = the same layer with
copy=False (three GEMMs), base = ``x @ W.T``.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import rslora
from benchutil import set_case

D = 4096
NS = [1, 16, 256, 2048]
RANKS = [8, 64, 256]


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((D, D), dtype=np.float32) / np.float32(np.sqrt(D))
    A = rng.standard_normal((max(RANKS), D), dtype=np.float32) / np.float32(np.sqrt(D))
    B = rng.standard_normal((D, max(RANKS)), dtype=np.float32)
    X = rng.standard_normal((max(NS), D), dtype=np.float32)
    return X, W, A, B


def check(y, x, W, A, B, s):
    # float64 reference on a few rows (the full one would dominate the suite's time as a test)
    rows = slice(0, min(4, x.shape[0]))
    xd = x[rows].astype(np.float64)
    ref = xd @ W.T.astype(np.float64) + s * (xd @ A.T.astype(np.float64)) @ B.T.astype(np.float64)
    np.testing.assert_allclose(y[rows], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("role", ["rslora", "numpy", "base"])
def test_forward(benchmark, weights, n, r, role):
    X, W, A0, B0 = weights
    x, A, B = X[:n], np.ascontiguousarray(A0[:r]), np.ascontiguousarray(B0[:, :r])
    s = rslora.scale(16, r)
    set_case(benchmark, f"forward n={n} r={r}", role, n=n, r=r)
    if role == "rslora":
        out = np.empty((n, D), np.float32)
        y = benchmark(rslora.lora_linear, x, W, A, B, scale=s, out=out)
        check(y, x, W, A, B, s)
    elif role == "numpy":
        y = benchmark(lambda: x @ W.T + np.float32(s) * ((x @ A.T) @ B.T))
        check(y, x, W, A, B, s)
    else:
        y = benchmark(lambda: x @ W.T)
        check(y, x, W, A, B, 0.0)


@pytest.mark.parametrize("role", ["rslora", "unpacked", "base"])
def test_layer_packed(benchmark, weights, role):
    # LoRALinear's packed forward ([W; A] in one buffer: one GEMM for x W^T and x A^T, then the
    # expand with beta = 1) vs the same layer on three GEMMs (copy=False) vs x @ W.T alone.
    n, r = 256, 64
    X, W, A0, B0 = weights
    x, A, B = X[:n], np.ascontiguousarray(A0[:r]), np.ascontiguousarray(B0[:, :r])
    set_case(benchmark, f"layer forward n={n} r={r}", role, n=n, r=r)
    if role == "base":
        y = benchmark(lambda: x @ W.T)
        check(y, x, W, A, B, 0.0)
        return
    layer = rslora.LoRALinear(W, A, B, alpha=16, copy=role == "rslora")
    assert layer._is_packed() == (role == "rslora")
    y = benchmark(layer.forward, x, cache=False)
    check(y, x, W, A, B, layer.scaling)


@pytest.mark.parametrize("role", ["rslora", "numpy"])
def test_merge(benchmark, weights, role):
    _, W0, A0, B0 = weights
    A, B = np.ascontiguousarray(A0[:64]), np.ascontiguousarray(B0[:, :64])
    s = np.float32(rslora.scale(16, 64))
    W = W0.copy()
    set_case(benchmark, "merge 4096x4096 r=64", role)
    # Each round merges once; W drifts by s*B@A per round, checked against the round count.
    rounds = {"n": 0}

    def ours():
        rslora.merge(W, A, B, scale=float(s))
        rounds["n"] += 1

    def numpy_way():
        nonlocal W
        W += s * (B @ A)
        rounds["n"] += 1

    benchmark(ours if role == "rslora" else numpy_way)
    k = rounds["n"]
    ref = W0[:8].astype(np.float64) + k * float(s) * B[:8].astype(np.float64) @ A.astype(np.float64)
    np.testing.assert_allclose(W[:8], ref, rtol=1e-3, atol=1e-3 * k * np.abs(ref).max())


@pytest.mark.parametrize("role", ["rslora", "numpy", "alternating"])
def test_interleaved_with_numpy(benchmark, weights, role):
    """One BLAS pool: lora_linear and a NumPy matmul called alternately each keep their time.

    'alternating' runs one lora_linear and one NumPy matmul; compare it with rslora + numpy.
    """
    X, W, A0, B0 = weights
    x, A, B = X[:256], np.ascontiguousarray(A0[:64]), np.ascontiguousarray(B0[:, :64])
    out = np.empty((256, D), np.float32)
    set_case(benchmark, "interleave n=256 r=64", role)
    calls = {
        "rslora": lambda: rslora.lora_linear(x, W, A, B, scale=2.0, out=out),
        "numpy": lambda: x @ W.T,
        "alternating": lambda: (rslora.lora_linear(x, W, A, B, scale=2.0, out=out), x @ W.T),
    }
    benchmark(calls[role])
    check(out if role != "numpy" else rslora.lora_linear(x, W, A, B, scale=2.0), x, W, A, B, 2.0)


@pytest.mark.parametrize("n,r", [(256, 64), (2048, 64)])
def test_peak_memory(benchmark, weights, n, r):
    """Peak memory beyond the output: O(n r) for rslora, O(n d_out) for the NumPy expression."""
    X, W, A0, B0 = weights
    x, A, B = X[:n], np.ascontiguousarray(A0[:r]), np.ascontiguousarray(B0[:, :r])

    def peak(fn):
        tracemalloc.start()
        y = fn()
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return p - y.nbytes

    ours = peak(lambda: rslora.lora_linear(x, W, A, B, scale=2.0))
    theirs = peak(lambda: x @ W.T + np.float32(2.0) * ((x @ A.T) @ B.T))
    set_case(benchmark, f"peak memory n={n} r={r}", "rslora", peak_extra_bytes=ours,
             numpy_peak_extra_bytes=theirs)
    benchmark.pedantic(lambda: None, rounds=1)
    assert ours <= n * r * 4 + 16384
    assert theirs >= n * D * 4
