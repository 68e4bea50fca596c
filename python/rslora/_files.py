"""Files that survive a crash: output folders written whole or not at all, single files replaced
atomically, and the rules on what an output may replace.

Used by every layer that writes (adapters/, study/); it imports nothing from rslora.

An output folder OUT is written as a hidden sibling ``.OUT.tmp-<host>-<pid>-<random>`` holding
a manifest (:data:`MANIFEST`) from its first moment. When the caller is done, the manifest is
rewritten with the list of files, every file and folder is ``fsync``-ed, and the temporary is
renamed into place. An existing OUT (``force``) is swapped with it in one atomic
``renameat2(RENAME_EXCHANGE)`` where the file system has it; elsewhere OUT is renamed aside to
``.OUT.old-<host>-<pid>-<random>`` first. The next run that names OUT finishes the job of a
killed one: it puts back an old OUT that was set aside but not replaced, and removes the
temporaries and old copies of processes that are gone (only folders that carry the manifest and
a host tag and pid of this machine; never anything else).

``force`` replaces only a folder that rslora wrote (its manifest lists every entry in it) or an
empty one; an output that is, holds or lies inside an input is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import signal
import socket
from pathlib import Path

__all__ = ["MANIFEST", "OutputDir", "atomic_output_dir", "check_output_dir", "check_not_input",
           "write_file", "file_mode", "fsync_dir", "clean_stale"]

#: The manifest rslora writes in every output folder: what wrote it and the files it wrote.
MANIFEST = ".rslora-output.json"
#: Testing hook: SIGKILL this process at the named point of a commit (see tests/test_crash_safety).
CRASH_ENV = "RSLORA_CRASH_AT"

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def _dir_mode() -> int:
    return 0o777 & ~_umask()


def fsync_dir(path) -> None:
    """Make a folder's entries (creations, renames) durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, data) -> None:
    """Replace the file ``path`` atomically with ``data`` (bytes, or a callable given the open
    binary file): a temporary sibling, written, fsync-ed, given the umask's mode, renamed."""
    path = Path(os.fspath(path))
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


# -- what an output may be -------------------------------------------------------------------------
def _real(p) -> Path:
    return Path(os.path.realpath(os.fspath(p)))


def check_not_input(out, inputs) -> None:
    """ValueError unless ``out`` is apart from every input: not the same path, not a folder
    holding one, not inside one (symbolic links resolved)."""
    o = _real(out)
    for i in inputs:
        if i is None:
            continue
        r = _real(i)
        if o == r:
            raise ValueError(f"output {out} is the input {i}; choose another output folder")
        if o in r.parents:
            raise ValueError(f"output {out} holds the input {i}; choose another output folder")
        if r in o.parents:
            raise ValueError(f"output {out} is inside the input {i}; choose a folder outside it")


def _manifest(folder: Path):
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = data["files"]
        if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
            return None
        return data
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _foreign_entries(folder: Path) -> list[str] | None:
    """Entries of ``folder`` that rslora did not write (None: there is no manifest at all)."""
    data = _manifest(folder)
    if data is None:
        return None
    ours = set(data["files"]) | {MANIFEST}
    parents = {"/".join(f.split("/")[:k]) for f in ours for k in range(1, f.count("/") + 1)}
    found = []
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder).replace(os.sep, "/")
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = name if rel == "." else f"{rel}/{name}"
            if p not in ours:
                found.append(p)
        for name in list(dirs):
            p = name if rel == "." else f"{rel}/{name}"
            if not os.path.islink(os.path.join(root, name)) and p not in parents:
                found.append(p + "/")
                dirs.remove(name)
    return sorted(found)


def _check_replaceable(out: Path, force: bool) -> bool:
    """Whether ``out`` exists (so must be replaced); raises if it may not be."""
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link; give the folder it points to, or "
                              "another path")
    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; remove it first")
    if not os.listdir(out):
        return True  # an empty folder: nothing to lose
    if not force:
        raise FileExistsError(f"{out} already exists; use --force (force=True) to replace it")
    foreign = _foreign_entries(out)
    if foreign is None:
        raise FileExistsError(f"{out} was not written by rslora (no {MANIFEST}); --force replaces "
                              "only rslora's own output: remove it yourself or choose another folder")
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise FileExistsError(f"{out} holds files rslora did not write ({', '.join(foreign[:3])}"
                              f"{more}); --force will not remove them: move them or choose "
                              "another folder")
    return True


def check_output_dir(out_dir, force: bool, inputs=()) -> Path:
    """``out_dir`` as a Path, checked before any work: apart from the inputs, and either absent,
    empty, or (with ``force``) an earlier rslora output. Cleans stale temporaries first."""
    out = Path(os.fspath(out_dir))
    check_not_input(out, inputs)
    clean_stale(out)
    _check_replaceable(out, force)
    return out


# -- stale temporaries -----------------------------------------------------------------------------
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale(out) -> list[Path]:
    """Finish what killed rslora processes left next to ``out``: put back an old ``out`` that
    was set aside but not replaced, and remove their temporaries and old copies. Only folders
    named for ``out`` by this host, whose process is gone and which carry the manifest, are
    touched. Returns what was removed or restored."""
    out = Path(os.fspath(out))
    parent = out.parent
    try:
        with os.scandir(parent) as it:
            entries = list(it)
    except OSError:
        return []
    stale = []
    for e in entries:
        m = _STALE.match(e.name)
        if (m and m["name"] == out.name and m["host"] == _HOST and not _alive(int(m["pid"]))
                and e.is_dir(follow_symlinks=False) and _ours_or_empty(e.path)):
            stale.append((m["kind"], Path(e.path)))
    done = []
    for kind, p in sorted(stale, key=lambda kp: kp[0] != "old"):
        if kind == "old" and not os.path.lexists(out) and _manifest(p) is not None:
            os.replace(p, out)  # killed between the two renames: the old output comes back
            fsync_dir(parent)
        else:
            _remove_tree(p)
        done.append(p)
    return done


def _ours_or_empty(path: str) -> bool:
    """A leftover carries the manifest, or is empty: killed between ``mkdir`` and the manifest's
    write, or between removing the manifest and ``rmdir`` (an empty folder holds nothing to lose)."""
    try:
        return os.path.isfile(os.path.join(path, MANIFEST)) or not os.listdir(path)
    except OSError:
        return False


def _remove_tree(p: Path) -> None:
    """Remove an rslora folder, its manifest last, so that a crash midway leaves it recognisable."""
    import shutil

    with os.scandir(p) as it:
        entries = list(it)
    for e in entries:
        if e.name == MANIFEST:
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path)
        else:
            os.remove(e.path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(p / MANIFEST)
    os.rmdir(p)


# -- the atomic swap -------------------------------------------------------------------------------
def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


_RENAMEAT2: list[object] = []  # the looked-up function (or None), once


def _renameat2():
    if not _RENAMEAT2:
        fn = None
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (AttributeError, OSError):
            fn = None
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


class OutputDir:
    """An output folder in the making: ``tmp`` is written by the caller, :meth:`commit` puts it
    in place of ``out`` (replacing an existing one only as :func:`check_output_dir` allows),
    :meth:`abort` removes it. As a context manager: yields ``tmp``; commits on success, aborts
    on any exception (KeyboardInterrupt included).
    """

    def __init__(self, out_dir, force: bool = False, inputs=()):
        self.out = check_output_dir(out_dir, force, inputs)
        self.force = force
        self.tmp = self._sibling("tmp")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.tmp, 0o700)
        except OSError as e:
            raise OSError(f"cannot create output directory {self.out}: {e.strerror or e}") from None
        try:
            # The manifest first: it is what makes a leftover temporary recognisably ours.
            (self.tmp / MANIFEST).write_text(json.dumps({"writer": "rslora", "complete": False,
                                                         "files": []}) + "\n")
        except BaseException:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _sibling(self, kind: str) -> Path:
        return self.out.with_name(f".{self.out.name}.{kind}-{_HOST}-{os.getpid()}-"
                                  f"{secrets.token_hex(4)}")

    def commit(self) -> Path:
        _crash_point("commit")
        files = []
        fmode, dmode = file_mode(), _dir_mode()
        for root, dirs, names in os.walk(self.tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), dmode)
            for n in names:
                p = os.path.join(root, n)
                rel = os.path.relpath(p, self.tmp).replace(os.sep, "/")
                if rel != MANIFEST:
                    files.append(rel)
                os.chmod(p, fmode)  # writers that use mkstemp-like files make 0600
                _fsync_file(p)
        manifest = {"writer": "rslora", "complete": True, "files": sorted(files)}
        write_file(self.tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        os.chmod(self.tmp, dmode)
        for root, dirs, _ in os.walk(self.tmp, topdown=False):
            fsync_dir(root)
        _crash_point("fsynced")
        if _check_replaceable(self.out, self.force):
            self._replace()
        else:
            os.rename(self.tmp, self.out)
        fsync_dir(self.out.parent)
        return self.out

    def _replace(self) -> None:
        try:
            os.replace(self.tmp, self.out)  # atomic over an empty folder
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if _exchange(self.tmp, self.out):  # one atomic step: OUT is old, then new
            fsync_dir(self.out.parent)
            _crash_point("swapped")
            _remove_tree(self.tmp)  # the old output, which has a manifest
            return
        old = self._sibling("old")
        os.rename(self.out, old)
        fsync_dir(self.out.parent)
        _crash_point("aside")  # OUT is missing now: the next run puts `old` back
        os.rename(self.tmp, self.out)
        fsync_dir(self.out.parent)
        _crash_point("swapped")
        _remove_tree(old)

    def abort(self) -> None:
        if self.tmp.exists():
            _remove_tree(self.tmp)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def atomic_output_dir(out_dir, force: bool = False, inputs=()) -> OutputDir:
    """``with atomic_output_dir(OUT, force) as tmp:`` write into ``tmp``; OUT appears complete
    when the block ends, or not at all (see :class:`OutputDir`)."""
    return OutputDir(out_dir, force, inputs)
