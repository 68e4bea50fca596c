"""rslora on Dask: randomized SVD of dask arrays too tall for one machine.

Importing :mod:`rslora` does not import Dask; ``import rslora.dask`` does (``pip install
"rslora[dask]"``).
"""

from __future__ import annotations

from .rsvd import rsvd

__all__ = ["rsvd"]
