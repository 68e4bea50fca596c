"""Output folders: what --force may replace, outputs that overlap inputs, file modes, and the
clean-up of what a killed run left (rslora._files). The kills themselves: test_crash_safety.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import rslora
import rslora.cli
from rslora import _files
from rslora._files import MANIFEST, atomic_output_dir, clean_stale, write_file
from safetensors.numpy import save_file

pytest.importorskip("safetensors")


def model_folder(path, seed=0):
    """A small Hugging Face-like model folder and a PEFT adapter for it."""
    rng = np.random.default_rng(seed)
    path.mkdir()
    w = {f"model.layers.{i}.proj.weight": rng.standard_normal((8, 6)).astype(np.float32)
         for i in range(2)}
    save_file(w, path / "model.safetensors")
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text("{}")
    factors = {"model.layers.0.proj": (rng.standard_normal((2, 6)).astype(np.float32),
                                       rng.standard_normal((8, 2)).astype(np.float32))}
    rslora.save_adapter(path.parent / "ad", factors, alpha=4)
    return path, path.parent / "ad"


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_error(capsys, argv):
    rc = rslora.cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# -- item 5: an output that is, holds or lies inside an input ---------------------------------------

def test_merge_into_its_own_base_is_refused(tmp_path, capsys):
    model, ad = model_folder(tmp_path / "model")
    before, before_ad = snapshot(model), snapshot(ad)
    for out in (model, tmp_path, model / "merged", ad, model / "model.safetensors"):
        for force in ([], ["--force"]):
            err = cli_error(capsys, ["merge", str(model), str(ad), "-o", str(out), *force])
            assert "input" in err and str(out) in err
    # the base named as a file: its folder holds it
    err = cli_error(capsys, ["merge", str(model / "model.safetensors"), str(ad), "-o", str(model),
                             "--force"])
    assert "holds the input" in err
    assert snapshot(model) == before and snapshot(ad) == before_ad
    assert sorted(os.listdir(tmp_path)) == ["ad", "model"]  # no temporary left either


def test_extract_into_the_folder_of_its_inputs_is_refused(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(1)
    base = {"l.weight": rng.standard_normal((6, 5)).astype(np.float32)}
    save_file(base, work / "base.st")
    save_file({"l.weight": base["l.weight"] + 1}, work / "tuned.st")
    before = snapshot(work)
    for out in (work, work / "base.st", tmp_path):
        err = cli_error(capsys, ["extract", str(work / "base.st"), str(work / "tuned.st"), "-o",
                                 str(out), "--rank", "1", "--force"])
        assert "input" in err
    assert snapshot(work) == before
    # next to the inputs is fine
    assert rslora.cli.main(["extract", str(work / "base.st"), str(work / "tuned.st"), "-o",
                            str(work / "adapter"), "--rank", "1", "-q"]) == 0


def test_symlinks_are_resolved(tmp_path, capsys):
    model, ad = model_folder(tmp_path / "model")
    (tmp_path / "link").symlink_to(model)
    err = cli_error(capsys, ["merge", str(model), str(ad), "-o", str(tmp_path / "link"), "--force"])
    assert "is the input" in err
    (tmp_path / "out").symlink_to(tmp_path / "elsewhere")
    err = cli_error(capsys, ["merge", str(model), str(ad), "-o", str(tmp_path / "out")])
    assert "symbolic link" in err
    assert (model / "config.json").exists()


# -- what --force replaces ---------------------------------------------------------------------------

def test_force_replaces_only_rslora_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not written by rslora"):
        atomic_output_dir(out, force=True)
    assert (out / "mine.txt").read_text() == "user data"
    out2 = tmp_path / "out2"
    with atomic_output_dir(out2) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"1")
        (tmp / "b.bin").write_bytes(b"2")
    assert json.loads((out2 / MANIFEST).read_text())["files"] == ["b.bin", "sub/a.bin"]
    for extra in ("c.txt", "sub/c.txt", "newdir/"):
        p = out2 / extra.rstrip("/")
        p.mkdir() if extra.endswith("/") else p.write_text("user")
        with pytest.raises(FileExistsError, match="did not write"):
            atomic_output_dir(out2, force=True)
        p.rmdir() if extra.endswith("/") else p.unlink()
    with atomic_output_dir(out2, force=True) as tmp:
        (tmp / "c.bin").write_bytes(b"3")
    assert sorted(os.listdir(out2)) == [MANIFEST, "c.bin"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:  # an empty folder holds nothing to lose: no --force
        (tmp / "x").write_bytes(b"")
    assert (empty / "x").exists()


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_with_and_without_renameat2(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    for i in range(3):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "f").write_text(str(i))
        assert (out / "f").read_text() == str(i)
        assert sorted(os.listdir(tmp_path)) == ["out"]


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            rslora.adapters.checkpoint.save_tensors(tmp / "w.safetensors",
                                                    {"x": (np.ones(3, np.float32), "F32")})
            (tmp / "sub").mkdir()
        write_file(tmp_path / "single.txt", b"x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out" / "w.safetensors").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "out" / MANIFEST).st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "single.txt").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o750
    assert os.stat(tmp_path / "out" / "sub").st_mode & 0o777 == 0o750


# -- what a killed run leaves ------------------------------------------------------------------------

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def leftover(parent, name, kind, pid, host=None, manifest=True, tag="abcd1234"):
    d = parent / f".{name}.{kind}-{host or _files._HOST}-{pid}-{tag}"
    d.mkdir()
    (d / "payload").write_text(kind)
    if manifest:
        (d / MANIFEST).write_text(json.dumps({"files": ["payload"]}))
    return d


def test_stale_temporaries_are_cleaned_and_only_ours(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = dead_pid()
    stale = leftover(tmp_path, "out", "tmp", dead)
    stale_old = leftover(tmp_path, "out", "old", dead)
    live = leftover(tmp_path, "out", "tmp", os.getpid())        # a run in progress
    other_host = leftover(tmp_path, "out", "tmp", dead, host="0123abcd")
    no_manifest = leftover(tmp_path, "out", "tmp", dead, manifest=False, tag="ee")  # not provably ours
    other_out = leftover(tmp_path, "other", "tmp", dead)
    assert sorted(clean_stale(out)) == sorted([stale, stale_old])
    assert not stale.exists() and not stale_old.exists()
    for kept in (live, other_host, no_manifest, other_out):
        assert (kept / "payload").exists()


def test_empty_leftovers_of_dead_runs_are_cleaned(tmp_path):
    """Killed between mkdir and the manifest's write (or between removing the manifest and
    rmdir): an empty folder named for OUT by a dead process is removed; one with foreign
    content and no manifest is not (the test above)."""
    out = tmp_path / "out"
    dead = dead_pid()
    empty = [tmp_path / f".out.{kind}-{_files._HOST}-{dead}-ff{i}" for i, kind in enumerate(("tmp", "old"))]
    for d in empty:
        d.mkdir()
    live_empty = tmp_path / f".out.tmp-{_files._HOST}-{os.getpid()}-aa"
    live_empty.mkdir()
    assert sorted(clean_stale(out)) == sorted(empty)
    assert not any(d.exists() for d in empty) and live_empty.exists()
    assert not out.exists()  # an empty "old" is not put back as OUT


def test_old_output_set_aside_is_put_back(tmp_path):
    """Killed between 'OUT -> old' and 'tmp -> OUT': the next run restores the old output."""
    dead = dead_pid()
    old = leftover(tmp_path, "out", "old", dead)
    tmp = leftover(tmp_path, "out", "tmp", dead)
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="already exists"):  # restored, so it exists
        atomic_output_dir(out)
    assert (out / "payload").read_text() == "old" and not old.exists() and not tmp.exists()


def test_failure_inside_the_block_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "f").write_text("one")
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with atomic_output_dir(out, force=True) as tmp:
                (tmp / "f").write_text("two")
                raise exc
        assert (out / "f").read_text() == "one" and sorted(os.listdir(tmp_path)) == ["out"]
