"""`rslora study --workers N | --scheduler ADDRESS`: the study's training runs as Dask tasks give
the same results.json as one process, also when a worker is killed mid-sweep; a cluster that
cannot finish is one line, exit 2, and the previous output stays as it was. On the tiny config
of test_study, against real LocalClusters of processes."""

from __future__ import annotations

import os
import signal
import sys

import pytest

pytest.importorskip("distributed")

import dask  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402
from test_study import tiny_config  # noqa: E402

from rslora import cli, study  # noqa: E402
from rslora.study import lrmap, mlp, parallel, plots  # noqa: E402

FILES = sorted(["report.md", "results.json", ".rslora-output.json"])  # plots: see `tiny`


@pytest.fixture(scope="module")
def scheduler():
    """A running cluster of two 1-thread worker processes, as `dask scheduler` + `dask worker`."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def reference():
    """results.json of the study run in this process, in order."""
    return study.output.dumps({k: v for k, v in study.run(tiny_config(), progress=False).items()
                               if not k.startswith("_")}).encode()


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(study, "quick_config", tiny_config)  # `--quick` runs the tiny config
    # No plots: they take most of a tiny study's time, and test_study checks them.
    monkeypatch.setattr(plots, "write_all", lambda results, out_dir: [])


def _study(out, *flags) -> int:
    return cli.main(["study", "--quick", "--out", str(out), *flags])


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_workers_and_scheduler_give_the_same_results_json(tiny, scheduler, reference, tmp_path):
    assert _study(tmp_path / "w2", "--workers", "2") == 0
    assert (tmp_path / "w2" / "results.json").read_bytes() == reference
    assert "local Dask cluster of 2 worker processes" in (tmp_path / "w2" / "report.md").read_text()
    assert _study(tmp_path / "s", "--scheduler", scheduler) == 0
    assert (tmp_path / "s" / "results.json").read_bytes() == reference
    assert scheduler in (tmp_path / "s" / "report.md").read_text()
    with Client(scheduler, set_as_default=False) as client:  # the Python API's client=
        study.run_study(tiny_config(), tmp_path / "c", progress=False, client=client)
        assert client.status == "running"  # the caller's client is left open
    assert (tmp_path / "c" / "results.json").read_bytes() == reference
    assert sorted(os.listdir(tmp_path / "s")) == FILES


class KillOnce:
    """A run function for the test hook: kills its worker process at the first run of seed 1
    (mid-sweep: seed 0's runs are done or running), leaving ``marker`` so that the rerun lives."""

    def __init__(self, marker: str, name: str):
        self.marker, self.name = marker, name

    def __call__(self, cfg, job):
        if job[0] == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        module = sys.modules[f"rslora.study.{self.name}"]
        return module.run_job(cfg, job)  # the worker's own, unpatched function


class KillAlways:
    def __call__(self, cfg, job):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_mid_sweep_changes_nothing(tiny, scheduler, reference, tmp_path,
                                                   monkeypatch):
    for name, module in (("lrmap", lrmap), ("mlp", mlp)):
        marker = tmp_path / f"killed-{name}"
        monkeypatch.setattr(module, "run_job", KillOnce(str(marker), name))
    assert _study(tmp_path / "out", "--scheduler", scheduler) == 0
    assert (tmp_path / "killed-lrmap").exists() and (tmp_path / "killed-mlp").exists()
    assert (tmp_path / "out" / "results.json").read_bytes() == reference


def test_a_cluster_that_cannot_finish_leaves_the_previous_output(tiny, reference, tmp_path,
                                                                monkeypatch, capsys):
    out = tmp_path / "out"
    assert _study(out, "--workers", "1") == 0
    before = {f: (out / f).read_bytes() for f in FILES}
    capsys.readouterr()
    monkeypatch.setattr(lrmap, "run_job", KillAlways())
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        assert _study(out, "--workers", "2", "--force") == 2
    _one_line_error(capsys, "rslora study: error:", "killed every worker")
    assert {f: (out / f).read_bytes() for f in sorted(os.listdir(out))} == before
    assert os.listdir(tmp_path) == ["out"]  # no temporary sibling left behind


def test_an_unreachable_scheduler_is_one_line(tiny, tmp_path, capsys):
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert _study(tmp_path / "out", "--scheduler", "tcp://127.0.0.1:9") == 2
    _one_line_error(capsys, "cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, words", [
    (["--workers", "0"], ["--workers must be >= 1, got 0"]),
    (["--workers", "-3"], ["--workers must be >= 1, got -3"]),
    (["--workers", "2", "--scheduler", "tcp://h:1"], ["--scheduler", "not allowed with", "--workers"]),
])
def test_bad_cluster_flags_are_one_line(flags, words, tmp_path, capsys):
    try:
        code = _study(tmp_path / "out", *flags)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    _one_line_error(capsys, *words)
    assert os.listdir(tmp_path) == []


def test_missing_dask_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` fails
    for flags in (["--workers", "2"], ["--scheduler", "tcp://h:1"]):
        assert _study(tmp_path / "out", *flags) == 2
        _one_line_error(capsys, "needs distributed", "pip install 'rslora[dask]'")
    assert os.listdir(tmp_path) == []


def test_without_dask_the_default_runs_here_and_says_so(tiny, reference, tmp_path, monkeypatch,
                                                        capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)
    monkeypatch.setattr(parallel, "default_workers", lambda: 2)
    assert _study(tmp_path / "out") == 0
    assert "Dask is not installed" in capsys.readouterr().err
    assert (tmp_path / "out" / "results.json").read_bytes() == reference
    assert "in one process" in (tmp_path / "out" / "report.md").read_text()


def _double(cfg, job):
    return (cfg, 2 * job)


def test_runner_keeps_the_order_and_advances_as_runs_finish(scheduler):
    jobs = list(range(37))
    with Client(scheduler, set_as_default=False) as client:
        for c in (None, client):
            seen = []
            runner = parallel.Runner(c, seen.append)
            assert runner.map(_double, "cfg", jobs, cost=lambda j: j + 1) == \
                [("cfg", 2 * j) for j in jobs]
            assert sum(seen) == sum(j + 1 for j in jobs)  # every run's cost, once
            assert len(seen) == len(jobs)  # as each run's result arrives
            assert runner.map(_double, "cfg", []) == []


def test_bad_api_arguments(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        study.run(tiny_config(), progress=False, workers=2, scheduler="tcp://h:1")
    with pytest.raises(ValueError, match="workers or client, not both"):
        study.run(tiny_config(), progress=False, workers=2, client=object())
    with pytest.raises(ValueError, match="workers must be >= 1"):
        study.run_study(tiny_config(), tmp_path / "out", progress=False, workers=0)
    assert os.listdir(tmp_path) == []


class _FakeClient:
    def __init__(self, run):
        self.run = run


def test_workers_that_cannot_import_rslora_are_one_line():
    from rslora.dask.cluster import ClusterError

    no_study = _FakeClient(lambda fn: {"tcp://a:1": None, "tcp://b:2": "ModuleNotFoundError: x"})
    with pytest.raises(ClusterError, match=r"worker at tcp://b:2 cannot import .* same rslora"):
        parallel._check_workers_import(no_study)

    def cannot_load(fn):
        raise ModuleNotFoundError("No module named 'rslora'\n  (the worker's traceback)")

    with pytest.raises(ClusterError, match=r"cannot run rslora's study .*'rslora'$"):
        parallel._check_workers_import(_FakeClient(cannot_load))
    parallel._check_workers_import(_FakeClient(lambda fn: {"tcp://a:1": None}))
    assert parallel._import_study() is None  # here, as on a worker with rslora
