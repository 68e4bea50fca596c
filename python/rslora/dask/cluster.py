"""Running independent tasks (a checkpoint's layers, the study's training runs) on a Dask cluster.

Dask does the scheduling, the retries of tasks whose worker died and the transport; this module
only opens the client the command line asks for and maps a function over a list of tasks with a
bounded number in flight, so that the client's memory stays at a few results whatever the count.

- ``cluster(workers=N)`` starts a ``LocalCluster`` of N processes with one thread each (and one
  BLAS thread: Dask sets ``OPENBLAS_NUM_THREADS=1`` in its workers), stopped on exit;
- ``cluster(scheduler="tcp://host:8786")`` connects to a running cluster, left running on exit;
- ``cluster()`` yields ``None``: the caller runs in this process.

Failures of the cluster itself (scheduler unreachable or lost, no worker left, a task that keeps
killing its workers) raise :class:`ClusterError`; an exception raised by a task is re-raised as
it is, so a bad checkpoint reads the same with or without a cluster.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import UserError

__all__ = ["ClusterError", "cluster", "map_unordered", "worker_threads", "NO_WORKER_TIMEOUT_S"]

#: How long a run waits with no worker on the cluster before giving up (seconds). Workers that
#: die are replaced by a nanny (LocalCluster) or a job system within seconds; none for this long
#: means the cluster cannot finish. ``RSLORA_DASK_NO_WORKER_TIMEOUT`` overrides it.
NO_WORKER_TIMEOUT_S = 60.0


class ClusterError(UserError):
    """The cluster cannot finish the work: one line, exit status 2 on the command line."""


def _no_worker_timeout() -> float:
    raw = os.environ.get("RSLORA_DASK_NO_WORKER_TIMEOUT")
    if raw is None:
        return NO_WORKER_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"RSLORA_DASK_NO_WORKER_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"RSLORA_DASK_NO_WORKER_TIMEOUT must be > 0, got {raw!r}")
    return value


def check_cluster_args(workers: int | None, scheduler: str | None) -> None:
    """The rules of ``workers=`` / ``scheduler=`` (``--workers`` / ``--scheduler``), once."""
    if workers is not None and scheduler is not None:
        raise ValueError("give workers or scheduler, not both")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)):
        raise TypeError(f"workers must be an integer, got {type(workers).__name__}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if scheduler is not None and (not isinstance(scheduler, str) or not scheduler.strip()):
        raise ValueError(f"scheduler must be an address such as tcp://host:8786, got {scheduler!r}")


@contextlib.contextmanager
def cluster(workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` for ``workers`` local processes or the cluster at ``scheduler``,
    or ``None`` when neither is given (run here)."""
    check_cluster_args(workers, scheduler)
    if workers is None and scheduler is None:
        yield None
        return
    import logging

    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:  # waits up to Dask's distributed.comm.timeouts.connect (30 s unless configured)
            client = Client(scheduler, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {_one_line(e)}") from None
        with client:
            yield client
        return
    # One thread per worker process; the dashboard (if bokeh is installed) on any free port.
    # Workers' logs only when CRITICAL: what goes wrong reaches the client as an exception, and a
    # loaded machine made a worker log a traceback at ERROR when its heartbeat met the closing
    # scheduler at the end of a good run.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=logging.CRITICAL) as local, \
            Client(local, set_as_default=False) as client:
        yield client


def worker_threads(client: Any) -> int:
    """The worker threads on the cluster now (0 when it has no worker yet)."""
    return sum(_talk(client.nthreads).values())


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def map_unordered(client: Any, fn: Callable[..., Any], items: Iterable[Any], *,
                  max_in_flight: int, key: Callable[[Any], str] | None = None
                  ) -> Iterator[tuple[int, Any]]:
    """Yield ``(i, fn(item_i))`` as tasks finish, with at most ``max_in_flight`` submitted at once.

    ``key(item)`` names a task in the dashboard and logs (it must be unique). Results leave the
    cluster as soon as they are yielded. Tasks run on workers that die are rerun elsewhere by
    Dask; :class:`ClusterError` when the cluster cannot finish (see the module docstring).
    """
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    grace = _no_worker_timeout()
    pending = iter(enumerate(items))
    running: dict[Any, int] = {}
    names: dict[int, str] = {}
    no_workers_since: float | None = None
    limited = _BlasLimited(fn)

    def submit_more() -> None:
        for i, item in pending:
            name = key(item) if key is not None else f"item-{i}"
            names[i] = name
            fut = client.submit(limited, item, key=f"rslora-{name}-{os.getpid()}-{time.monotonic_ns()}",
                                pure=False, retries=0)
            running[fut] = i
            if len(running) >= max_in_flight:
                return

    try:
        _talk(submit_more)
        while running:
            done, _ = _talk(lambda: _wait_some(client, list(running)))
            if not done:
                if client.status != "running":
                    raise ClusterError("lost the connection to the Dask scheduler")
                if _talk(lambda: client.scheduler_info().get("workers")):
                    no_workers_since = None
                elif no_workers_since is None:
                    no_workers_since = time.monotonic()
                elif time.monotonic() - no_workers_since > grace:
                    raise ClusterError(f"no Dask worker left for {grace:g} s: the cluster cannot "
                                       f"finish ({len(running)} task(s) unfinished)")
                continue
            for fut in done:
                i = running.pop(fut)
                try:
                    result = fut.result()  # a task's own exception is re-raised as it is
                except KilledWorker:
                    raise ClusterError(f"task {names[i]} killed every worker it ran on "
                                       "(out of memory?)") from None
                except FutureCancelledError:
                    raise ClusterError(f"task {names[i]} was cancelled: the Dask scheduler was "
                                       "lost or restarted") from None
                yield i, result
            _talk(submit_more)
    finally:
        if running:
            with contextlib.suppress(Exception):
                client.cancel(list(running))


def _wait_some(client: Any, futures: list) -> Any:
    """The futures that are done after at most a second (``wait`` asks the current client)."""
    from distributed import wait

    with client.as_current():
        try:
            return wait(futures, timeout=1.0, return_when="FIRST_COMPLETED")
        except TimeoutError:  # what wait says when none finished in time
            return set(), set(futures)


def _talk(call: Callable[[], Any]) -> Any:
    """``call()``, a conversation with the scheduler: its network errors are the cluster's."""
    try:
        return call()
    except (OSError, TimeoutError) as e:
        raise ClusterError(f"lost the Dask cluster: {_one_line(e)}") from None


class _BlasLimited:
    """``fn`` run on a worker with BLAS limited to the worker's thread count, so that N workers of
    one thread each never oversubscribe the cores (what threadpoolctl sets, NumPy and rslora's core
    share: they use the same BLAS)."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, item: Any) -> Any:
        from distributed import get_worker
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=max(1, int(getattr(get_worker(), "nthreads", 1)))):
            return self.fn(item)
