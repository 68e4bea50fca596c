"""rsvd at 2 BLAS threads on a quiet machine: rslora's split passes against OpenBLAS's own
threaded passes (`_core._blas_split_passes(False)`), each series after half a second of sleep so
that OpenBLAS's workers are asleep when it starts (busy_core.py interleaves the variants, and a
worker left spinning by one then shares the second core with the next). One thread for scale.

    python bench/split_quiet.py
"""

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


def _series(M: np.ndarray, threads: int) -> tuple[list[float], list[float]]:
    with threadpoolctl.threadpool_limits(threads, user_api="blas"):
        time.sleep(0.5)
        rslora.rsvd(M, 64, seed=1)
        wall, cpu = [], []
        for _ in range(7):
            c, t = time.process_time(), time.perf_counter()
            rslora.rsvd(M, 64, seed=1)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return wall, cpu


def main() -> None:
    for n in (1024, 2048):
        M = _matrix(n)
        for _ in range(2):
            for split in (True, False):
                prev = _core._blas_split_passes(split)
                try:
                    wall, cpu = _series(M, 2)
                finally:
                    _core._blas_split_passes(prev)
                print(f"{n} 2t {'split' if split else 'openblas':8s} median {1e3 * np.median(wall):6.1f} "
                      f"min {1e3 * min(wall):6.1f} ms, cpu {1e3 * np.median(cpu):6.1f} ms")
        wall, _ = _series(M, 1)
        print(f"{n} 1t          median {1e3 * np.median(wall):6.1f} min {1e3 * min(wall):6.1f} ms")


if __name__ == "__main__":
    main()
