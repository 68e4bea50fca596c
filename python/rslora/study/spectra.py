"""Section 2: the two synthetic updates, their spectra and the ranks that hold 90% / 99% energy."""

from __future__ import annotations

import numpy as np

from . import synthetic
from ..spectrum import spectrum
from .config import subseed

KINDS = ("style", "facts")
_SEED_KEY = {"style": 1, "facts": 2}


def make_delta(cfg, kind: str, dim: int, dtype=np.float64, rep: int = 0):
    """The study's update of one kind: ``(delta, S)``, ``||delta||_F = 1``, seeded by cfg.seed.

    ``rep`` > 0 draws another update with the same spectrum (new singular vectors): the seeds.
    """
    seed = subseed(cfg.seed, _SEED_KEY[kind], dim, *((rep,) if rep else ()))
    if kind == "style":
        delta, _, S, _ = synthetic.style_delta(dim, dim, tau=cfg.style_tau, seed=seed, dtype=dtype,
                                               return_svd=True)
    else:
        delta, _, S, _ = synthetic.facts_delta(dim, dim, power=cfg.facts_power, seed=seed,
                                               dtype=dtype, return_svd=True)
    return delta, S


def model_text(cfg, kind: str) -> str:
    if kind == "style":
        return f"S_i ∝ exp(-i/{cfg.style_tau:g})"
    return f"S_i ∝ (1+i)^-{cfg.facts_power:g}"


def run(cfg, deltas: dict) -> dict:
    """``deltas[kind] = (delta, S_model)``; measures each spectrum with :func:`rslora.spectrum`."""
    out = {}
    for kind in KINDS:
        delta, S = deltas[kind]
        sp = spectrum(delta)  # all singular values, exact (LAPACK)
        energy = np.cumsum(S * S) / np.sum(S * S)
        out[kind] = {
            "model": model_text(cfg, kind),
            "shape": list(delta.shape),
            "frobenius_norm": float(np.sqrt(sp.total_energy)),
            "rank_90": sp.rank_for(0.90),
            "rank_99": sp.rank_for(0.99),
            "rank_90_model": int(np.searchsorted(energy, 0.90 * (1 - 1e-12)) + 1),
            "rank_99_model": int(np.searchsorted(energy, 0.99 * (1 - 1e-12)) + 1),
            "top_share": {str(r): float(energy[r - 1]) for r in (1, 4, 16, 64, 256)
                          if r <= len(S)},
            "svd_vs_model_max_abs": float(np.max(np.abs(sp.singular_values - S))),
            "singular_values": S.tolist(),
            "energy": energy.tolist(),
        }
    return out
