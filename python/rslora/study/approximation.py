"""Section 3: the error of a rank-r adapter extracted from each update, three ways.

* the Eckart–Young optimum ``sqrt(sum(S[r:]**2)) / ||S||``, known from the model's spectrum;
* rslora's factors: ``A, B = lora_from_delta(delta, r, alpha, rule)`` (randomized SVD), error of
  ``s * B @ A`` (s = alpha/sqrt(r) or alpha/r: the scale sits inside the factors, so the rule
  cannot change the error);
* the popular write-up's number: the rank-r SVD approximation ``M_r`` multiplied once more by
  ``gamma = alpha / sqrt(r)``. Since ``delta - M_r`` is orthogonal to ``M_r``,
  ``||delta - gamma M_r||^2 = ||delta - M_r||^2 + (1 - gamma)^2 ||M_r||^2``: the optimum plus a
  term that only measures how far gamma is from 1.
"""

from __future__ import annotations

import math

import numpy as np

from ..scaling import scale
from ..linear import unmerge
from ..spectrum import lora_from_delta
from .config import int_seed
from .spectra import KINDS


def _rel_error(delta: np.ndarray, A, B, s: float, norm: float) -> float:
    E = delta.copy()
    unmerge(E, A, B, scale=s)  # delta - s B A, in place
    return float(np.linalg.norm(E)) / norm


def run(cfg, deltas: dict, advance=lambda units: None) -> dict:
    out = {}
    a = cfg.approx_alpha
    for kind in KINDS:
        delta, S = deltas[kind]
        norm = float(np.linalg.norm(delta))
        tail = np.sqrt(np.cumsum((S * S)[::-1])[::-1]) / math.sqrt(float(np.sum(S * S)))
        rows = []
        for r in cfg.approx_ranks:
            seed = int_seed(cfg.seed, 3, r)
            A, B = lora_from_delta(delta, r, alpha=a, rule="rslora", seed=seed)
            A_std, B_std = lora_from_delta(delta, r, alpha=a, rule="standard", seed=seed)
            s_rs, s_std = scale(a, r, "rslora"), scale(a, r, "standard")
            err_rs = _rel_error(delta, A, B, s_rs, norm)
            err_std = _rel_error(delta, A_std, B_std, s_std, norm)
            # The write-up: the rank-r SVD approximation M_r (= s B A, whatever the rule) is
            # multiplied once more by gamma = alpha / sqrt(r).
            gamma = s_rs
            err_w = _rel_error(delta, A, B, gamma * s_rs, norm)
            kept = math.sqrt(max(1.0 - err_rs ** 2, 0.0))  # ||M_r|| / ||delta|| (M_r _|_ delta - M_r)
            rows.append({
                "r": r,
                "optimum": float(tail[r]) if r < len(S) else 0.0,
                "rsvd_rslora": err_rs,
                "rsvd_standard": err_std,
                "writeup_scaled": err_w,
                "writeup_gamma": gamma,
                "writeup_predicted": math.sqrt(err_rs ** 2 + (1 - gamma) ** 2 * kept ** 2),
            })
            advance(1)
        out[kind] = rows
    return out
