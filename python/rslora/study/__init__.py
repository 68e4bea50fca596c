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

from . import approximation, dynamics, scales, spectra
from .config import StudyConfig, full_config, quick_config
from .output import RESULTS, REPORT, dumps, open_output, write_text

__all__ = ["StudyConfig", "quick_config", "full_config", "run", "write", "run_study"]

FORMAT = 1  # of results.json


def run(cfg: StudyConfig, progress: bool | None = None) -> dict:
    """Compute every number of the study. ``progress``: a tqdm bar on stderr (None: if a tty)."""
    from tqdm import tqdm

    n_approx = len(spectra.KINDS) * len(cfg.approx_ranks)
    units_train = dynamics.total_cost(cfg)
    per_approx = units_train / 40 / n_approx  # rough weight of one rsvd next to training
    total = n_approx * per_approx + units_train
    fmt = "{desc:<28} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
    with tqdm(total=total, disable=None if progress is None else not progress,
              bar_format=fmt, leave=False) as bar:
        def advance(units):
            bar.update(units)

        bar.set_description("spectra")
        deltas = {k: spectra.make_delta(cfg, k, cfg.spectrum_dim) for k in spectra.KINDS}
        res_spectra = spectra.run(cfg, deltas)
        bar.set_description("approximation vs rank")
        res_approx = approximation.run(cfg, deltas, lambda u: advance(u * per_approx))
        del deltas
        bar.set_description("training dynamics")
        train = {k: spectra.make_delta(cfg, k, cfg.train_dim) for k in spectra.KINDS}
        res_dyn = dynamics.run(cfg, train, advance)
    return {
        "format": FORMAT,
        "config": cfg.as_dict(),
        "scale_table": scales.run(cfg),
        "spectra": res_spectra,
        "approximation": res_approx,
        "dynamics": res_dyn,
    }


def write(results: dict, out_dir: str) -> list:
    """Write report.md, results.json and the plots into ``out_dir`` (each file atomically)."""
    from . import plots, report

    text = dumps(results)
    results = json.loads(text)  # render from exactly what results.json holds
    names = plots.write_all(results, out_dir)
    write_text(os.path.join(out_dir, RESULTS), text)
    write_text(os.path.join(out_dir, REPORT), report.render(results))
    return [REPORT, RESULTS] + names


def run_study(cfg: StudyConfig, out_dir="rslora-study", *, force: bool = False,
              progress: bool | None = None) -> dict:
    """Check ``out_dir``, run the study, write its files; returns the results dict.

    The files are written into a temporary sibling of ``out_dir`` that replaces it only when all
    are written: a crash leaves the previous output as it was."""
    with open_output(out_dir, force) as tmp:
        results = run(cfg, progress)
        write(results, str(tmp))
    return results
