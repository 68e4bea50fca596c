"""extract, merge and resize on a Dask cluster (a real LocalCluster of processes): the files are
byte for byte those of one process with one BLAS thread; a worker killed mid-run changes
nothing; a cluster that cannot finish is one line, exit 2, nothing written, the previous
output intact."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

import dask  # noqa: E402
from distributed import LocalCluster  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import rslora  # noqa: E402
from rslora import cli  # noqa: E402
from rslora.adapters import extract as extract_mod  # noqa: E402
from rslora.adapters import parallel  # noqa: E402
from rslora.dask.cluster import cluster  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with cluster(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """base/ and tuned/ (tuned sharded, with an index), layers of several shapes, float32 and
    bfloat16, an embedding, an unchanged layer and a norm."""
    folder = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(7)
    shapes = {f"model.layers.{i}.proj.weight": s
              for i, s in enumerate([(48, 32), (32, 48), (40, 40), (64, 16), (24, 56), (33, 47)])}
    shapes["model.embed_tokens.weight"] = (50, 16)
    base, tuned = {}, {}
    for key, (m, n) in shapes.items():
        base[key] = rng.standard_normal((m, n)).astype(np.float32)
        k = min(m, n)
        U, _ = np.linalg.qr(rng.standard_normal((m, k)))
        V, _ = np.linalg.qr(rng.standard_normal((n, k)))
        tuned[key] = base[key] + ((U * 0.8 ** np.arange(k)) @ V.T).astype(np.float32)
    tuned["model.layers.2.proj.weight"] = base["model.layers.2.proj.weight"].copy()
    base["model.norm.weight"] = tuned["model.norm.weight"] = np.ones(16, np.float32)
    (folder / "base").mkdir()
    (folder / "tuned").mkdir()
    save_file(base, folder / "base" / "model.safetensors")
    keys = sorted(tuned)
    shards = {"model-00001-of-00002.safetensors": keys[:4], "model-00002-of-00002.safetensors": keys[4:]}
    for name, ks in shards.items():
        save_file({k: tuned[k] for k in ks}, folder / "tuned" / name)
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    import json
    (folder / "tuned" / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def files(folder: Path) -> dict:
    """Every file of a folder (recursively) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_process(argv: list) -> None:
    """The reference: the command in this process with one BLAS thread."""
    with threadpool_limits(limits=1):
        assert cli.main(argv + ["-q"]) == 0


def on_cluster(client, argv: list) -> int:
    return cli.main(argv + ["-q", "--scheduler", client.scheduler.address])


def assert_same_output(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], name


@pytest.mark.parametrize("how", [["--rank", "5"], ["--tol", "0.2", "--max-rank", "12"],
                                 ["--rank", "3", "--dtype", "bfloat16", "--seed", "11"]])
def test_extract_is_identical_to_one_process(client, pair, tmp_path, how):
    argv = ["extract", str(pair / "base"), str(pair / "tuned")] + how
    one_process(argv + ["-o", str(tmp_path / "one")])
    assert on_cluster(client, argv + ["-o", str(tmp_path / "dask")]) == 0
    assert_same_output(tmp_path / "one", tmp_path / "dask")
    ad = rslora.load_adapter(tmp_path / "dask")
    assert "model.layers.2.proj" not in ad.modules and len(ad.modules) == 6  # unchanged: skipped


def test_one_layer_per_task_or_batched_same_bytes(client, pair, tmp_path, monkeypatch):
    argv = ["extract", str(pair / "base"), str(pair / "tuned"), "--rank", "4"]
    one_process(argv + ["-o", str(tmp_path / "one")])
    monkeypatch.setattr(parallel, "BATCH_WEIGHT", 1)  # every layer a task of its own
    assert on_cluster(client, argv + ["-o", str(tmp_path / "single")]) == 0
    monkeypatch.setattr(parallel, "BATCH_WEIGHT", 10**9)  # TASKS_PER_THREAD tasks per thread
    assert on_cluster(client, argv + ["-o", str(tmp_path / "batched")]) == 0
    assert_same_output(tmp_path / "one", tmp_path / "single")
    assert_same_output(tmp_path / "one", tmp_path / "batched")


def test_merge_is_identical_to_one_process(client, pair, tmp_path):
    rslora.extract_adapter(pair / "base", pair / "tuned", tmp_path / "adapter", rank=4)
    for extra in ([], ["--dtype", "bfloat16", "--max-shard-size", "10KB"]):
        argv = ["merge", str(pair / "tuned"), str(tmp_path / "adapter")] + extra
        one_process(argv + ["-o", str(tmp_path / "one"), "--force"])
        assert on_cluster(client, argv + ["-o", str(tmp_path / "dask"), "--force"]) == 0
        assert_same_output(tmp_path / "one", tmp_path / "dask")
    assert len(files(tmp_path / "dask")) > 2  # re-sharded: the index and several files


def test_resize_is_identical_to_one_process(client, pair, tmp_path):
    rslora.extract_adapter(pair / "base", pair / "tuned", tmp_path / "adapter", rank=10)
    for how in (["--rank", "3"], ["--tol", "0.3"], ["--energy", "0.95", "--max-rank", "6"]):
        argv = ["resize", str(tmp_path / "adapter")] + how
        one_process(argv + ["-o", str(tmp_path / "one"), "--force"])
        assert on_cluster(client, argv + ["-o", str(tmp_path / "dask"), "--force"]) == 0
        assert_same_output(tmp_path / "one", tmp_path / "dask")


def test_real_model_folder(client, tmp_path):
    """A GPT-2 (Conv1D layers, tied embedding) saved sharded by transformers: extract with
    biases and merge back, on the cluster and in one process."""
    pytest.importorskip("transformers")
    import hf_models

    model = hf_models.build("gpt2")
    tuned, _ = hf_models.low_rank_tuned(model, r"attn\.c_attn|mlp\.c_fc", rank=2, biases=True)
    hf_models.save(model, tmp_path / "base")
    hf_models.save(tuned, tmp_path / "tuned", shard="40KB")
    argv = ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), "--rank", "2", "--biases"]
    one_process(argv + ["-o", str(tmp_path / "a1")])
    assert on_cluster(client, argv + ["-o", str(tmp_path / "a2")]) == 0
    assert_same_output(tmp_path / "a1", tmp_path / "a2")
    argv = ["merge", str(tmp_path / "base"), str(tmp_path / "a2")]
    one_process(argv + ["-o", str(tmp_path / "m1")])
    assert on_cluster(client, argv + ["-o", str(tmp_path / "m2")]) == 0
    assert_same_output(tmp_path / "m1", tmp_path / "m2")
    merged = hf_models.head_class("gpt2").from_pretrained(tmp_path / "m2")
    np.testing.assert_allclose(hf_models.outputs(merged).numpy(),
                               hf_models.outputs(tuned).numpy(), rtol=0, atol=1e-4)


class KillOnce:
    """A stand-in for extract's task that kills its worker process at layer ``at`` once (the
    marker file says it did), then reads and factors the layer as the real task does."""

    def __init__(self, marker: str, at: str):
        self.marker, self.at = marker, at

    def __call__(self, job):
        if job.module == self.at and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        from rslora.adapters.extract import _read_by_path

        return _read_by_path(job)


def _always_kill(job):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_mid_run_changes_nothing(client, pair, tmp_path, monkeypatch):
    argv = ["extract", str(pair / "base"), str(pair / "tuned"), "--rank", "4"]
    one_process(argv + ["-o", str(tmp_path / "one")])
    marker = tmp_path / "killed"
    monkeypatch.setattr(parallel, "BATCH_WEIGHT", 1)
    monkeypatch.setattr(extract_mod, "_read_by_path", KillOnce(str(marker), "model.layers.3.proj"))
    assert on_cluster(client, argv + ["-o", str(tmp_path / "dask")]) == 0
    assert marker.exists()  # a worker really died
    assert_same_output(tmp_path / "one", tmp_path / "dask")


def previous_output(tmp_path: Path, pair: Path) -> tuple[Path, dict]:
    """An adapter written by an earlier run, which --force may replace only by a whole one."""
    out = tmp_path / "out"
    rslora.extract_adapter(pair / "base", pair / "tuned", out, rank=2)
    return out, files(out)


def assert_failed_cleanly(capsys, code: int, out: Path, before: dict, match: str) -> None:
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err and match in err, err
    assert files(out) == before  # the previous output is intact
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_a_task_that_keeps_killing_workers(pair, tmp_path, monkeypatch, capsys):
    out, before = previous_output(tmp_path, pair)
    monkeypatch.setattr(extract_mod, "_read_by_path", _always_kill)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        code = cli.main(["extract", str(pair / "base"), str(pair / "tuned"), "--rank", "4", "-q",
                         "-o", str(out), "--force", "--workers", "1"])
    assert_failed_cleanly(capsys, code, out, before, "killed every worker it ran on")


def test_no_worker_on_the_cluster(pair, tmp_path, monkeypatch, capsys):
    out, before = previous_output(tmp_path, pair)
    monkeypatch.setenv("RSLORA_DASK_NO_WORKER_TIMEOUT", "1")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        code = cli.main(["resize", str(pair / "base"), "--rank", "2", "-q", "-o", str(out),
                         "--force", "--scheduler", empty.scheduler_address])
        assert code == 2  # not an adapter folder: the usual one-line error, before any task
        capsys.readouterr()
        code = cli.main(["extract", str(pair / "base"), str(pair / "tuned"), "--rank", "4", "-q",
                         "-o", str(out), "--force", "--scheduler", empty.scheduler_address])
    assert_failed_cleanly(capsys, code, out, before, "no Dask worker left for 1 s")


def test_unreachable_scheduler(pair, tmp_path, capsys):
    out, before = previous_output(tmp_path, pair)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code = cli.main(["extract", str(pair / "base"), str(pair / "tuned"), "--rank", "4", "-q",
                         "-o", str(out), "--force", "--scheduler", "tcp://127.0.0.1:9"])
    assert_failed_cleanly(capsys, code, out, before,
                          "rslora extract: error: cannot reach the Dask scheduler at tcp://127.0.0.1:9")


def test_a_task_error_is_the_same_one_line(client, pair, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    from rslora.adapters.checkpoint import Checkpoint

    with Checkpoint(pair / "base") as ck:
        tensors = {k: ck.read(k) for k in ck.keys()}
    tensors["model.layers.4.proj.weight"][3, 3] = np.nan
    save_file(tensors, bad / "model.safetensors")
    argv = ["extract", str(pair / "base"), str(bad), "--rank", "2", "-q", "-o", str(tmp_path / "o")]
    errs = []
    for extra in ([], ["--scheduler", client.scheduler.address]):
        assert cli.main(argv + extra) == 2
        errs.append(capsys.readouterr().err)
    assert errs[0] == errs[1] and "'model.layers.4.proj.weight': the delta has NaN" in errs[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, match", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--workers", "-3"], "--workers must be >= 1, got -3"),
    (["--scheduler", " "], "--scheduler must be an address"),
])
def test_bad_cluster_flags(pair, tmp_path, capsys, flags, match):
    for argv in (["extract", str(pair / "base"), str(pair / "tuned"), "--rank", "2"],
                 ["merge", str(pair / "base"), str(tmp_path), "--force"],
                 ["resize", str(tmp_path), "--rank", "2"]):
        assert cli.main(argv + ["-o", str(tmp_path / "o")] + flags) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "o").exists()


def test_both_flags_is_a_usage_error(pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["extract", str(pair / "base"), str(pair / "tuned"), "--rank", "2", "-o",
                  str(tmp_path / "o"), "--workers", "2", "--scheduler", "tcp://127.0.0.1:9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not allowed with argument" in err


def test_workers_flag_starts_and_stops_a_local_cluster(pair, tmp_path, capsys):
    argv = ["extract", str(pair / "base"), str(pair / "tuned"), "--rank", "3"]
    one_process(argv + ["-o", str(tmp_path / "one")])
    assert cli.main(argv + ["-q", "-o", str(tmp_path / "dask"), "--workers", "2"]) == 0
    assert_same_output(tmp_path / "one", tmp_path / "dask")
    assert "wrote" in capsys.readouterr().out


def test_ops_take_arrays_that_went_through_pickle():
    """What a task receives is unpickled: an equal dtype that is not NumPy's own object (the
    bindings compared dtypes by identity and refused float32 as "not float32")."""
    import pickle

    rng = np.random.default_rng(0)
    W, A, B = (rng.standard_normal(s).astype(np.float32) for s in ((6, 5), (2, 5), (6, 2)))
    A2, B2 = pickle.loads(pickle.dumps((A, B)))
    assert A2.dtype is not np.dtype(np.float32)
    got = rslora.merge(W.copy(), A2, B2, scale=0.5)
    np.testing.assert_array_equal(got, rslora.merge(W.copy(), A, B, scale=0.5))
    ids, scales = pickle.loads(pickle.dumps((np.array([0, 1, 0]), np.array([1.0, 0.5]))))
    x = rng.standard_normal((3, 5)).astype(np.float32)
    y = rslora.lora_add_multi(np.zeros((3, 6), np.float32), x, np.stack([A, A]), np.stack([B, B]),
                              ids, scales=scales)
    np.testing.assert_allclose(y, (x @ A.T @ B.T) * scales[ids][:, None], rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="A must be float32 or float64, got >f4"):
        rslora.merge(W.copy(), A.astype(">f4"), B, scale=0.5)


def test_scheduler_and_workers_started_by_hand(pair, tmp_path):
    """What the README tells a user to run: ``dask scheduler``, ``dask worker ... --nthreads 1``
    (separate processes on 127.0.0.1), then ``--scheduler ADDRESS``."""
    import json
    import subprocess
    import sys
    import time

    from distributed import Client

    info = tmp_path / "scheduler.json"
    dask_cli = [sys.executable, "-m", "dask"]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [subprocess.Popen(dask_cli + ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                          "--no-dashboard", "--scheduler-file", str(info)], **quiet)]
    try:
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(info.read_text())["address"]
        procs.append(subprocess.Popen(dask_cli + ["worker", address, "--nthreads", "1",
                                                  "--nworkers", "2", "--no-dashboard"], **quiet))
        with Client(address, set_as_default=False) as c:
            c.wait_for_workers(2, timeout=60)
        argv = ["extract", str(pair / "base"), str(pair / "tuned"), "--tol", "0.1"]
        one_process(argv + ["-o", str(tmp_path / "one")])
        assert cli.main(argv + ["-q", "-o", str(tmp_path / "dask"), "--scheduler", address]) == 0
        assert_same_output(tmp_path / "one", tmp_path / "dask")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_task_refuses_a_file_changed_since_the_plan(pair):
    """A task reads by path: a tensor whose shape is not the planned one (the file was replaced,
    or a worker sees another file there) is an error, not a layer factored from the wrong data."""
    from rslora.adapters.checkpoint import CheckpointError
    from rslora.adapters.extract import _Layer, _read_by_path

    base = str(pair / "base" / "model.safetensors")
    tuned = str(pair / "tuned" / "model-00001-of-00002.safetensors")
    key = "model.embed_tokens.weight"
    ok = _Layer("m", base, key, tuned, key, (50, 16), "embedding", 2, None, None, 0)
    A, B, report = _read_by_path(ok)
    assert A.shape == (2, 50) and B.shape == (16, 2) and report.rank == 2
    with pytest.raises(CheckpointError, match="changed since the run began"):
        _read_by_path(_Layer("m", base, key, tuned, key, (16, 50), "embedding", 2, None, None, 0))
    with pytest.raises(CheckpointError, match="changed since the run began"):
        _read_by_path(_Layer("m", base, "model.gone.weight", tuned, key, (50, 16), "linear", 2,
                             None, None, 0))
