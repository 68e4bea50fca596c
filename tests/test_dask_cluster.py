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

from rslora.dask.cluster import ClusterError, cluster, map_unordered  # noqa: E402
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
