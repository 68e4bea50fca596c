"""Running the study's independent training runs: in this process, or as tasks on a Dask cluster.

Dask (:mod:`rslora.dask.cluster`) does the scheduling, the transport and the reruns of tasks
whose worker died; this module only says where the runs go and puts their results back in order.

Every run is seeded by its own description (never by the order or the process it runs in) and
runs with one BLAS thread wherever it runs, so the results are the same bits in this process, on
any number of local workers or on a remote cluster.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

MAX_DEFAULT_WORKERS = 8  # the study has a few hundred runs per round at most


def default_workers() -> int:
    """The cores this process may use, at most :data:`MAX_DEFAULT_WORKERS` (the command line's
    default for ``--workers``)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_DEFAULT_WORKERS))


def check_workers(workers: int | None = None, scheduler: str | None = None,
                  client: Any = None) -> None:
    """At most one of ``workers`` (an int >= 1), ``scheduler`` (an address), ``client``."""
    from ..dask.cluster import check_cluster_args

    check_cluster_args(workers, scheduler)
    if client is not None and (workers is not None or scheduler is not None):
        raise ValueError(f"give {'workers' if workers is not None else 'scheduler'} or client, "
                         "not both")


@contextlib.contextmanager
def open_client(workers: int | None = None, scheduler: str | None = None,
                client: Any = None) -> Iterator[Callable[[], Any]]:
    """Yields ``get()``: the client the runs go to. ``client`` itself (left open), a
    ``LocalCluster`` of ``workers`` processes (``workers >= 2``) or a client of the cluster at
    ``scheduler``, opened here and closed on exit; None (``workers`` None or 1): this process.

    A cluster starts in a thread while the caller works on (the study's spectra use one core;
    starting two worker processes and importing rslora there takes seconds): ``get()`` waits
    for it, and raises what the start raised.
    """
    check_workers(workers, scheduler, client)
    if client is not None or (scheduler is None and (workers is None or workers == 1)):
        yield lambda: client
        return
    from ..dask.cluster import cluster

    stack = contextlib.ExitStack()
    box: dict = {}

    def start() -> None:
        try:
            c = stack.enter_context(cluster(workers=workers, scheduler=scheduler))
            _check_workers_import(c)
            box["client"] = c
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by get()
            box["error"] = e

    thread = threading.Thread(target=start, name="rslora-study-cluster", daemon=True)
    thread.start()

    def get() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["client"]

    try:
        yield get
    finally:
        thread.join()
        stack.close()


def _import_study() -> str | None:
    """On a worker: import what the runs need now (not in the first run), or say why not."""
    try:
        from . import lrmap, mlp  # noqa: F401
    except Exception as e:  # noqa: BLE001 - reported by the client
        return f"{type(e).__name__}: {_first_line(e)}"
    return None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _check_workers_import(client: Any) -> None:
    """Every worker can run the study's runs: a clear line now, not a failed first task."""
    from ..dask.cluster import ClusterError

    advice = "install the same rslora on every worker"
    try:
        errors = client.run(_import_study)
    except (OSError, TimeoutError) as e:
        raise ClusterError(f"lost the Dask cluster: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a worker without rslora cannot even load the check
        raise ClusterError(f"the Dask workers cannot run rslora's study ({advice}): "
                           f"{type(e).__name__}: {_first_line(e)}") from None
    for address, error in errors.items():
        if error is not None:
            raise ClusterError(f"the Dask worker at {address} cannot import rslora's study "
                               f"({advice}): {error}")


def _threads(client: Any) -> int:
    """The worker threads of the cluster now (at least 1)."""
    from ..dask.cluster import ClusterError

    try:
        return max(1, sum(client.nthreads().values()))
    except (OSError, TimeoutError) as e:
        raise ClusterError(f"lost the Dask cluster: {_first_line(e)}") from None


def describe(client: Any, workers: int | None = None) -> str:
    """Where the runs went, for the report (not for results.json: it varies). A local cluster's
    random port is left out: two runs that ran alike read alike."""
    if client is None:
        return "in one process"
    if workers is not None:
        return f"on a local Dask cluster of {workers} worker processes"
    address = getattr(client.scheduler, "address", None) or "?"
    return f"on the Dask cluster at {address} ({_threads(client)} worker threads at the start)"


class _Run:
    """``fn(cfg, job)``, picklable for a Dask task."""

    def __init__(self, fn, cfg):
        self.fn, self.cfg = fn, cfg

    def __call__(self, job):
        return self.fn(self.cfg, job)


class Runner:
    """``runner.map(fn, cfg, jobs, cost)``: ``[fn(cfg, job) for job in jobs]``, in that order,
    here (``client=None``) or as Dask tasks on ``client``'s cluster
    (:func:`rslora.dask.cluster.map_batched`: consecutive jobs of about equal total ``cost``
    share a task, a few tasks per worker thread per round).

    ``cost(job)`` weighs each job for the batches and for the progress callback
    ``advance(units)``, called as runs finish. Every run has one BLAS thread wherever it runs
    (also where a worker runs several tasks at once): the same bits as in this process.
    """

    def __init__(self, client: Any = None, advance=lambda units: None):
        self.client, self.advance = client, advance

    def map(self, fn, cfg, jobs: list, cost=lambda job: 1.0) -> list:
        if self.client is None or not jobs:
            here = []
            for job in jobs:
                here.append(fn(cfg, job))
                self.advance(cost(job))
            return here
        from ..dask.cluster import map_batched

        prefix = fn.__module__.rsplit(".", 1)[-1]

        def key(job) -> str:  # the dashboard's name of a task: its first run's description
            return "-".join(map(str, (prefix, *(job if isinstance(job, tuple) else (job,)))))

        costs = [cost(job) for job in jobs]
        out: list = [None] * len(jobs)
        for i, res in map_batched(self.client, _Run(fn, cfg), jobs, weights=costs, key=key,
                                  blas_threads=1):
            out[i] = res
            self.advance(costs[i])
        return out
