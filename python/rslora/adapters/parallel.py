"""The per-layer work of extract, merge and resize: here, or as tasks on a Dask cluster.

Each tool plans its work on the client (names, shapes, layouts: every check before any work),
then applies one function to independent items (one layer each, picklable: file paths, tensor
names, options) and assembles the results in plan order, so the output does not depend on the
order tasks finish in. :func:`run_items` runs the function in a loop here (``client=None``, the
one-process code path), or on the cluster through :func:`rslora.dask.cluster.map_batched`, which
batches small layers, bounds the tasks in flight and limits BLAS to each worker's threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["run_items", "BATCH_WEIGHT"]

#: At most this much weight (elements read: a 2048 x 2048 layer is 4,194,304) in one task, so
#: a worker holds a few layers at a time whatever the model size, and large layers spread over
#: the workers one per task.
BATCH_WEIGHT = 1 << 22


def run_items(client: Any, fn: Callable[[Any], Any], items: Sequence[Any], *,
              weights: Sequence[float] | None = None,
              name: Callable[[Any], str] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(i, fn(items[i]))`` for every item: in order here when ``client`` is None, else in
    the order the cluster finishes them (tasks of at most :data:`BATCH_WEIGHT` by ``weights``).

    ``fn`` must be picklable (a module-level function or an instance of a module-level class)
    when a client is given. ``name(item)`` names a task in Dask's dashboard and logs.
    """
    if client is None:
        for i, item in enumerate(items):
            yield i, fn(item)
        return
    from ..dask.cluster import map_batched

    yield from map_batched(client, fn, items, weights=weights, key=name, max_weight=BATCH_WEIGHT)
