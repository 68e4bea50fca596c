"""Section 4: the learning-rate map of the linear toy (facts target), over ranks and seeds.

For each optimizer (SGD, Adam), rule and seed, every rank gets its own learning-rate search
(:mod:`.lrsearch`). From the map come

* the optimal learning rate per rank and the log-log slope of lr* vs r over the ranks below
  ``train_dim`` (r = train_dim is reported apart: there the target is exactly representable and
  the loss can go to 0, so its optimum measures only the step budget);
* the two comparisons: every rule at the one lr that is best at ``ranks[0]`` (where both rules
  are the same run), and every rule at its own best lr per rank; both next to Eckart–Young.

Runs are described by plain tuples, run by :class:`.parallel.Runner`, and seeded by their
description alone, so the map is the same for any number of processes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import dynamics, spectra
from .lrsearch import Search, drive, lattice_lr

KIND = "facts"  # long-tailed: below r = d the Eckart-Young floor stays well above zero
_PROBLEMS: dict = {}  # per process: (cfg, rep) -> Problem


def lr_min(cfg, optimizer: str) -> float:
    return cfg.sgd_lr_min if optimizer == "sgd" else cfg.adam_lr_min


def problem(cfg, rep: int) -> dynamics.Problem:
    key = (cfg, rep)
    if key not in _PROBLEMS:
        if any(c != cfg for c, _ in _PROBLEMS):
            _PROBLEMS.clear()  # one config at a time, all its seeds (a worker gets any of them)
        delta, _ = spectra.make_delta(cfg, KIND, cfg.train_dim, rep=rep)
        _PROBLEMS[key] = dynamics.Problem(cfg, KIND, delta, rep=rep)
    return _PROBLEMS[key]


def job(cfg, rep: int, r: int, rule: str, optimizer: str, k: int) -> tuple:
    """A run's description; at ranks[0] both rules have the same scale, so one run serves both."""
    return (rep, r, "rslora" if r == cfg.ranks[0] else rule, optimizer, k)


def run_job(cfg, j: tuple) -> dict:
    rep, r, rule, optimizer, k = j
    run = dynamics.train(cfg, problem(cfg, rep), r, rule, optimizer,
                         lattice_lr(lr_min(cfg, optimizer), k))
    return {"final_loss": run["final_loss"], "loss": run["loss"], "steps": run["steps"]}


def _slope(ranks, lrs) -> float:
    return float(np.polyfit(np.log(ranks), np.log(lrs), 1)[0])


def _spread(values) -> dict:
    v = [x for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "min": min(v) if v else None,
            "max": max(v) if v else None, "values": list(values)}


class _Memo:
    """Runs each distinct job once; ``runner`` does the work."""

    def __init__(self, cfg, runner):
        self.cfg, self.runner, self.done = cfg, runner, {}

    def ensure(self, jobs) -> None:
        todo = sorted({j for j in jobs if j not in self.done})
        cost = lambda j: dynamics.run_cost(self.cfg, j[1])  # noqa: E731
        for j, res in zip(todo, self.runner.map(run_job, self.cfg, todo, cost)):
            self.done[j] = res

    def final(self, j):
        return self.done[j]["final_loss"]


def cell(per: list, slopes: list, fixed: list, tuned_lrs: list) -> dict:
    """One optimizer x rule cell of a learning-rate map (the linear toy's or the MLP's):
    ``per[rep][i]`` the search summaries at rank i, ``fixed[rep][i]`` the final losses at the lr
    tuned at the smallest rank (``tuned_lrs[rep]``)."""
    n = len(per[0])
    return {
        "searches": per,
        "optimum_lr": [[p[i]["optimum_lr"] for p in per] for i in range(n)],
        "any_at_edge": any(x["at_edge"] for p in per for x in p),
        "slope": _spread(slopes),
        "tuned_at_r0": {"lr": tuned_lrs,
                        "final_loss": [_spread([f[i] for f in fixed]) for i in range(n)]},
        "own_best": {"final_loss": [_spread([p[i]["best_loss"] for p in per]) for i in range(n)]},
    }


def total_cost(cfg) -> float:
    """Rough work units of the map (its base grids), for the progress bar."""
    per_seed = sum(dynamics.run_cost(cfg, r) * (1 if r == cfg.ranks[0] else 2)
                   for r in cfg.map_ranks)
    return per_seed * len(dynamics.OPTIMIZERS) * cfg.seeds * cfg.lr_points * 1.25


def run(cfg, runner, S: np.ndarray) -> dict:
    """The map, slopes and comparisons. ``S``: the facts spectrum (for Eckart–Young)."""
    memo = _Memo(cfg, runner)
    reps, ranks = range(cfg.seeds), cfg.map_ranks
    searches = {(o, rule, rep, r): Search(cfg.lr_points, cfg.lr_widen)
                for o in dynamics.OPTIMIZERS for rule in dynamics.RULES for rep in reps
                for r in ranks}

    def run_many(todo):
        jobs = [job(cfg, rep, r, rule, o, k) for (o, rule, rep, r), k in todo]
        memo.ensure(jobs)
        return [memo.final(j) for j in jobs]

    drive(searches, run_many)
    # One lr for all ranks: the best at ranks[0] (the same runs for both rules).
    r0 = cfg.ranks[0]
    k0 = {(o, rep): searches[o, "rslora", rep, r0].best_k() for o in dynamics.OPTIMIZERS
          for rep in reps}
    memo.ensure([job(cfg, rep, r, rule, o, k0[o, rep]) for o in dynamics.OPTIMIZERS
                 for rule in dynamics.RULES for rep in reps for r in ranks])
    tail = np.cumsum((S * S)[::-1])[::-1] / float(np.sum(S * S))
    out: dict[str, Any] = {"target": KIND, "ranks": list(ranks), "fit_ranks": list(cfg.ranks),
           "eckart_young": [float(tail[r]) if r < len(S) else 0.0 for r in ranks],
           "cells": {}}
    for o in dynamics.OPTIMIZERS:
        for rule in dynamics.RULES:
            per = [[searches[o, rule, rep, r].summary(lr_min(cfg, o)) for r in ranks]
                   for rep in reps]
            fit = [i for i, r in enumerate(ranks) if r in cfg.ranks]
            slopes = [_slope([ranks[i] for i in fit], [p[i]["optimum_lr"] for i in fit])
                      for p in per]
            fixed = [[memo.final(job(cfg, rep, r, rule, o, k0[o, rep])) for r in ranks]
                     for rep in reps]
            best_curves = [memo.done[job(cfg, 0, r, rule, o, per[0][i]["best_k"])]
                           for i, r in enumerate(ranks)]
            out["cells"][f"{o}/{rule}"] = {
                **cell(per, slopes, fixed, [lattice_lr(lr_min(cfg, o), k0[o, rep])
                                            for rep in reps]),
                "curves_seed0": [{"rank": r, "lr": per[0][i]["best_lr"], "steps": c["steps"],
                                  "loss": c["loss"]} for (i, r), c in
                                 zip(enumerate(ranks), best_curves)],
            }
    return out
