"""Running independent tasks (a checkpoint's layers, the study's training runs) on a Dask cluster.

Dask does the scheduling, the retries of tasks whose worker died and the transport; this module
only opens the client the command line asks for and maps a function over a list of items with a
bounded number of tasks in flight, so that the client's memory stays at a few results whatever
the count: :func:`map_batched` (consecutive items of about equal weight share a task; the one
batcher of the adapter tools and the study) on :func:`map_unordered` (one task per item).

- ``cluster(workers=N)`` starts a ``LocalCluster`` of N processes with one thread each (and one
  BLAS thread: Dask sets ``OPENBLAS_NUM_THREADS=1`` in its workers), with glibc's own malloc
  settings and quieter monitors (:data:`LOCAL_CONFIG`), stopped on exit;
- ``cluster(scheduler="tcp://host:8786")`` connects to a running cluster, left running on exit;
- ``cluster()`` yields ``None``: the caller runs in this process.

Failures of the cluster itself (scheduler unreachable or lost, no worker left, a task that keeps
killing its workers) raise :class:`ClusterError`; an exception raised by a task is re-raised as
it is, so a bad checkpoint reads the same with or without a cluster.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..errors import UserError

__all__ = ["ClusterError", "batch_spans", "cluster", "map_batched", "map_unordered", "worker_threads",
           "NO_WORKER_TIMEOUT_S", "TASKS_PER_THREAD", "IN_FLIGHT_PER_THREAD"]

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

    import dask
    from distributed import Client, LocalCluster  # first: it brings its config defaults

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
    # scheduler at the end of a good run. Workers keep glibc's own malloc settings (see
    # :data:`LOCAL_CONFIG`); a nanny keeps them for the workers it restarts.
    with dask.config.set(LOCAL_CONFIG), _without_env(_MALLOC_TRIM), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                         dashboard_address=":0", silence_logs=logging.CRITICAL) as local, \
            Client(local, set_as_default=False) as client:
        yield client


_MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"
#: Dask settings of the local clusters rslora starts (its workers keep them, also when a nanny
#: restarts one).
#:
#: - No ``MALLOC_TRIM_THRESHOLD_`` in the workers. Dask's nannies set it to 65536 (to hand freed
#:   memory back to the OS), and setting it also switches off glibc's dynamic mmap threshold:
#:   every array of 128 KiB or more then is a fresh ``mmap``, zero-filled page by page as it is
#:   first touched, and unmapped when freed, a page fault per 4 KiB of every temporary. rslora's
#:   tasks make such temporaries all the time (a 2048^2 float32 layer is 16 MiB; the study's
#:   256 x 256 runs several per step). Measured here (2 cores, loaded): 6 study runs at rank 256
#:   took 2.4-2.8x the CPU with it (692,678 minor faults against 7,703; 1.8 s of system time
#:   against 0.05 s); the full study's learning-rate map on 2 workers made 4.0 million faults
#:   against 31,000 in the fork pool it replaced. ``None`` removes it (Dask's way to unset one).
#: - Quieter monitors: Dask's wake every 10-500 ms in each of its processes (scheduler and
#:   client, nannies, workers), and its statistical profiler samples each worker every 10 ms.
#:   Measured on the quick study with 2 workers (loaded 2 cores): 20.8 s of CPU with Dask's
#:   defaults, 17.8 s with these.
LOCAL_CONFIG = {f"distributed.nanny.pre-spawn-environ.{_MALLOC_TRIM}": None,
                "distributed.worker.profile.enabled": False,
                "distributed.admin.tick.interval": "200ms",
                "distributed.admin.system-monitor.interval": "2s",
                "distributed.worker.memory.monitor-interval": "1s"}


@contextlib.contextmanager
def _without_env(name: str) -> Iterator[None]:
    """``name`` out of this process's environment while the cluster lives (put back on exit):
    workers inherit it, and an earlier Dask nanny in this process leaves its pre-spawn variables
    there, also for the workers a nanny restarts later."""
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def worker_threads(client: Any) -> int:
    """The worker threads on the cluster now (0 when it has no worker yet)."""
    return sum(_talk(client.nthreads).values())


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


#: Tasks per worker thread that :func:`map_batched` makes of a list (where the items allow): each
#: a few items, so the last tasks of the list end close together on every worker, while Dask's
#: cost per task (milliseconds, tens on a loaded machine) stays small next to the work.
TASKS_PER_THREAD = 4

#: Tasks in flight per worker thread: one running, one queued, so no worker waits for the
#: client, and the client holds at most this many tasks' results per thread.
IN_FLIGHT_PER_THREAD = 2


def map_batched(client: Any, fn: Callable[[Any], Any], items: Sequence[Any], *,
                weights: Sequence[float] | None = None, key: Callable[[Any], str] | None = None,
                max_weight: float | None = None, blas_threads: int | None = None
                ) -> Iterator[tuple[int, Any]]:
    """Yield ``(i, fn(items[i]))`` for every item, as the cluster's tasks finish.

    Consecutive items share a task (:func:`batch_spans`): about ``1 / TASKS_PER_THREAD`` of a
    worker thread's share of the total weight each (by ``weights``, default 1 per item), at most
    ``max_weight`` where given, so small items share a task and every worker gets work. At most
    :data:`IN_FLIGHT_PER_THREAD` tasks per worker thread are submitted at once. A task runs its
    items in order under one BLAS thread limit, ``blas_threads`` (default: the worker's thread
    count), and its results are yielded in index order. ``key(item)`` names a task (after its
    first item) in the dashboard. ``fn`` must be picklable. Failures: :func:`map_unordered`.
    """
    w = _weights(weights, len(items))
    threads = max(1, worker_threads(client))
    spans = batch_spans(w, TASKS_PER_THREAD * threads, max_weight)
    # A task carries its own items only (sliced as it is submitted), never the whole list.
    tasks = ((span, list(items[span[0]:span[1]])) for span in spans)

    def name(task: tuple) -> str:
        assert key is not None
        (start, end), part = task
        return key(part[0]) + (f"+{end - start - 1}" if end - start > 1 else "")

    for _, (span, results) in map_unordered(client, _Batch(fn), tasks,
                                            key=None if key is None else name,
                                            max_in_flight=IN_FLIGHT_PER_THREAD * threads,
                                            blas_threads=blas_threads):
        yield from zip(range(*span), results)


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} items")
    if not all(x >= 0 and math.isfinite(x) for x in w):
        raise ValueError("weights must be finite and >= 0")
    return w


def batch_spans(weights: Sequence[float], tasks: int, max_weight: float | None = None
                ) -> list[tuple[int, int]]:
    """``[(start, end)]``: consecutive items cut into about ``tasks`` runs of equal weight.

    The target weight of a run is ``sum(weights) / tasks`` (at most ``max_weight``); an item
    goes to the run its midpoint falls in on the cumulative weight axis, so every cut lies at
    the item boundary nearest a multiple of the target: a heavy item gets a run of its own,
    light ones share. All weights 0: one item per run. Every item is in exactly one run.
    """
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    total = float(sum(weights))
    if total <= 0:
        weights, total = [1.0] * len(weights), float(len(weights))
    target = total / tasks
    if max_weight is not None:
        if not max_weight > 0:
            raise ValueError(f"max_weight must be > 0, got {max_weight}")
        target = min(target, float(max_weight))
    spans: list[tuple[int, int]] = []
    acc, last = 0.0, -1
    for i, w in enumerate(weights):
        run = int((acc + w / 2) // target)
        acc += w
        if run != last:
            if spans:
                spans[-1] = (spans[-1][0], i)
            spans.append((i, i + 1))
            last = run
    if spans:
        spans[-1] = (spans[-1][0], len(weights))
    return spans


class _Batch:
    """``(span, [fn(item) for item in part])`` for a task ``(span, part)``: several items, one task."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, task: tuple[tuple[int, int], list]) -> tuple[tuple[int, int], list]:
        span, part = task
        return span, [self.fn(item) for item in part]


def map_unordered(client: Any, fn: Callable[..., Any], items: Iterable[Any], *,
                  max_in_flight: int, key: Callable[[Any], str] | None = None,
                  blas_threads: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(i, fn(item_i))`` as tasks finish, with at most ``max_in_flight`` submitted at once.

    Each task runs ``fn`` with BLAS limited to ``blas_threads`` (default: its worker's thread
    count). ``key(item)`` names a task in the dashboard and logs. Results leave the cluster as
    soon as they are yielded. Tasks run on workers that die are rerun elsewhere by Dask;
    :class:`ClusterError` when the cluster cannot finish (see the module docstring).
    """
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    if blas_threads is not None and (isinstance(blas_threads, bool) or blas_threads < 1):
        raise ValueError(f"blas_threads must be an integer >= 1, got {blas_threads!r}")
    grace = _no_worker_timeout()
    pending = iter(enumerate(items))
    running: dict[Any, int] = {}
    names: dict[int, str] = {}
    no_workers_since: float | None = None
    limited = _BlasLimited(fn, blas_threads)

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
    """``fn`` run on a worker with BLAS limited to ``threads`` (default: the worker's thread
    count), so that N workers of one thread each never oversubscribe the cores (what threadpoolctl
    sets, NumPy and rslora's core share: they use the same BLAS)."""

    def __init__(self, fn: Callable[..., Any], threads: int | None = None):
        self.fn, self.threads = fn, threads

    def __call__(self, item: Any) -> Any:
        threads = self.threads
        if threads is None:
            from distributed import get_worker

            threads = max(1, int(getattr(get_worker(), "nthreads", 1)))
        with _controller().limit(limits=threads):
            return self.fn(item)


@functools.lru_cache(maxsize=1)
def _controller() -> Any:
    """This process's thread pools, found once (a fresh ``threadpool_limits`` scans every loaded
    library: about a millisecond per task)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
