"""Finding the best learning rate on a sqrt(2) lattice, widening the grid at an edge.

A search holds the final losses seen at lattice points ``k`` (``lr = lr_min * sqrt(2)**k``). It
starts with ``k = 0 .. points - 1``; while the lowest loss sits at the lowest or highest point
tried, it asks for two more points beyond that edge (at most ``widen`` per side). The optimum is
then interpolated on the log grid: a parabola through ``log(loss)`` at the best point and its two
neighbours (exact when ``log(loss)`` is quadratic in ``log(lr)``); a diverged neighbour, or an
optimum still at an edge, leaves the best grid point itself.

Searches are driven in rounds (:func:`drive`) so that the runs of many searches can go to a
process pool together; the result does not depend on how the runs were scheduled.
"""

from __future__ import annotations

import math

STEP = math.sqrt(2.0)
LOSS_FLOOR = 1e-30  # log(0) is not a number; a loss this small is "reached zero"


def lattice_lr(lr_min: float, k: int) -> float:
    return float(lr_min * STEP ** k)


class Search:
    """The state of one learning-rate search (see the module docstring)."""

    def __init__(self, points: int, widen: int):
        if points < 3:
            raise ValueError(f"points must be >= 3, got {points}")
        self.points, self.widen = points, widen
        self.losses: dict = {}  # k -> final loss (math.inf: diverged)

    def pending(self) -> list:
        """The lattice points to run next; empty when the search is done."""
        if not self.losses:
            return list(range(self.points))
        ks = sorted(self.losses)
        best = self.best_k()
        if best == ks[0] and -ks[0] < self.widen:
            return [ks[0] - 1, ks[0] - 2][: self.widen + ks[0]]
        if best == ks[-1] and ks[-1] - (self.points - 1) < self.widen:
            over = ks[-1] - (self.points - 1)
            return [ks[-1] + 1, ks[-1] + 2][: self.widen - over]
        return []

    def add(self, k: int, loss) -> None:
        self.losses[k] = math.inf if loss is None or not math.isfinite(loss) else float(loss)

    def best_k(self) -> int:
        ks = sorted(self.losses)
        return min(ks, key=lambda k: (self.losses[k], k))

    def at_edge(self) -> bool:
        ks = sorted(self.losses)
        return self.best_k() in (ks[0], ks[-1])

    def optimum_k(self) -> float:
        """The interpolated best lattice position (a float between grid points)."""
        k = self.best_k()
        lo, hi = (self.losses.get(k + j) for j in (-1, 1))
        mid = self.losses[k]
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            return float(k)
        f0, f1, f2 = (math.log(max(v, LOSS_FLOOR)) for v in (lo, mid, hi))
        curv = f0 - 2 * f1 + f2
        if curv <= 0:  # flat (all three at the floor): no better guess than the grid point
            return float(k)
        return k + 0.5 * (f0 - f2) / curv

    def summary(self, lr_min: float) -> dict:
        ks = sorted(self.losses)
        kopt = self.optimum_k()
        return {"k": ks, "lr": [lattice_lr(lr_min, k) for k in ks],
                "final_loss": [None if math.isinf(self.losses[k]) else self.losses[k]
                               for k in ks],
                "best_k": self.best_k(), "best_lr": lattice_lr(lr_min, self.best_k()),
                "best_loss": self.losses[self.best_k()], "optimum_k": kopt,
                "optimum_lr": float(lr_min * STEP ** kopt), "at_edge": self.at_edge()}


def drive(searches: dict, run_many) -> None:
    """Run every search to the end. ``run_many(list of (key, k)) -> list of losses``."""
    while True:
        todo = [(key, k) for key, s in searches.items() for k in s.pending()]
        if not todo:
            return
        for (key, k), loss in zip(todo, run_many(todo)):
            searches[key].add(k, loss)
