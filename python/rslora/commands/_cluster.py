"""Where a command's independent tasks run: the client ``--workers`` / ``--scheduler`` ask for."""

from __future__ import annotations

import contextlib
from typing import Any

from ..errors import UserError


def client_for(args) -> contextlib.AbstractContextManager[Any]:
    """A context giving a ``distributed.Client`` for ``--workers N`` or ``--scheduler ADDRESS``
    (stopped, or left running, on exit: :func:`rslora.dask.cluster.cluster`), or None: run in
    this process. The flags are checked now (call it before any work); Dask is imported only
    when one of them is given, the cluster started only on entering the context."""
    workers, scheduler = getattr(args, "workers", None), getattr(args, "scheduler", None)
    if workers is None and scheduler is None:
        return contextlib.nullcontext(None)
    from ..dask.cluster import check_cluster_args, cluster

    try:
        check_cluster_args(workers, scheduler)
    except (ValueError, TypeError) as e:  # name the flag, not the Python argument
        raise UserError("--" + str(e)) from None
    return cluster(workers=workers, scheduler=scheduler)
