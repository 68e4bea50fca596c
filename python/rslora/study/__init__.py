"""The study behind ``rslora study``: what rsLoRA changes, measured on synthetic updates.

Sections (one module each): :mod:`.scales` (alpha/r vs alpha/sqrt(r)), :mod:`.spectra` (style vs
facts updates), :mod:`.approximation` (error vs rank: optimum, rsvd, the write-up's scaled
version), :mod:`.dynamics` (training adapters with SGD and Adam under both rules). :func:`run`
computes the results (a JSON-ready dict); :func:`write` turns them into ``report.md``, PNG plots
and ``results.json`` (:mod:`.report`, :mod:`.plots`); :func:`run_study` does both.

The same config and seed give the same results (and byte-identical ``results.json``).
"""

from __future__ import annotations

import json
import os
import time

from . import approximation, dynamics, equivalence, lrmap, mlp, parallel, scales, spectra
from .config import StudyConfig, full_config, quick_config
from .output import RESULTS, REPORT, dumps, open_output, write_text

__all__ = ["StudyConfig", "quick_config", "full_config", "run", "write", "run_study"]

FORMAT = 2  # of results.json


def run(cfg: StudyConfig, progress: bool | None = None, workers: int | None = None, *,
        scheduler: str | None = None, client=None) -> dict:
    """Compute every number of the study. ``progress``: a tqdm bar on stderr (None: if a tty).

    Where the training runs go (at most one of): ``workers`` local processes (a Dask
    ``LocalCluster`` started and stopped here; 1: this process), the Dask cluster at
    ``scheduler`` (an address), ``client`` (a ``distributed.Client``); by default this process.
    The results do not depend on it.
    """
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    parallel.check_workers(workers, scheduler, client)
    t0 = time.perf_counter()
    n_approx = len(spectra.KINDS) * len(cfg.approx_ranks)
    units_map = lrmap.total_cost(cfg)
    per_approx = units_map / 60 / n_approx  # rough weight of one rsvd next to training
    per_mlp = units_map / 3 / mlp.total_cost(cfg)
    total = n_approx * per_approx + units_map + units_map / 3 + units_map / 20
    fmt = "{desc:<28} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
    # One BLAS thread throughout: the matrices are small (at most 1024^2; the whole SVD work is
    # a few CPU seconds) and the training runs go to worker processes instead. Measured here
    # on a busy 2-core machine, the quick study's spectra + approximation took 23 s of CPU with
    # NumPy's BLAS threads spinning and 1.1 s with one thread.
    with parallel.open_client(workers, scheduler, client) as get_client, \
            threadpool_limits(limits=1), tqdm(total=total, disable=None if progress is None
                                              else not progress, bar_format=fmt,
                                              leave=False) as bar:
        def advance(units):
            bar.update(min(units, max(bar.total - bar.n, 0)))

        bar.set_description("spectra")
        deltas = {k: spectra.make_delta(cfg, k, cfg.spectrum_dim) for k in spectra.KINDS}
        res_spectra = spectra.run(cfg, deltas)
        bar.set_description("approximation vs rank")
        res_approx = approximation.run(cfg, deltas, lambda u: advance(u * per_approx))
        del deltas
        bar.set_description("learning-rate map (toy)")
        c = get_client()
        runner, where = parallel.Runner(c, advance), parallel.describe(c, workers)
        S = spectra.make_delta(cfg, lrmap.KIND, cfg.train_dim)[1]
        res_map = lrmap.run(cfg, runner, S)
        bar.set_description("nonlinear fine-tune")
        runner.advance = lambda u: advance(u * per_mlp)
        res_mlp = mlp.run(cfg, runner)
        bar.set_description("probes, equivalence")
        res_dyn = _probes_and_equivalence(cfg, res_map)
        bar.update(bar.total - bar.n)
    return {
        "format": FORMAT,
        "config": cfg.as_dict(),
        "scale_table": scales.run(cfg),
        "spectra": res_spectra,
        "approximation": res_approx,
        "lr_map": res_map,
        "equivalence": res_dyn.pop("equivalence"),
        "dynamics": res_dyn,
        "mlp": res_mlp,
        # wall time is not a result: kept out of results.json so equal seeds give equal bytes
        "_wall_s": time.perf_counter() - t0,
        "_where": where,
    }


def _probes_and_equivalence(cfg, res_map) -> dict:
    """The probes at initialisation and the equivalence check (seed 0, the lr tuned at
    ranks[0]: the rules share it, and under both optimizers it stays stable at larger ranks)."""
    prob = dynamics.Problem(cfg, lrmap.KIND, spectra.make_delta(cfg, lrmap.KIND,
                                                                cfg.train_dim)[0])
    tuned = {o: res_map["cells"][f"{o}/rslora"]["tuned_at_r0"]["lr"][0]
             for o in dynamics.OPTIMIZERS}
    probes = {}
    for kind in spectra.KINDS:
        p = prob if kind == lrmap.KIND else dynamics.Problem(
            cfg, kind, spectra.make_delta(cfg, kind, cfg.train_dim)[0])
        probes[kind] = p
    return {"grad_norm": {k: dynamics.grad_norm_probe(cfg, p) for k, p in probes.items()},
            "one_step": {k: dynamics.one_step_probe(cfg, p, tuned) for k, p in probes.items()},
            "equivalence": equivalence.run(cfg, tuned)}


def write(results: dict, out_dir: str) -> list:
    """Write report.md, results.json and the plots into ``out_dir`` (each file atomically)."""
    from . import plots, report

    run_info = {k[1:]: v for k, v in results.items() if k.startswith("_")}
    text = dumps({k: v for k, v in results.items() if not k.startswith("_")})
    results = json.loads(text)  # render from exactly what results.json holds
    names = plots.write_all(results, out_dir)
    write_text(os.path.join(out_dir, RESULTS), text)
    write_text(os.path.join(out_dir, REPORT), report.render(results, run_info))
    return [REPORT, RESULTS] + names


def run_study(cfg: StudyConfig, out_dir="rslora-study", *, force: bool = False,
              progress: bool | None = None, workers: int | None = None,
              scheduler: str | None = None, client=None) -> dict:
    """Check ``out_dir``, run the study, write its files; returns the results dict.
    ``workers``, ``scheduler``, ``client``: where the training runs go (:func:`run`).

    The files are written into a temporary sibling of ``out_dir`` that replaces it only when all
    are written: a crash leaves the previous output as it was."""
    parallel.check_workers(workers, scheduler, client)  # before the output folder is touched
    with open_output(out_dir, force) as tmp:
        results = run(cfg, progress, workers, scheduler=scheduler, client=client)
        write(results, str(tmp))
    return results
