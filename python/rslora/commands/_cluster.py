"""Where a command's independent tasks run: the client ``--workers`` / ``--scheduler`` ask for."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..errors import UserError


@contextlib.contextmanager
def client_for(args) -> Iterator[Any]:
    """A ``distributed.Client`` for ``--workers N`` or ``--scheduler ADDRESS`` (stopped or left
    running on exit, see :func:`rslora.dask.cluster.cluster`), or None: run in this process.
    Dask is imported only when one of them is given."""
    workers, scheduler = getattr(args, "workers", None), getattr(args, "scheduler", None)
    if workers is None and scheduler is None:
        yield None
        return
    from ..dask.cluster import check_cluster_args, cluster

    try:
        check_cluster_args(workers, scheduler)
    except (ValueError, TypeError) as e:  # name the flag, not the Python argument
        raise UserError("--" + str(e)) from None
    with cluster(workers=workers, scheduler=scheduler) as client:
        yield client
