"""rslora on Dask: truncated SVD of dask arrays too tall for one machine (:func:`rsvd` at a
fixed rank, :func:`rsvd_tol` to a tolerance), and
the cluster the command line's ``--workers`` / ``--scheduler`` open (:mod:`.cluster`).

Importing :mod:`rslora` does not import Dask; ``import rslora.dask`` does (``pip install
"rslora[dask]"``).
"""

from __future__ import annotations

from .rsvd import rsvd
from .rsvd_tol import rsvd_tol

__all__ = ["rsvd", "rsvd_tol"]
