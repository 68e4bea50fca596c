"""rslora.dask.cluster: the client the commands open and the bounded map they run on it,
against a real LocalCluster (processes), including workers killed mid-run."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("distributed")

import dask  # noqa: E402
from distributed import LocalCluster  # noqa: E402

from rslora.dask import cluster as cluster_mod  # noqa: E402
from rslora.dask.cluster import (ClusterError, batch_spans, cluster, map_batched,  # noqa: E402
                                 map_unordered)
from rslora.errors import UserError  # noqa: E402


def _square(x):
    return x * x


def _timed(x):
    start = time.monotonic()
    time.sleep(0.05)
    return x, start, time.monotonic()


def _blas_threads(_):
    from threadpoolctl import threadpool_info

    return sorted({d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"})


def _fails(x):
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def _kill_once(item):
    x, marker = item
    if x == 2 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 10


def _always_kill(_):
    os.kill(os.getpid(), signal.SIGKILL)


def _where(x):
    """The item, the task that ran it (its Dask key) and the worker process."""
    from distributed import get_worker

    return x, get_worker().get_current_task(), os.getpid()


def _slow_where(x):
    time.sleep(0.2)
    return _where(x)


def _env():
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


@pytest.fixture(scope="module")
def client():
    with cluster(workers=2) as c:
        yield c


def test_no_cluster_runs_here():
    with cluster() as c:
        assert c is None


@pytest.mark.parametrize("kw, err, msg", [
    (dict(workers=2, scheduler="tcp://h:1"), ValueError, "not both"),
    (dict(workers=0), ValueError, "workers must be >= 1"),
    (dict(workers=True), TypeError, "workers must be an integer"),
    (dict(workers=2.0), TypeError, "workers must be an integer"),
    (dict(scheduler=" "), ValueError, "scheduler must be an address"),
])
def test_bad_arguments(kw, err, msg):
    with pytest.raises(err, match=msg):
        with cluster(**kw):
            pass


def test_map_gives_every_result_once(client):
    got = dict(map_unordered(client, _square, range(23), max_in_flight=4))
    assert got == {i: i * i for i in range(23)}


def test_in_flight_is_bounded(client):
    # One at a time: no two tasks overlap in time, although two workers are idle.
    spans = sorted(r[1:] for _, r in map_unordered(client, _timed, range(6), max_in_flight=1))
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="max_in_flight"):
        list(map_unordered(client, _square, [1], max_in_flight=0))


def test_tasks_run_with_one_blas_thread(client):
    for _, threads in map_unordered(client, _blas_threads, range(2), max_in_flight=2):
        assert threads in ([1], [])  # [] where NumPy's BLAS is not visible to threadpoolctl


def test_a_task_error_is_raised_as_it_is(client):
    with pytest.raises(ValueError, match="bad item 3"):
        list(map_unordered(client, _fails, range(6), max_in_flight=2))


def test_killed_worker_task_is_rerun(client, tmp_path):
    items = [(x, str(tmp_path / "killed")) for x in range(5)]
    got = dict(map_unordered(client, _kill_once, items, max_in_flight=5))
    assert (tmp_path / "killed").exists()  # the worker really died once
    assert got == {i: i * 10 for i in range(5)}


def test_a_task_that_kills_every_worker_is_a_cluster_error():
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with cluster(workers=1) as c:
            with pytest.raises(ClusterError, match="killed every worker"):
                list(map_unordered(c, _always_kill, [0], max_in_flight=1))
    assert issubclass(ClusterError, UserError)  # the command line: one line, exit 2


def test_no_worker_left_is_a_cluster_error(monkeypatch):
    monkeypatch.setenv("RSLORA_DASK_NO_WORKER_TIMEOUT", "1.5")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        with cluster(scheduler=empty.scheduler_address) as c:
            start = time.monotonic()
            with pytest.raises(ClusterError, match="no Dask worker left for 1.5 s"):
                list(map_unordered(c, _square, range(3), max_in_flight=2))
            assert time.monotonic() - start < 10


def test_unreachable_scheduler_is_a_cluster_error():
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ClusterError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
            with cluster(scheduler="tcp://127.0.0.1:9"):
                pass


# map_batched: one batcher for the adapters' layers and the study's runs.

def _check_spans(spans, n):
    assert spans[0][0] == 0 and spans[-1][1] == n  # every item once, in order, no gap
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(s < e for s, e in spans)


@pytest.mark.parametrize("n, tasks", [(1, 8), (7, 8), (8, 8), (37, 8), (100, 3), (5, 1)])
def test_batch_spans_of_equal_weights_are_even(n, tasks):
    spans = batch_spans([2.5] * n, tasks)
    _check_spans(spans, n)
    assert len(spans) == min(n, tasks)  # every task gets items while there are enough
    sizes = [e - s for s, e in spans]
    assert max(sizes) - min(sizes) <= 1


def test_batch_spans_by_weight():
    # A heavy item gets a task of its own; light ones share, cut near multiples of the target.
    w = [1.0] * 10 + [30.0] + [1.0] * 10
    spans = batch_spans(w, 5)  # target 10
    _check_spans(spans, len(w))
    assert (10, 11) in spans
    for s, e in spans:
        assert e - s == 1 or sum(w[s:e]) <= 10 + 1  # at most half an item each side over
    # max_weight caps a task however few tasks are asked for.
    spans = batch_spans([3.0] * 12, 1, max_weight=6.0)
    _check_spans(spans, 12)
    assert [sum([3.0] * (e - s)) for s, e in spans] == [6.0] * 6
    assert batch_spans([0.0] * 3, 8) == [(0, 1), (1, 2), (2, 3)]  # no weight: one item each
    assert batch_spans([], 4) == []
    with pytest.raises(ValueError, match="tasks must be >= 1"):
        batch_spans([1.0], 0)
    with pytest.raises(ValueError, match="max_weight must be > 0"):
        batch_spans([1.0], 1, max_weight=0)


def test_map_batched_gives_each_result_once_in_index_order_within_a_task(client):
    w = [float(1 + (i % 5)) for i in range(41)]
    got = list(map_batched(client, _where, range(41), weights=w, key=lambda x: f"x{x}"))
    assert sorted(i for i, _ in got) == list(range(41))
    assert all(x == i for i, (x, _, _) in got)
    tasks: dict = {}
    for pos, (i, (_, task, _)) in enumerate(got):
        tasks.setdefault(task, []).append((pos, i))
    # Tasks are the spans batch_spans cuts for the cluster's 2 threads, each yielded whole and
    # in index order, named after their first item.
    spans = batch_spans(w, cluster_mod.TASKS_PER_THREAD * 2)
    assert sorted((ix[0][1], ix[-1][1] + 1) for ix in tasks.values()) == spans
    for task, ix in tasks.items():
        assert [p for p, _ in ix] == list(range(ix[0][0], ix[0][0] + len(ix)))  # together
        assert [i for _, i in ix] == sorted(i for _, i in ix)
        assert task.startswith(f"rslora-x{ix[0][1]}" + (f"+{len(ix) - 1}-" if len(ix) > 1 else "-"))


def test_map_batched_gives_every_worker_work(client):
    workers = {pid for _, (_, _, pid) in map_batched(client, _slow_where, range(8))}
    assert len(workers) == 2  # 8 tasks of one slow item each on 2 workers: both take some


def test_map_batched_limits_blas_once_per_task(client):
    for _, threads in map_batched(client, _blas_threads, range(4)):
        assert threads in ([1], [])
    for _, threads in map_batched(client, _blas_threads, range(4), blas_threads=1):
        assert threads in ([1], [])
    with pytest.raises(ValueError, match="blas_threads"):
        list(map_batched(client, _square, range(2), blas_threads=0))


def test_map_batched_failures(client, tmp_path):
    with pytest.raises(ValueError, match="bad item 3"):  # a task's error, as it is
        list(map_batched(client, _fails, range(9)))
    items = [(x, str(tmp_path / "killed")) for x in range(6)]
    assert dict(map_batched(client, _kill_once, items)) == {i: i * 10 for i in range(6)}
    assert (tmp_path / "killed").exists()  # a worker died once; its task was rerun
    with pytest.raises(ValueError, match="weights has 2 entries for 3 items"):
        list(map_batched(client, _square, range(3), weights=[1, 2]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        list(map_batched(client, _square, range(2), weights=[1, float("nan")]))
    assert list(map_batched(client, _square, [])) == []


def test_local_workers_keep_glibc_malloc_settings(monkeypatch):
    # Dask's MALLOC_TRIM_THRESHOLD_ turns off glibc's dynamic mmap threshold: page faults on
    # every temporary (see rslora.dask.cluster.LOCAL_CONFIG). Also when an earlier nanny in this
    # process left it in the environment, as nannies do.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with cluster(workers=1) as c:
        assert list(c.run(_env).values()) == [None]
        assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # put back
