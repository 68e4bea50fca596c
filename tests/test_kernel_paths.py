"""Every SIMD kernel path (AVX-512, AVX2+FMA, baseline) forced and checked on this machine.

The dispatch picks the best path at load time, so without forcing, an AVX-512 machine would never
run the AVX2 or baseline kernels that other CPUs run. Each path the CPU supports is forced in turn
and the multi-adapter ops are compared with a float64 reference under an error bound derived from
the algorithm (never tuned to one CPU): every output is y0 + s * sum_q B_jq (sum_l A_ql x_l), a
sum of d_in + r products plus two more operations, so in precision u

    |computed - exact| <= gamma_n * (|y0| + |s| |B| (|A| |x|)),  gamma_n = n u / (1 - n u),
    n = d_in + r + 3,

whatever the summation order (lane count, blocking) and with or without FMA. The reference is
float64; for float64 inputs it carries the same bound, so the comparison allows twice it.
Paths not supported here are skipped with the reason the core gives.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import rslora
from rslora import _kernels

PATHS = ["avx512", "avx2", "baseline"]


def _supported(path):
    why = rslora.kernel_paths()[path]
    if why:
        pytest.skip(f"kernel path {path} cannot run here: {why}")


@pytest.fixture(params=PATHS)
def path(request):
    _supported(request.param)
    with rslora.use_kernel_path(request.param):
        yield request.param


def make(rng, n, d_in, d_out, r, na, dtype):
    x = rng.standard_normal((n, d_in)).astype(dtype)
    W = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(dtype)
    A = (rng.standard_normal((na, r, d_in)) / np.sqrt(d_in)).astype(dtype)
    B = rng.standard_normal((na, d_out, r)).astype(dtype)
    scales = rng.uniform(-3.0, 3.0, na)
    return x, W, A, B, scales


def lora_part(x, A, B, ids, scales, absolute=False):
    """Row by row in float64: s * B (A x), or with absolute=True |s| |B| (|A| |x|)."""
    f = (lambda a: np.abs(np.asarray(a, np.float64))) if absolute else (
        lambda a: np.asarray(a, np.float64))
    x, A, B, sc = f(x), f(A), f(B), f(scales)
    out = np.zeros((x.shape[0], B.shape[1]))
    for i, a in enumerate(ids):
        if a >= 0:
            out[i] = sc[a] * (B[a] @ (A[a] @ x[i]))
    return out


def bound(dtype, d_in, r, magnitude):
    u = np.finfo(dtype).eps / 2
    n = d_in + r + 3
    g = n * u / (1 - n * u)
    return (2.0 if dtype == np.float64 else 1.0) * g * magnitude + np.finfo(np.float64).tiny


def group_ids(rng, sizes, n_base=5):
    """Adapter a gets sizes[a] rows (every tile and remainder of the small-group kernels)."""
    ids = np.concatenate([np.full(c, a) for a, c in enumerate(sizes)] + [[-1] * n_base])
    return rng.permutation(ids).astype(np.int64)


CASES = [  # d_in, d_out, r: SIMD widths, tails in d and r, r == 16 (AVX-512 register path)
    (403, 317, 16), (64, 48, 8), (37, 45, 5), (256, 128, 20), (33, 17, 1), (130, 9, 33),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d_in,d_out,r", CASES)
def test_add_multi_within_derived_bound(path, dtype, d_in, d_out, r):
    rng = np.random.default_rng(d_in * 7 + r)
    sizes = list(range(1, 34)) + [0, 40]  # 1..32 small groups, an empty one, a BLAS-sized one
    ids = group_ids(rng, sizes)
    x, _, A, B, scales = make(rng, len(ids), d_in, d_out, r, len(sizes), dtype)
    y0 = rng.standard_normal((len(ids), d_out)).astype(dtype)
    got = rslora.lora_add_multi(y0.copy(), x, A, B, ids, scales=scales)
    want = y0.astype(np.float64) + lora_part(x, A, B, ids, scales)
    mag = np.abs(y0.astype(np.float64)) + lora_part(x, A, B, ids, scales, absolute=True)
    err = np.abs(got - want)
    assert np.all(err <= bound(dtype, d_in, r, mag)), (path, float((err / mag).max()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stack", ["padded rows", "one adapter broadcast"])
def test_add_multi_adapter_layouts_in_the_kernels(path, dtype, stack):
    """Adapters whose rows are not packed (row strides > d_in and > r, unit column stride) or
    that are all one array (stride 0 between adapters) stay in the kernels, whose row strides
    and next-group prefetch must follow them."""
    rng = np.random.default_rng(11)
    d_in, d_out, r = 203, 150, 12
    sizes = [1, 2, 3, 4, 5, 7, 8, 9, 13, 32]
    ids = group_ids(rng, sizes)
    x, _, A, B, scales = make(rng, len(ids), d_in, d_out, r, len(sizes), dtype)
    if stack == "padded rows":
        A_big = np.zeros((len(sizes), r, d_in + 13), dtype)
        B_big = np.zeros((len(sizes), d_out, r + 3), dtype)
        A_big[:, :, :d_in], B_big[:, :, :r] = A, B
        A_in, B_in = A_big[:, :, :d_in], B_big[:, :, :r]
    else:
        A = np.broadcast_to(A[:1], A.shape)
        B = np.broadcast_to(B[:1], B.shape)
        A_in, B_in = A, B
    y0 = rng.standard_normal((len(ids), d_out)).astype(dtype)
    got = rslora.lora_add_multi(y0.copy(), x, A_in, B_in, ids, scales=scales)
    want = y0.astype(np.float64) + lora_part(x, A, B, ids, scales)
    mag = np.abs(y0.astype(np.float64)) + lora_part(x, A, B, ids, scales, absolute=True)
    assert np.all(np.abs(got - want) <= bound(dtype, d_in, r, mag)), (path, stack)


def check_add(x, A, B, ids, scales, y0, d_in, r, what):
    """lora_add_multi on y0's values (in y0's own layout) against the float64 reference."""
    dtype = y0.dtype
    y = y0.copy() if y0.flags.c_contiguous else y0
    want = y0.astype(np.float64) + lora_part(x, A, B, ids, scales)
    mag = np.abs(y0.astype(np.float64)) + lora_part(x, A, B, ids, scales, absolute=True)
    got = rslora.lora_add_multi(y, x, A, B, ids, scales=scales)
    assert got is y
    err = np.abs(got - want)
    assert np.all(err <= bound(dtype, d_in, r, mag)), (what, float((err / mag).max()))


def at_offset(a, offset):
    """A copy of a whose data starts `offset` elements after a 64-byte boundary."""
    item = a.dtype.itemsize
    raw = np.zeros(a.size + 64 // item + offset, a.dtype)
    start = (-raw.ctypes.data % 64) // item + offset
    out = raw[start:start + a.size].reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_multi_any_alignment_of_rows(path, dtype):
    """x, A and y each start 0..7 elements past a 64-byte boundary (NumPy's large arrays start
    16 bytes into a page), with rows a multiple of 32 bytes long or not (every row at another
    offset), and d shorter than one SIMD register."""
    rng = np.random.default_rng(3)
    sizes = [1, 2, 3, 5, 8, 13, 32]
    ids = group_ids(rng, sizes)
    n, na = len(ids), len(sizes)
    for d_in, d_out, r, offs in [(128, 64, 16, (4, 4, 4)), (128, 64, 16, (1, 3, 5)),
                                 (131, 70, 7, (2, 2, 6)), (3, 2, 4, (5, 5, 5)),
                                 (256, 96, 8, (0, 0, 7))]:
        x, _, A, B, scales = make(rng, n, d_in, d_out, r, na, dtype)
        y0 = rng.standard_normal((n, d_out)).astype(dtype)
        xo, Ao, yo = at_offset(x, offs[0]), at_offset(A, offs[1]), at_offset(y0, offs[2])
        check_add(xo, Ao, B, ids, scales, yo, d_in, r, (path, d_in, d_out, r, offs))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_multi_edge_batches(path, dtype):
    """One row; every row on one adapter (a kernel-sized group, then a BLAS-sized one); only
    base rows (-1) but one; rows of x and y with padded row strides (not contiguous)."""
    rng = np.random.default_rng(4)
    d_in, d_out, r, na = 203, 150, 16, 5
    _, _, A, B, scales = make(rng, 1, d_in, d_out, r, na, dtype)
    cases = {
        "n = 1": np.array([3]),
        "all on one adapter, 32 rows": np.full(32, 2),
        "all on one adapter, 70 rows": np.full(70, 4),
        "all base but one": np.array([-1] * 9 + [0] + [-1] * 9),
    }
    for what, ids in cases.items():
        n = len(ids)
        x = rng.standard_normal((n, d_in)).astype(dtype)
        y0 = rng.standard_normal((n, d_out)).astype(dtype)
        check_add(x, A, B, ids, scales, y0, d_in, r, what)
        xp = np.zeros((n, d_in + 9), dtype)[:, 3:3 + d_in]
        xp[...] = x
        yp = np.zeros((n, d_out + 5), dtype)[:, 1:1 + d_out]
        yp[...] = y0
        check_add(xp, A, B, ids, scales, yp, d_in, r, what + ", padded rows")
        base = ids < 0
        if base.any():  # rows with id -1 are left exactly as they were
            np.testing.assert_array_equal(yp[base], y0[base])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_multi_row_order_does_not_change_a_bit(path, dtype):
    """Random and sorted ids run the same arithmetic per row: each row's result is the same bits
    wherever it sits in the batch, whichever rows share its tile, and wherever in memory the
    arrays lie (the permuted copies are new arrays: the summation order never follows the
    address, so two runs of one program give the same bits)."""
    rng = np.random.default_rng(6)
    d_in, d_out, r, na = 300, 200, 16, 12
    ids = rng.integers(-1, na, 150)
    x, _, A, B, scales = make(rng, len(ids), d_in, d_out, r, na, dtype)
    y0 = rng.standard_normal((len(ids), d_out)).astype(dtype)
    got = rslora.lora_add_multi(y0.copy(), x, A, B, ids, scales=scales)
    order = np.argsort(ids, kind="stable")
    for perm in (order, rng.permutation(len(ids)), order[::-1]):
        moved = rslora.lora_add_multi(y0[perm].copy(), x[perm], A, B, ids[perm], scales=scales)
        np.testing.assert_array_equal(moved, got[perm])
    for off in (1, 2, 3):  # the same values at other addresses
        y = at_offset(y0, off)
        rslora.lora_add_multi(y, at_offset(x, off), at_offset(A, 3 - off), B, ids, scales=scales)
        np.testing.assert_array_equal(y, got)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_multi_within_derived_bound(path, dtype):
    rng = np.random.default_rng(5)
    n, d_in, d_out, r, na = 70, 129, 67, 12, 20
    x, W, A, B, scales = make(rng, n, d_in, d_out, r, na, dtype)
    ids = rng.integers(-1, na, n)
    got = rslora.lora_linear_multi(x, W, A, B, ids, scales=scales)
    base = x.astype(np.float64) @ W.T.astype(np.float64)
    want = base + lora_part(x, A, B, ids, scales)
    mag = np.abs(x.astype(np.float64)) @ np.abs(W.T.astype(np.float64)) + lora_part(
        x, A, B, ids, scales, absolute=True)
    assert np.all(np.abs(got - want) <= bound(dtype, d_in, r, mag))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threads_do_not_change_the_result(path, dtype):
    """The split of groups over threads is invisible: bit-identical to one thread, per path."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(1)
    ids = group_ids(rng, list(range(1, 34)))
    x, _, A, B, scales = make(rng, len(ids), 403, 317, 16, 33, dtype)
    y0 = rng.standard_normal((len(ids), 317)).astype(dtype)
    got = rslora.lora_add_multi(y0.copy(), x, A, B, ids, scales=scales)
    with threadpoolctl.threadpool_limits(1):
        one = rslora.lora_add_multi(y0.copy(), x, A, B, ids, scales=scales)
    np.testing.assert_array_equal(got, one)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_paths_agree_and_really_differ(dtype):
    """Every supported pair agrees within twice the bound; and the forced paths are really
    different code (lane counts and FMA change the rounding), so forcing is not a no-op."""
    supported = _kernels.supported_kernel_paths()
    if len(supported) < 2:
        pytest.skip(f"only {supported} can run here: nothing to compare")
    rng = np.random.default_rng(2)
    d_in, d_out, r = 403, 317, 16
    ids = group_ids(rng, list(range(1, 34)))
    x, _, A, B, scales = make(rng, len(ids), d_in, d_out, r, 33, dtype)
    y0 = np.zeros((len(ids), d_out), dtype)
    out = {}
    for p in supported:
        with rslora.use_kernel_path(p):
            out[p] = rslora.lora_add_multi(y0.copy(), x, A, B, ids, scales=scales)
    mag = lora_part(x, A, B, ids, scales, absolute=True)
    for p in supported:
        for q in supported:
            if p < q:
                diff = np.abs(out[p].astype(np.float64) - out[q])
                assert np.all(diff <= 2 * bound(dtype, d_in, r, mag)), (p, q)
                assert not np.array_equal(out[p], out[q]), f"{p} and {q} gave identical bits"


def test_set_kernel_path_refuses_unknown_and_restores():
    before = rslora.kernel_path()
    with pytest.raises(ValueError, match="unknown kernel path 'sse4'.*avx512.*avx2.*baseline"):
        rslora.set_kernel_path("sse4")
    with pytest.raises(TypeError, match="kernel path must be a str"):
        rslora.set_kernel_path(2)
    assert rslora.kernel_path() == before
    with pytest.raises(ValueError), rslora.use_kernel_path("baseline"):
        raise ValueError("inside")
    assert rslora.kernel_path() == before


def test_default_is_best_and_matches_cpu_flags():
    """The reasons the core gives agree with the flags the kernel reports for this CPU."""
    paths = rslora.kernel_paths()
    assert paths["baseline"] == ""
    assert rslora.kernel_paths() == paths
    if os.environ.get(_kernels.ENV, "auto") in ("", "auto"):
        assert rslora.kernel_path() == _kernels.supported_kernel_paths()[0]
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.search(r"^flags\s*:(.*)$", f.read(), re.MULTILINE).group(1).split())
    except (OSError, AttributeError):
        pytest.skip("no /proc/cpuinfo flags to compare with")
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        assert paths["avx2"] and paths["avx512"]
        return
    assert (paths["avx2"] == "") == ({"avx2", "fma"} <= flags)
    assert (paths["avx512"] == "") == ("avx512f" in flags)


@pytest.mark.parametrize("path_name", PATHS)
def test_unsupported_path_is_refused(path_name):
    why = rslora.kernel_paths()[path_name]
    if not why:
        pytest.skip(f"{path_name} runs here: the refusal is checked on CPUs without it")
    with pytest.raises(ValueError, match=f"kernel path '{path_name}' cannot run here: {why}"):
        rslora.set_kernel_path(path_name)


def _run(env_value, code):
    env = dict(os.environ, **{_kernels.ENV: env_value})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False,
                          timeout=120)


def test_environment_variable_forces_the_path_and_show_config_reports_it():
    p = "baseline"
    res = _run(p, "import rslora; print(rslora.kernel_path()); "
                  "print(rslora.show_config(print_=False)['kernels']['path']); rslora.show_config()")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:2] == [p, p]
    kernels_line = [ln for ln in lines if ln.strip().startswith("kernels:")]
    assert kernels_line and f"kernels: {p}" in kernels_line[0]
    if _kernels.supported_kernel_paths()[0] != p:
        assert "forced" in kernels_line[0]


def test_environment_variable_bad_value_fails_import_naming_it():
    res = _run("avx1024", "import rslora")
    assert res.returncode != 0
    assert "RSLORA_CPU_KERNELS='avx1024': unknown kernel path" in res.stderr
