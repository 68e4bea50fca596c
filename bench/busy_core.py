"""rsvd with one core kept busy: 2 BLAS threads vs 1 (issue 13 item 5), rounds interleaved.

    python bench/busy_core.py [--rounds 9] [--sizes 1024 2048]

A `while True: pass` process pinned to the last CPU (os.sched_setaffinity) holds that core while
`rslora.rsvd(M, 64)` (defaults) runs at 2 BLAS threads with the one-thread scopes of the small
calls (the default), at 2 threads without them (`_core._blas_single_thread_scopes(False)`), and
at 1 thread (threadpoolctl), in turn, and the GEMM passes alone that rsvd made ("floor", in its
layout: bench_svd.py's gemm-floor) at 2 and 1 threads: what is left above them is the small
calls' share (the scopes' business), the rest the big passes' own threading. M has the "facts" spectrum (1 + i)^-1/2, float32. Prints
the load average (other processes count as busy cores too), the median and min wall time of each
and the ratios; "2t / 1t" <= 1 is the issue's target. Not a pytest suite: wall times under load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import threadpoolctl

import rslora
from rslora import _core


def _matrix(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    U, _ = np.linalg.qr(rng.standard_normal((n, n)).astype(np.float32))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)).astype(np.float32))
    return ((U * (1.0 + np.arange(n, dtype=np.float32)) ** -0.5) @ V.T).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    busy_cpu = cpus[-1]
    code = f"import os; os.sched_setaffinity(0, {{{busy_cpu}}})\nwhile True: pass"
    print(f"cpus {len(cpus)}, busy loop on cpu {busy_cpu}; BLAS threads available "
          f"{_core.blas_num_threads()}; thread-local setter: {_core.blas_has_local_thread_setter()}")
    runs = (("2t scopes", 2, True), ("2t no scopes", 2, False), ("1t", 1, True),
            ("floor 2t", 2, True), ("floor 1t", 1, True))
    mats = {n: _matrix(n) for n in args.sizes}
    busy = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)
        for n, M in mats.items():
            times: dict[str, list[float]] = {}
            rslora.rsvd(M, 64, seed=1)
            passes = _core.rsvd_passes("subspace", _core.rsvd_last_n_iter())
            Yt = np.random.default_rng(0).standard_normal((74, n), dtype=np.float32)
            Zt = np.empty_like(Yt)

            def floor() -> None:
                for i in range(passes):
                    if i % 2 == 0:
                        np.matmul(Yt, M.T, out=Zt)
                    else:
                        np.matmul(Zt, M, out=Yt)  # s_1 = 1: stays in range

            load0 = os.getloadavg()[0]
            for _ in range(args.rounds):
                for label, threads, scopes in runs:
                    prev = _core._blas_single_thread_scopes(scopes)
                    try:
                        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
                            t = time.perf_counter()
                            if label.startswith("floor"):
                                floor()
                            else:
                                rslora.rsvd(M, 64, seed=1)
                            times.setdefault(label, []).append(time.perf_counter() - t)
                    finally:
                        _core._blas_single_thread_scopes(prev)
            med = {k: float(np.median(v)) for k, v in times.items()}
            mn = {k: min(v) for k, v in times.items()}
            cols = "  ".join(f"{k}: {1e3 * med[k]:.1f} ms (min {1e3 * mn[k]:.1f})" for k in med)
            print(f"{n}x{n} n_iter={_core.rsvd_last_n_iter()} load {load0:.1f}-{os.getloadavg()[0]:.1f}"
                  f"  {cols}  | 2t/1t median {med['2t scopes'] / med['1t']:.2f} min "
                  f"{mn['2t scopes'] / mn['1t']:.2f}; no scopes / scopes median "
                  f"{med['2t no scopes'] / med['2t scopes']:.2f}; floor 2t/1t median "
                  f"{med['floor 2t'] / med['floor 1t']:.2f}; rsvd - floor, 2t/1t "
                  f"{(med['2t scopes'] - med['floor 2t']) / (med['1t'] - med['floor 1t']):.2f}")
    finally:
        busy.kill()
        busy.wait()


if __name__ == "__main__":
    main()
