"""Running the study's independent training runs on several processes.

Every run is seeded by its own description (never by the order it runs in), so the results are
the same for any number of workers. Each worker limits BLAS to one thread: two cores running two
single-threaded runs beat two BLAS pools fighting over them.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def default_workers() -> int:
    """The cores this process may use (at most 8); 1 where processes cannot be forked.

    Forking (Linux) lets the study run from any script; spawned workers would re-import the
    caller's main module, which breaks scripts without an ``if __name__ == "__main__"`` guard.
    """
    if not sys.platform.startswith("linux"):
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 8))


_LIMIT: object = None


def _init_worker() -> None:
    from threadpoolctl import threadpool_limits

    global _LIMIT  # kept alive: the limit lasts as long as this object
    _LIMIT = threadpool_limits(limits=1)


class Runner:
    """``runner.map(fn, cfg, jobs, cost)``: ``[fn(cfg, job) for job in jobs]``, in that order.

    ``cost(job)`` weighs each job for the progress callback ``advance(units)``.
    """

    def __init__(self, workers: int = 1, advance=lambda units: None):
        self.workers, self.advance = max(1, int(workers)), advance
        self._pool: Any = None  # a ProcessPoolExecutor once map() needs one

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def map(self, fn, cfg, jobs: list, cost=lambda job: 1.0) -> list:
        if self.workers == 1 or len(jobs) < 2 or not sys.platform.startswith("linux"):
            out = []
            for job in jobs:
                out.append(fn(cfg, job))
                self.advance(cost(job))
            return out
        from concurrent.futures import ProcessPoolExecutor, as_completed
        import multiprocessing

        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("fork"),
                                             initializer=_init_worker)
        futures = {self._pool.submit(fn, cfg, job): i for i, job in enumerate(jobs)}
        out = [None] * len(jobs)
        for f in as_completed(futures):
            i = futures[f]
            out[i] = f.result()
            self.advance(cost(jobs[i]))
        return out
