"""rsvd's passes over M split into row blocks on rslora's own threads (blas_split.cpp).

Each block is a one-thread GEMM over a row range fixed by the shapes alone, so what it computes
does not depend on which thread ran it, on timing, or on the thread count: in float32 rsvd at 2
and 3 BLAS threads gives the same bits. At one thread the passes are whole GEMMs; OpenBLAS's
SkylakeX kernels round them as the blocks, its Haswell ones (what AVX2-only CPUs run) do not, so
one thread is compared to a few ulps. In float64 other calls in rsvd (a long-inner-dimension
dgemm in the convergence check) still round differently at 1 and 2 threads, so there runs are
compared with each other at one count, and with one thread to a few ulps. The helpers never exceed the BLAS thread count, leave NumPy's
count as it was, survive fork and Ctrl-C, and serve several calling threads at once.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import rslora
from rslora import _core
from testutil import run_in_threads

threadpoolctl = pytest.importorskip("threadpoolctl")
if not _core.blas_has_local_thread_setter():
    pytest.skip("no openblas_set_num_threads_local: the passes are not split", allow_module_level=True)


def _matrix(m, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    p = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, p)))
    V, _ = np.linalg.qr(rng.standard_normal((n, p)))
    return ((U * (1.0 + np.arange(p)) ** -0.5) @ V.T).astype(dtype)


def _rsvd(M, threads, split=True, **kw):
    prev = _core._blas_split_passes(split)
    try:
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            return rslora.rsvd(M, 40, seed=3, **kw)
    finally:
        _core._blas_split_passes(prev)


def _assert_good(out, M):
    U, S, Vt = (x.astype(np.float64) for x in out)
    M64 = M.astype(np.float64)
    opt = np.linalg.svd(M64, compute_uv=False)
    assert np.linalg.norm(M64 - (U * S) @ Vt) <= 1.02 * np.sqrt(np.sum(opt[40:] ** 2))


def _inputs(dtype):
    # Shapes whose passes split (>= 8 M multiply-adds, >= 128 rows), tall and wide (the passes
    # then run on M^T), C- and Fortran-ordered, and a strided view with a row count that is no
    # multiple of the block unit.
    big = _matrix(1203, 400, dtype, seed=1)
    return {"wide": _matrix(300, 700, dtype), "tall F": np.asfortranarray(_matrix(700, 300, dtype)),
            "strided": big[::2, :]}


def _assert_ulps_close(got, want, ulps):
    """Factors within ulps of want's dtype (singular values: of the largest). The float32
    passes as whole GEMMs (Haswell kernels) against blocks give up to 20 here."""
    for a, b in zip(got, want):
        scale = np.abs(b).max() if a.ndim == 1 else 1.0
        np.testing.assert_allclose(a, b, rtol=0, atol=ulps * np.finfo(b.dtype).eps * scale)


@pytest.mark.parametrize("name", ["wide", "tall F", "strided"])
def test_float32_same_bits_at_any_thread_count(name):
    M = _inputs(np.float32)[name]
    one = _rsvd(M, 1, split=False)
    _assert_good(one, M)
    ref = _rsvd(M, 2)
    _assert_ulps_close(ref, one, 200)
    for a, b in zip(_rsvd(M, 3), ref):
        np.testing.assert_array_equal(a, b)
    for kw in (dict(method="krylov", n_iter=2), dict(n_iter=1, normalizer="lu")):
        ref = _rsvd(M, 2, **kw)
        _assert_ulps_close(ref, _rsvd(M, 1, split=False, **kw), 200)
        for a, b in zip(_rsvd(M, 3, **kw), ref):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["wide", "strided"])
def test_float64_repeatable_and_close_to_one_thread(name):
    M = _inputs(np.float64)[name]
    first = _rsvd(M, 2)
    stop = threading.Event()

    def spin():  # shifts the helpers' timing: which thread runs which block must not matter
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        for _ in range(3):
            for a, b in zip(_rsvd(M, 2), first):
                np.testing.assert_array_equal(a, b)
    finally:
        stop.set()
        spinner.join()
    _assert_ulps_close(first, _rsvd(M, 1, split=False), 1e4)
    _assert_good(first, M)


def test_concurrent_callers_share_the_helpers():
    M = _inputs(np.float32)["wide"]
    ref = _rsvd(M, 2)
    before = threadpoolctl.threadpool_info()

    def work():
        for _ in range(4):
            for a, b in zip(rslora.rsvd(M, 40, seed=3), ref):
                np.testing.assert_array_equal(a, b)

    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        run_in_threads(work)
    assert [i["num_threads"] for i in threadpoolctl.threadpool_info()] == \
        [i["num_threads"] for i in before]


_CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, threadpoolctl, rslora
    from rslora import _core
    def tasks():
        return len(os.listdir("/proc/self/task"))
    M = np.random.default_rng(0).standard_normal((300, 700)).astype(np.float32)
    blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    helpers = 0
    counts = {}
    for limit in (1, 2, 3):
        with threadpoolctl.threadpool_limits(limit, user_api="blas"):
            M @ M.T  # OpenBLAS grows its own pool to the limit first
            before = tasks()
            out = rslora.rsvd(M, 40, seed=3)
            helpers += tasks() - before  # rslora's helpers alone (they stay, asleep)
            counts[limit] = helpers
        assert [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"] \\
            == [i["num_threads"] for i in blas]
    assert counts[1] == 0 and counts[2] <= 1 and counts[3] <= 2, counts
    pid = os.fork()  # the helpers are not in the child: it must start its own, not wait on them
    if pid == 0:
        signal.alarm(60)
        with threadpoolctl.threadpool_limits(2, user_api="blas"):
            again = rslora.rsvd(M, 40, seed=3)
        os._exit(0 if all(np.array_equal(a, b) for a, b in zip(again, out)) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    print("ok", counts)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task and fork")
def test_helpers_within_the_thread_limit_and_fork_safe():
    run = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr


def test_ctrl_c_interrupts_split_passes():
    M = _matrix(500, 500, np.float64)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with threadpoolctl.threadpool_limits(2, user_api="blas"), pytest.raises(KeyboardInterrupt):
            rslora.rsvd(M, 50, n_iter=100000, seed=0)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
