"""The output folder: checked before any work, written whole (see :mod:`rslora._files`)."""

from __future__ import annotations

import json
import math
import os

from .._files import OutputDir, write_file
from ..errors import UserError

REPORT = "report.md"
RESULTS = "results.json"


def open_output(out_dir, force: bool):
    """The study's output folder, checked before any work (see :mod:`rslora._files`): written in a
    temporary sibling and put in place whole when the study is done.

    Raises :class:`rslora.errors.UserError` (one line) for a path that is a file, a folder that
    cannot be created or written, or an existing folder without ``force`` (or with files rslora
    did not write).
    """
    path = os.fspath(out_dir)
    try:
        return OutputDir(path, force)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None


def write_atomic(path: str, write) -> None:
    """Call ``write(file)`` on a temp file next to ``path``, then rename it over ``path``."""
    write_file(path, write)


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
