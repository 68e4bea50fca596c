"""rsvd with one core kept busy: 2 BLAS threads vs 1 (issue 13 item 5), rounds interleaved.

    python bench/busy_core.py [--rounds 9] [--sizes 1024 2048] [--no-quiet]

Busy phase: a `while True: pass` process pinned to the last CPU (os.sched_setaffinity) holds that
core while `rslora.rsvd(M, 64)` (defaults) runs, in turn, at 2 BLAS threads with its passes over M
split into row blocks on rslora's own threads ("2t split", the default, blas_split.cpp), at 2
threads with the passes as one OpenBLAS GEMM each ("2t openblas": `_core._blas_split_passes(False)`,
main's code before the split), at 1 thread (threadpoolctl), and the GEMM passes alone that rsvd
made through NumPy ("floor", OpenBLAS's own threads) at 2 and 1 threads. Quiet phase (skipped with
--no-quiet): the same without the busy loop. M has the "facts" spectrum (1 + i)^-1/2, float32.
Prints the load average (other processes count as busy cores too), the median and min wall time
and the CPU time of the whole process per call (what spinning threads burn shows there), and the
ratios; busy "2t split / 1t" <= 1 is the issue's target, quiet "2t split / 2t openblas" <= 1 says
the split costs nothing when the cores are free. Not a pytest suite: wall times under load.
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

RUNS = (("2t split", 2, True), ("2t openblas", 2, False), ("1t", 1, True),
        ("floor 2t", 2, True), ("floor 1t", 1, True))


def _matrix(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    U, _ = np.linalg.qr(rng.standard_normal((n, n)).astype(np.float32))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)).astype(np.float32))
    return ((U * (1.0 + np.arange(n, dtype=np.float32)) ** -0.5) @ V.T).astype(np.float32)


def _phase(name: str, mats: dict[int, np.ndarray], rounds: int) -> None:
    for n, M in mats.items():
        wall: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
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
        for _ in range(rounds):
            for label, threads, split in RUNS:
                prev = _core._blas_split_passes(split)
                try:
                    with threadpoolctl.threadpool_limits(threads, user_api="blas"):
                        c, t = time.process_time(), time.perf_counter()
                        if label.startswith("floor"):
                            floor()
                        else:
                            rslora.rsvd(M, 64, seed=1)
                        wall.setdefault(label, []).append(time.perf_counter() - t)
                        cpu.setdefault(label, []).append(time.process_time() - c)
                finally:
                    _core._blas_split_passes(prev)
        med = {k: float(np.median(v)) for k, v in wall.items()}
        mn = {k: min(v) for k, v in wall.items()}
        mc = {k: float(np.median(v)) for k, v in cpu.items()}
        print(f"{name} {n}x{n} n_iter={_core.rsvd_last_n_iter()} load {load0:.1f}-"
              f"{os.getloadavg()[0]:.1f}")
        for k in med:
            print(f"  {k:12s} {1e3 * med[k]:8.1f} ms (min {1e3 * mn[k]:7.1f})  cpu {1e3 * mc[k]:8.1f} ms")
        print(f"  2t split / 1t median {med['2t split'] / med['1t']:.2f} (min {mn['2t split'] / mn['1t']:.2f}); "
              f"2t openblas / 1t {med['2t openblas'] / med['1t']:.2f} ({mn['2t openblas'] / mn['1t']:.2f}); "
              f"2t split / 2t openblas {med['2t split'] / med['2t openblas']:.2f} "
              f"({mn['2t split'] / mn['2t openblas']:.2f}); floor 2t / 1t {med['floor 2t'] / med['floor 1t']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--no-quiet", action="store_true", help="skip the phase without the busy loop")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    busy_cpu = cpus[-1]
    code = f"import os; os.sched_setaffinity(0, {{{busy_cpu}}})\nwhile True: pass"
    print(f"cpus {len(cpus)}, busy loop on cpu {busy_cpu}; BLAS threads available "
          f"{_core.blas_num_threads()}; thread-local setter: {_core.blas_has_local_thread_setter()}")
    mats = {n: _matrix(n) for n in args.sizes}
    busy = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)
        _phase("busy", mats, args.rounds)
    finally:
        busy.kill()
        busy.wait()
    if not args.no_quiet:
        _phase("quiet", mats, args.rounds)


if __name__ == "__main__":
    main()
