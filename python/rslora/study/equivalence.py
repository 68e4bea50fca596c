"""The rule switch is a learning-rate multiplier on B (shown by running both).

Write the adapter as ``s B A`` and let ``C = s B``. The gradients are ``dL/dA = C^T G`` and
``dL/dB = s G_B`` with ``G``, ``G_B`` functions of ``C`` and ``A`` only (``G = dL/d(sBA)``).
So in the variables ``(A, C)``:

* SGD: ``A -= lr C^T G`` (no s), ``C -= lr s^2 G_B``: the scale only multiplies C's learning
  rate, by ``s^2``;
* Adam (no epsilon): each step of B is ``lr m/sqrt(v)``, unchanged when the gradient is scaled,
  so ``C`` moves by ``lr s (...)``: C's learning rate is multiplied by ``s``. Epsilon breaks
  this: it acts like ``eps / s`` on C.

With B = 0 at initialisation C starts at 0 under both rules, and A starts equal. Hence rsLoRA
(``s = alpha/sqrt(r)``) at rank r is the standard rule (``s0 = alpha0/r``, equal at r0) with B's
learning rate multiplied by ``(s/s0)^2 = r/r0`` under SGD and ``s/s0 = sqrt(r/r0)`` under Adam.
The runs below are in float64, so the differences are rounding.
"""

from __future__ import annotations

import numpy as np

from . import dynamics, spectra


def _product(run, s):
    return s * (run["B"].astype(np.float64) @ run["A"].astype(np.float64))


def compare(cfg, prob, r: int, optimizer: str, lr: float, eps: float) -> dict:
    s_rs = dynamics.rule_scale(cfg, "rslora", r)
    s_std = dynamics.rule_scale(cfg, "standard", r)
    mult = (s_rs / s_std) ** (2 if optimizer == "sgd" else 1)
    a = dynamics.train(cfg, prob, r, "rslora", optimizer, lr, eps=eps, return_adapter=True)
    b = dynamics.train(cfg, prob, r, "standard", optimizer, lr, lr_b=lr * mult, eps=eps,
                       return_adapter=True)
    pa, pb = _product(a, s_rs), _product(b, s_std)
    la, lb = np.asarray(a["loss"], dtype=float), np.asarray(b["loss"], dtype=float)
    r0 = cfg.ranks[0]
    return {"rank": r, "optimizer": optimizer, "lr": lr, "eps": eps, "multiplier": mult,
            "multiplier_theory": (r / r0) if optimizer == "sgd" else (r / r0) ** 0.5,
            "product_max_rel_diff": float(np.max(np.abs(pa - pb)) / np.max(np.abs(pa))),
            "loss_max_rel_diff": float(np.max(np.abs(la - lb) / np.abs(la))),
            "final_loss": a["final_loss"],
            # the same lr without the multiplier: how different the rules really are
            "final_loss_standard_same_lr": dynamics.train(cfg, prob, r, "standard", optimizer,
                                                          lr, eps=eps)["final_loss"]}


def run(cfg, lrs: dict) -> dict:
    """``lrs[optimizer]``: a learning rate that trains at every rank (the one tuned at r0).

    Checked at ``3 * ranks[0]`` and ``ranks[-1]``, with Adam's epsilon at 0, then once with it.
    """
    delta, _ = spectra.make_delta(cfg, "facts", cfg.train_dim)
    prob = dynamics.Problem(cfg, "facts", delta, dtype=np.float64)
    # Where both scales are powers of two (r0 = 4, r = 64 in the full config) the two runs do
    # bit-identical arithmetic; 3 * ranks[0] always has an irrational multiplier.
    rows = []
    for r in sorted({min(3 * cfg.ranks[0], cfg.train_dim), cfg.ranks[-1]}):
        rows += [compare(cfg, prob, r, "sgd", lrs["sgd"], 0.0),
                 compare(cfg, prob, r, "adam", lrs["adam"], 0.0)]
    rows.append(compare(cfg, prob, cfg.ranks[-1], "adam", lrs["adam"], cfg.adam_eps))
    exact = [x for x in rows if x["eps"] == 0.0]
    return {"rows": rows, "max_rel_diff": max(max(x["product_max_rel_diff"],
                                                  x["loss_max_rel_diff"]) for x in exact)}
