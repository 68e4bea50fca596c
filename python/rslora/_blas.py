"""Bind the compiled core to the BLAS/LAPACK that NumPy already loaded.

One BLAS thread pool per process: a second OpenBLAS called alternately with NumPy's doubles the
time of both on a small machine (the idle threads of one pool spin against the other). So the
core is bound at import to the very library NumPy uses, found with threadpoolctl; the bundled
``scipy-openblas32`` is the fallback where NumPy's library cannot serve (no CBLAS/LAPACK symbols).
``RSLORA_BLAS`` overrides the choice: a path to a library, or ``bundled``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _core

_source = {"kind": None, "reason": ""}


def _numpy_blas_candidates() -> list[str]:
    """Paths of the BLAS libraries loaded in the process, NumPy's own first."""
    from threadpoolctl import threadpool_info

    np_dir = os.path.dirname(os.path.dirname(np.__file__))
    libs = [i for i in threadpool_info() if i.get("user_api") == "blas" and i.get("filepath")]
    try:
        wanted = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except Exception:  # noqa: BLE001 - old NumPy: no dict mode
        wanted = ""

    def rank(info: dict[str, Any]) -> int:
        path = info["filepath"]
        if path.startswith(os.path.join(np_dir, "numpy")):  # numpy.libs/ of a wheel
            return 0
        if wanted and wanted.replace("-", "_").split("_")[-1] in os.path.basename(path):
            return 1
        return 2

    return [i["filepath"] for i in sorted(libs, key=rank)]


def _bundled_path() -> str:
    import scipy_openblas32

    d = scipy_openblas32.get_lib_dir()
    name = scipy_openblas32.get_library(fullname=True)
    return str(os.path.join(d, name))


def bind() -> None:
    if _core.blas_loaded():
        return
    override = os.environ.get("RSLORA_BLAS", "")
    if override and override != "bundled":
        _core.blas_load(override)
        _source.update(kind="RSLORA_BLAS", reason=f"RSLORA_BLAS={override}")
        return
    errors = []
    if not override:
        for path in _numpy_blas_candidates():
            try:
                _core.blas_load(path)
            except RuntimeError as e:
                errors.append(str(e))
                continue
            _source.update(kind="numpy", reason="the BLAS NumPy loaded (one shared thread pool)")
            return
    _core.blas_load(_bundled_path())
    why = "RSLORA_BLAS=bundled" if override else (
        "NumPy's BLAS could not be bound: " + ("; ".join(errors) or "none found"))
    _source.update(kind="bundled", reason=f"bundled scipy-openblas32 ({why})")


def config() -> dict[str, Any]:
    info = dict(_core.blas_info())
    info["source"] = _source["kind"]
    info["reason"] = _source["reason"]
    return info
