"""The per-layer work of extract, merge and resize: here, or as tasks on a Dask cluster.

Each tool plans its work on the client (names, shapes, layouts: every check before any work),
then applies one function to independent items (one layer each, picklable: file paths, tensor
names, options) and assembles the results in plan order, so the output does not depend on the
order tasks finish in. :func:`run_items` runs the function in a loop here (``client=None``, the
one-process code path), or on the cluster through :func:`rslora.dask.cluster.map_unordered`:
Dask schedules, retries the tasks of workers that die, and moves the results; this module only
batches small layers (a task costs about a millisecond of scheduling and transfer, more than a
small layer's SVD) and bounds the tasks in flight, so the client holds a few results at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["run_items", "BATCH_WEIGHT"]

#: A task takes consecutive items until their weights (elements read: a 2048 x 2048 layer is
#: 4,194,304) reach this, so small layers share a task. Never more than a fair share of all
#: items per worker thread, so every worker gets work.
BATCH_WEIGHT = 1 << 22

#: Tasks in flight per worker thread: one running, one queued, so no worker waits for the
#: client, and the client holds at most this many results per thread.
IN_FLIGHT_PER_THREAD = 2


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
    from ..dask.cluster import map_unordered, worker_threads

    threads = max(1, worker_threads(client))
    spans = _batches([1.0] * len(items) if weights is None else list(weights), threads)
    batches = [list(items[s:e]) for s, e in spans]
    key = None if name is None else (lambda b: f"{name(b[0])}+{len(b) - 1}")
    for b, results in map_unordered(client, _Batch(fn), batches,
                                     max_in_flight=IN_FLIGHT_PER_THREAD * threads, key=key):
        for j, result in enumerate(results):
            yield spans[b][0] + j, result


def _batches(weights: list, threads: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` runs of consecutive items whose weights sum to about the target."""
    total = sum(weights)
    target = min(BATCH_WEIGHT, math.ceil(total / (2 * threads))) if total else 1
    spans, start, acc = [], 0, 0.0
    for i, w in enumerate(weights):
        acc += w
        if acc >= target:
            spans.append((start, i + 1))
            start, acc = i + 1, 0.0
    if start < len(weights):
        spans.append((start, len(weights)))
    return spans


class _Batch:
    """``fn`` over a list of items, in one task."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, items: list) -> list:
        return [self.fn(item) for item in items]
