"""Shared helpers for the tests (import as ``from testutil import tol``)."""

import numpy as np


def tol(dtype) -> float:
    """Relative tolerance for a result computed in dtype against a float64 reference."""
    return 2e-5 if np.dtype(dtype) == np.float32 else 1e-12


def make(m, n, s, dtype, seed=0):
    """U diag(s) V^T with Haar-like orthonormal U (m x len(s)), V (n x len(s))."""
    rng = np.random.default_rng(seed)
    r = len(s)
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    return ((U * s) @ V.T).astype(dtype)


def style(r):
    """The "style" spectrum: s_i = exp(-i/8)."""
    return np.exp(-np.arange(r) / 8.0)


# Python source for `python -c`: SIGKILLs the process at the third tensor written to an output
# file (TensorFile.write or Spill.put), to test what a crash mid-write leaves; then CLI_MAIN runs
# the command line given after -c.
KILL_AT_THIRD_WRITE = """
import os, signal
import rslora.adapters.safetensors_stream as s
for cls, meth in ((s.TensorFile, "write"), (s.Spill, "put")):
    def patched(self, *a, _real=getattr(cls, meth), _n=[0]):
        _n[0] += 1
        if _n[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return _real(self, *a)
    setattr(cls, meth, patched)
"""
CLI_MAIN = "import sys, rslora.cli; sys.exit(rslora.cli.main(sys.argv[1:]))"


def run_in_threads(work, n: int = 4) -> None:
    """work() in n threads at once; the first exception any of them raised, re-raised here."""
    import threading
    errors: list[BaseException] = []

    def guarded():
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - reported below, in the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
