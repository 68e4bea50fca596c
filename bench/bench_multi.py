"""Multi-adapter LoRA (SGMV/BGMV) against NumPy formulations, the base GEMM and a memory floor.

    python -m pytest bench/bench_multi.py --benchmark-json=/tmp/multi.json
    python bench/report.py /tmp/multi.json

float32, d_in = d_out = 4096, r = 16, 64 adapters (A_all and B_all: 34 MB together).
- "numpy masks": a Python loop over adapters with boolean masks (what one writes by hand).
- "numpy einsum gather": gather each row's A and B (n * 2 * r * d floats) and einsum.
- "floor: read adapters": streaming every adapter once (a dot product over A_all and B_all),
  the memory traffic no implementation can avoid when every adapter is used. The dot product is
  OpenBLAS's (threaded like the op); "floor: max over adapters" reads the same bytes with NumPy's
  max reduction (one thread, a faster read here), a stricter floor.
- "floor: adapters, x and y once": what the op itself cannot avoid moving: the adapters and x
  read once, y read and written once (max reductions and an in-place y *= 1, one thread). With
  x and y as large as here (n = 512 rows of 16 KB each) this is about 1.7x the adapters' bytes.
- "rslora, <path> forced": the same op with the SIMD kernel path forced (rslora.use_kernel_path),
  so one machine times the AVX2 and baseline kernels that other CPUs run; "rslora" itself runs
  the best path here, named in the row ("default kernel: ...") and in the entry's extra_info.
- "base x @ W.T" and "lora_linear": the whole op against the base GEMM alone, and against the
  single-adapter fused forward when every row is on one adapter.
- "other build, <path> forced": with RSLORA_BENCH_OTHER=<site dir> (a folder holding another
  build's ``rslora`` package, e.g. ``pip install --target DIR`` of main), that build's op in the
  same run, loaded beside this one as ``rslora_other``: A/B of two builds side by side.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import numpy as np
import pytest
from benchutil import set_case

import rslora

D, R, NA = 4096, 16, 64
DT = np.float32


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    A_all = (rng.standard_normal((NA, R, D), dtype=DT) / np.float32(np.sqrt(D)))
    B_all = rng.standard_normal((NA, D, R), dtype=DT)
    W = rng.standard_normal((D, D), dtype=DT) / np.float32(np.sqrt(D))
    scales = np.array([rslora.scale(a, R) for a in rng.uniform(8, 32, NA)])
    return dict(A=A_all, B=B_all, W=W, scales=scales, rng=rng)


def batch(data, kind):
    rng = np.random.default_rng(1)
    if kind == "n=512 random ids":
        n, ids = 512, rng.integers(0, NA, 512)
    elif kind == "n=512 sorted ids":
        n, ids = 512, np.sort(rng.integers(0, NA, 512))
    elif kind == "decode n=64, one adapter each":
        n, ids = 64, rng.permutation(NA)
    else:
        raise ValueError(kind)
    x = rng.standard_normal((n, D), dtype=DT)
    y0 = rng.standard_normal((n, D), dtype=DT)
    return x, y0, ids


def reference_add(y0, x, data, ids):
    """float64, one adapter at a time."""
    y = y0.astype(np.float64)
    x64 = x.astype(np.float64)
    for a in np.unique(ids[ids >= 0]):
        m = ids == a
        y[m] += data["scales"][a] * (x64[m] @ data["A"][a].T.astype(np.float64)) @ data["B"][a].T.astype(np.float64)
    return y


def assert_close(got, want, tol=2e-4):
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, err


def numpy_masks(y, x, A_all, B_all, ids, scales):
    for a in range(A_all.shape[0]):
        m = ids == a
        if m.any():
            y[m] += scales[a] * (x[m] @ A_all[a].T) @ B_all[a].T
    return y


def numpy_einsum(y, x, A_all, B_all, ids, scales):
    xa = np.einsum("ni,nri->nr", x, A_all[ids]) * scales[ids][:, None]
    y += np.einsum("nr,nor->no", xa, B_all[ids])
    return y


def other_build():
    """The rslora package under RSLORA_BENCH_OTHER (a site folder), imported as rslora_other."""
    site = os.environ.get("RSLORA_BENCH_OTHER")
    if not site:
        return None
    if "rslora_other" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "rslora_other", os.path.join(site, "rslora", "__init__.py"),
            submodule_search_locations=[os.path.join(site, "rslora")])
        if spec is None or spec.loader is None:
            raise ValueError(f"RSLORA_BENCH_OTHER={site!r}: no rslora package there")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["rslora_other"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["rslora_other"]


ADD_KINDS = ["n=512 random ids", "n=512 sorted ids", "decode n=64, one adapter each"]
PEERS = {"numpy masks": numpy_masks, "numpy einsum gather": numpy_einsum}


def run(benchmark, fn, rounds=10):
    # Each entry first checks its result with threaded float64 NumPy products, after which
    # OpenBLAS's worker spins for ~0.1 s on the other core: rounds timed then ran at one core's
    # speed (2x, in some runs and not others). Half a second of sleep lets it go to sleep.
    if not benchmark.disabled:
        time.sleep(0.5)
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def row_name(kind):
    """One row per batch kind, naming the kernel path the unforced entry runs."""
    return f"lora_add_multi {kind} (default kernel: {rslora.kernel_path()})"


@pytest.mark.parametrize("kind", ADD_KINDS)
def test_add_rslora(benchmark, data, kind):
    x, y0, ids = batch(data, kind)
    set_case(benchmark, row_name(kind), "rslora", kernel_path=rslora.kernel_path())
    y = y0.copy()
    rslora.lora_add_multi(y, x, data["A"], data["B"], ids, scales=data["scales"])
    assert_close(y, reference_add(y0, x, data, ids))
    run(benchmark, lambda: rslora.lora_add_multi(y, x, data["A"], data["B"], ids,
                                                 scales=data["scales"]), rounds=20)


@pytest.mark.parametrize("kind", ADD_KINDS)
@pytest.mark.parametrize("path", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("build", ["rslora", "other build"])
def test_add_forced_path(benchmark, data, kind, path, build):
    lib = rslora if build == "rslora" else other_build()
    if lib is None:
        pytest.skip("RSLORA_BENCH_OTHER is not set: no other build to compare with")
    why = lib.kernel_paths()[path]
    if why:
        pytest.skip(f"{path}: {why}")
    x, y0, ids = batch(data, kind)
    set_case(benchmark, row_name(kind), f"{build}, {path} forced", kernel_path=path)
    with lib.use_kernel_path(path):
        y = y0.copy()
        lib.lora_add_multi(y, x, data["A"], data["B"], ids, scales=data["scales"])
        assert_close(y, reference_add(y0, x, data, ids))
        run(benchmark, lambda: lib.lora_add_multi(y, x, data["A"], data["B"], ids,
                                                  scales=data["scales"]), rounds=20)


@pytest.mark.parametrize("kind", ADD_KINDS)
@pytest.mark.parametrize("peer", list(PEERS))
def test_add_numpy(benchmark, data, kind, peer):
    x, y0, ids = batch(data, kind)
    set_case(benchmark, row_name(kind), peer)
    fn, sc = PEERS[peer], data["scales"].astype(DT)
    y = fn(y0.copy(), x, data["A"], data["B"], ids, sc)
    assert_close(y, reference_add(y0, x, data, ids))
    run(benchmark, lambda: fn(y, x, data["A"], data["B"], ids, sc),
        rounds=3 if peer == "numpy einsum gather" else 10)


@pytest.mark.parametrize("kind", ADD_KINDS)
def test_add_floor(benchmark, data, kind):
    """Reading each adapter that the batch uses once (every adapter here but for decode)."""
    _, _, ids = batch(data, kind)
    used = np.unique(ids)
    A_used, B_used = data["A"][used].reshape(-1), data["B"][used].reshape(-1)
    ones = np.ones_like(A_used)
    set_case(benchmark, row_name(kind), "floor: read adapters",
             mbytes=(A_used.nbytes + B_used.nbytes) / 1e6)
    total = run(benchmark, lambda: A_used @ ones + B_used @ ones, rounds=20)
    assert total == pytest.approx(A_used.astype(np.float64).sum() + B_used.astype(np.float64).sum(),
                                  rel=1e-3, abs=1.0)


@pytest.mark.parametrize("kind", ADD_KINDS)
def test_add_floor_max(benchmark, data, kind):
    """The same bytes read by a max reduction (no multiply-add, one thread)."""
    _, _, ids = batch(data, kind)
    used = np.unique(ids)
    A_used, B_used = data["A"][used].reshape(-1), data["B"][used].reshape(-1)
    set_case(benchmark, row_name(kind), "floor: max over adapters",
             mbytes=(A_used.nbytes + B_used.nbytes) / 1e6)
    got = run(benchmark, lambda: (A_used.max(), B_used.max()), rounds=20)
    assert got == (A_used.astype(np.float64).max(), B_used.astype(np.float64).max())


@pytest.mark.parametrize("kind", ADD_KINDS)
def test_add_floor_op_bytes(benchmark, data, kind):
    """The adapters and x read once, y read and written once: the op's own unavoidable traffic."""
    x, y0, ids = batch(data, kind)
    used = np.unique(ids)
    A_used, B_used = data["A"][used].reshape(-1), data["B"][used].reshape(-1)
    y = y0.copy()
    set_case(benchmark, row_name(kind), "floor: adapters, x and y once",
             mbytes=(A_used.nbytes + B_used.nbytes + x.nbytes + 2 * y.nbytes) / 1e6)
    one = np.float32(1)
    got = run(benchmark, lambda: (A_used.max(), B_used.max(), x.max(),
                                  np.multiply(y, one, out=y)), rounds=20)
    assert got[:3] == (A_used.max(), B_used.max(), x.max())
    np.testing.assert_array_equal(y, y0)


# --- the whole op -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whole(data):
    x, _, ids = batch(data, "n=512 random ids")
    x64, W64 = x.astype(np.float64), data["W"].astype(np.float64)
    ref = reference_add(x64 @ W64.T, x, data, ids)
    return x, ids, ref


def test_linear_multi_rslora(benchmark, data, whole):
    x, ids, ref = whole
    set_case(benchmark, "lora_linear_multi n=512 over 64 adapters", "rslora")
    y = run(benchmark, lambda: rslora.lora_linear_multi(x, data["W"], data["A"], data["B"], ids,
                                                        scales=data["scales"]), rounds=5)
    assert_close(y, ref)


def test_linear_multi_base(benchmark, data, whole):
    x, ids, ref = whole
    set_case(benchmark, "lora_linear_multi n=512 over 64 adapters", "base x @ W.T")
    y = run(benchmark, lambda: x @ data["W"].T, rounds=5)
    assert_close(rslora.lora_add_multi(y, x, data["A"], data["B"], ids, scales=data["scales"]), ref)


@pytest.fixture(scope="module")
def one(data):
    x, _, _ = batch(data, "n=512 random ids")
    ids = np.full(x.shape[0], 7)
    x64 = x.astype(np.float64)
    ref = x64 @ data["W"].T.astype(np.float64) + data["scales"][7] * (
        (x64 @ data["A"][7].T.astype(np.float64)) @ data["B"][7].T.astype(np.float64))
    return x, ids, ref


def test_one_adapter_rslora(benchmark, data, one):
    x, ids, ref = one
    set_case(benchmark, "lora_linear_multi n=512, every row on one adapter", "rslora")
    y = run(benchmark, lambda: rslora.lora_linear_multi(x, data["W"], data["A"], data["B"], ids,
                                                        scales=data["scales"]), rounds=5)
    assert_close(y, ref)


def test_one_adapter_lora_linear(benchmark, data, one):
    x, ids, ref = one
    set_case(benchmark, "lora_linear_multi n=512, every row on one adapter", "lora_linear")
    y = run(benchmark, lambda: rslora.lora_linear(x, data["W"], data["A"][7], data["B"][7],
                                                  scale=data["scales"][7]), rounds=5)
    assert_close(y, ref)
