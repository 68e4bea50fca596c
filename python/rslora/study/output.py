"""The output directory: checked before any work, written atomically (temp file + os.replace)."""

from __future__ import annotations

import json
import math
import os
import tempfile

from ..errors import UserError

REPORT = "report.md"
RESULTS = "results.json"


def prepare(out_dir, force: bool) -> str:
    """Create ``out_dir`` if needed and check it can be written; refuse to replace a report.

    Raises :class:`rslora.cli.UserError` (one line) for a path that is a file, a directory that
    cannot be created or written, or an existing report without ``force``.
    """
    path = os.fspath(out_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"output path {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {path!r}: {e.strerror or e}") from None
    report = os.path.join(path, REPORT)
    if os.path.exists(report) and not force:
        raise UserError(f"{report!r} already exists; pass --force to overwrite it")
    try:  # os.access is not enough (root, read-only mounts): try to write
        fd, probe = tempfile.mkstemp(prefix=".rslora-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to output directory {path!r}: {e.strerror or e}") from None
    return path


def write_atomic(path: str, write) -> None:
    """Call ``write(file)`` on a temp file next to ``path``, then rename it over ``path``."""
    d, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=d or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def write_text(path: str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _finite(obj):
    """JSON has no NaN/Inf: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(results: dict) -> str:
    return json.dumps(_finite(results), indent=1, sort_keys=True, allow_nan=False) + "\n"
