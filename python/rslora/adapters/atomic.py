"""Output folders written whole or not at all: a temporary sibling folder renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def check_output_dir(out_dir, force: bool) -> Path:
    """``out_dir`` as a Path; FileExistsError if it exists and ``force`` is false."""
    out = Path(os.fspath(out_dir))
    if out.exists() or out.is_symlink():
        if not force:
            raise FileExistsError(f"{out} already exists; use --force (force=True) to replace it")
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; remove it first")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir, force: bool = False):
    """Yield a temporary folder next to ``out_dir``; on success it is renamed to ``out_dir``.

    On any exception (including KeyboardInterrupt) the temporary folder is removed and
    ``out_dir`` is left as it was. With ``force``, an existing ``out_dir`` is replaced only
    after the new one is complete.
    """
    out = check_output_dir(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the usual mode
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
