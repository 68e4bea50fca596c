"""rslora on Dask: randomized SVD of dask arrays too tall for one machine (:func:`rsvd`), and
the cluster the command line's ``--workers`` / ``--scheduler`` open (:mod:`.cluster`).

Importing :mod:`rslora` does not import Dask; ``import rslora.dask`` does (``pip install
"rslora[dask]"``).
"""

from __future__ import annotations

from .rsvd import rsvd

__all__ = ["rsvd"]
