"""Adapter extraction on a Dask LocalCluster (``rslora extract --workers 2``) against one process,
side by side in one run: 2 workers of 1 thread each vs one process with 1 BLAS thread (parallel
efficiency) and with 2 BLAS threads; the CPU time of the distributed run (client, scheduler and
nannies in this process, plus the workers) against the one-thread run's; each worker's peak
memory (``VmHWM``) over its memory before the run; minor page faults and system time (what
mmap'd temporaries cost). Cluster start is timed apart and not in the extraction's time. Every run must write the same adapter, byte for byte.

``test_dask_workers_in_their_own_sessions`` runs the workers as ``setsid dask worker``
processes (see its docstring: Linux autogroup); it runs only as a benchmark.

Full size (the issue's case, 24 layers of 2048 x 2048 float32 at rank 64) unless run with
``--benchmark-disable`` (then 4 layers of 256 x 256); ``RSLORA_BENCH_DASK_SIZE=full|small``
overrides either way.

    python -m pytest bench/bench_dask_extract.py --benchmark-json=/tmp/dask_extract.json -s
    python bench/report.py /tmp/dask_extract.json
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest
from benchutil import set_case, write_extract_pair

pytest.importorskip("distributed")

from threadpoolctl import threadpool_limits  # noqa: E402

import rslora  # noqa: E402
from rslora.dask.cluster import cluster  # noqa: E402

SIZES = {"full": dict(layers=24, d=2048, rank=64), "small": dict(layers=4, d=256, rank=16)}
WORKERS = 2


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    name = os.environ.get("RSLORA_BENCH_DASK_SIZE") or \
        ("small" if request.config.getoption("benchmark_disable") else "full")
    if name not in SIZES:
        raise ValueError(f"RSLORA_BENCH_DASK_SIZE must be one of {sorted(SIZES)}, got {name!r}")
    size = SIZES[name]
    folder = tmp_path_factory.mktemp("dask_extract")
    write_extract_pair(folder, size["layers"], size["d"], size["rank"])
    group = f"dask extract {size['layers']}x{size['d']}x{size['d']} r={size['rank']}"
    return dict(folder=folder, group=group, runs={}, **size)


def _cpu() -> float:
    """CPU seconds of this process so far, all its threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _faults() -> int:
    """Minor page faults of this process so far (a fresh page touched: what an mmap'd
    temporary costs, page by page)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _worker_usage(reset: bool = False) -> dict:
    """On a worker: its CPU seconds, and its peak resident memory (bytes) since the last reset
    (``VmHWM``; ``reset`` restarts it from the current RSS). Not ``ru_maxrss``: a process started
    by fork + exec keeps its parent's peak there (the benchmark process's, here)."""
    import resource

    import rslora.adapters.extract  # noqa: F401  (imported before the baseline is taken)

    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux: reset the peak RSS to the current RSS
        except OSError:
            pass
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                status[name] = int(value.split()[0]) * 1024
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return dict(cpu=ru.ru_utime + ru.ru_stime, peak=status["VmHWM"], rss=status["VmRSS"],
                faults=ru.ru_minflt, sys=ru.ru_stime)


def _extract(case, out, client=None):
    return rslora.extract_adapter(case["folder"] / "base.safetensors",
                                  case["folder"] / "tuned.safetensors", out, rank=case["rank"],
                                  force=True, client=client)


def _adapter_bytes(out) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


def _check(case, res, out) -> None:
    assert len(res.layers) == case["layers"]
    assert all(l.rank == case["rank"] for l in res.layers)
    assert res.error < 0.5  # a real approximation, not an empty adapter
    case["runs"].setdefault("bytes", {})[out.name] = _adapter_bytes(out)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_process(benchmark, case, threads):
    set_case(benchmark, case["group"], f"1 process, {threads} BLAS thread(s)")
    out = case["folder"] / f"one-{threads}"
    cpu0, faults0 = _cpu(), _faults()
    with threadpool_limits(limits=threads):
        res = benchmark.pedantic(lambda: _extract(case, out), rounds=1, iterations=1)
    case["runs"][threads] = dict(cpu=_cpu() - cpu0)
    benchmark.extra_info["cpu_s"] = case["runs"][threads]["cpu"]
    benchmark.extra_info["minor faults"] = _faults() - faults0
    _check(case, res, out)


def test_dask_workers(benchmark, case):
    set_case(benchmark, case["group"], f"--workers {WORKERS} (1 thread each)")
    start = time.perf_counter()
    with cluster(workers=WORKERS) as client:
        _measure(benchmark, case, client, time.perf_counter() - start, "dask")


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")
def test_dask_workers_in_their_own_sessions(benchmark, case, request):
    """The same with ``dask worker`` processes started by ``setsid``: where Linux autogroup is on
    (``/proc/sys/kernel/sched_autogroup_enabled``), all processes of one session share one CPU
    share, so on a busy machine ``--workers`` processes get no more CPU than one process would;
    workers of their own sessions get a share each, as those of a real cluster do. They run with
    Dask's default worker environment (``MALLOC_TRIM_THRESHOLD_`` set: see
    ``rslora.dask.cluster.LOCAL_CONFIG``), the control of what ``--workers`` leaves out."""
    if request.config.getoption("benchmark_disable") and not os.environ.get("RSLORA_BENCH_DASK_SIZE"):
        pytest.skip("a benchmark only (starts a scheduler and workers as separate processes)")
    import cloudpickle
    from distributed import Client

    set_case(benchmark, case["group"], f"{WORKERS} workers (1 thread each), own sessions")
    # These workers cannot import this file: send its functions (_worker_usage) by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    request.addfinalizer(lambda: cloudpickle.unregister_pickle_by_value(sys.modules[__name__]))
    info = case["folder"] / "scheduler.json"
    dask_cli = [sys.executable, "-m", "dask"]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.perf_counter()
    procs = [subprocess.Popen(dask_cli + ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                          "--no-dashboard", "--scheduler-file", str(info)], **quiet)]
    try:
        while not info.exists():
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        procs += [subprocess.Popen(["setsid"] + dask_cli + ["worker", address, "--nthreads", "1",
                                                           "--no-dashboard"], **quiet)
                  for _ in range(WORKERS)]
        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(WORKERS, timeout=120)
            _measure(benchmark, case, client, time.perf_counter() - start, "dask-sessions")
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=60)


def _measure(benchmark, case, client, started: float, name: str) -> None:
    out = case["folder"] / name
    before = client.run(_worker_usage, reset=True)
    cpu0 = _cpu()
    res = benchmark.pedantic(lambda: _extract(case, out, client), rounds=1, iterations=1)
    cpu_client = _cpu() - cpu0
    after = client.run(_worker_usage)
    cpu_workers = sum(after[w]["cpu"] - before[w]["cpu"] for w in after)
    loadavg = os.getloadavg()
    layer = 4 * case["d"] * case["d"]  # one float32 weight
    info = benchmark.extra_info
    info["cluster start (s)"] = round(started, 2)
    info["cpu client+scheduler (s)"] = round(cpu_client, 2)
    info["cpu workers (s)"] = round(cpu_workers, 2)
    info["system cpu workers (s)"] = round(sum(after[w]["sys"] - before[w]["sys"] for w in after), 2)
    info["minor faults workers"] = sum(after[w]["faults"] - before[w]["faults"] for w in after)
    info["load average after"] = [round(x, 1) for x in loadavg]
    info["peak memory over start, per worker (MB)"] = [
        round((after[w]["peak"] - before[w]["rss"]) / 1e6, 1) for w in sorted(after)]
    info["one layer (MB)"] = round(layer / 1e6, 1)
    info["factors of one layer (MB)"] = round(2 * case["d"] * case["rank"] * 4 / 1e6, 1)
    one = case["runs"].get(1)
    if one is not None:
        info["cpu / 1-thread run's cpu"] = round((cpu_client + cpu_workers) / one["cpu"], 3)
    _check(case, res, out)
    # A worker holds about one layer's two tensors and its factors, whatever the model size
    # (allowance: a third tensor for the SVD's and the transfer's temporaries, 32 MB of heap).
    for w in after:
        assert after[w]["peak"] - before[w]["rss"] <= 3 * layer + 32e6, info
    # Same bytes as one process with one BLAS thread (run here if that case was deselected).
    ref = case["runs"]["bytes"].get("one-1")
    if ref is None:
        with threadpool_limits(limits=1):
            _extract(case, case["folder"] / "ref")
        ref = _adapter_bytes(case["folder"] / "ref")
        case["runs"]["bytes"]["one-1"] = ref
    assert _adapter_bytes(out) == ref
    print(f"\n{case['group']}, {benchmark.extra_info['role']}: {info}")
