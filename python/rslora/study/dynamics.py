"""Section 4: training LoRA adapters on a synthetic target, standard vs rsLoRA scaling.

The task: learn ``delta`` (``||delta||_F = 1``, float32) from batches ``x ~ N(0, I)``,
``y = x @ delta.T``, with a PEFT-initialised adapter (``A`` Kaiming-uniform, ``B = 0``) and the
loss ``L = 1/(2n) sum ||s B A x - delta x||^2``. A frozen base weight ``W0`` cancels from the
residual, so the forward runs with the base ``-delta``: ``lora_linear(x, -delta, A, B)`` is the
residual itself and its gradients are those of the task with any ``W0``. Every step uses rslora's
fused kernels: ``lora_linear(..., return_xa=True)`` forward, ``lora_linear_backward(...,
need=("A", "B"), xa=xa)`` backward.

For these inputs the population loss is ``||s B A - delta||_F^2 / ||delta||_F^2`` exactly; that is
what the curves show (formed with ``rslora.merge`` at evaluation steps), not a noisy batch loss.
All runs of one target and seed see the same batches and start from nested ``A`` (rank r uses
the first r rows of one draw), so ranks, rules and learning rates are compared on paired data.

This module holds one run (:func:`train`) and the probes at initialisation; the learning-rate
map over ranks and seeds is :mod:`.lrmap`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import synthetic
from ..scaling import scale
from ..backward import lora_linear_backward
from ..linear import lora_linear, merge
from .config import subseed
from .spectra import KINDS

RULES = ("standard", "rslora")
OPTIMIZERS = ("sgd", "adam")
DIVERGED = 1e3  # a population loss this far above the start (1.0) means the run blew up


def rule_scale(cfg, rule: str, r: int) -> float:
    """gamma_r: alpha/sqrt(r) for rsLoRA; alpha_standard/r (equal at ranks[0]) for standard."""
    if rule == "rslora":
        return scale(cfg.alpha, r, "rslora")
    return scale(cfg.alpha_standard, r, "standard")


class Problem:
    """One training target: ``delta`` in float32, its negation (the base weight), its norm."""

    def __init__(self, cfg, kind: str, delta: np.ndarray, rep: int = 0, dtype=np.float32):
        self.kind, self.rep = kind, rep
        self.delta = np.ascontiguousarray(delta, dtype=dtype)
        self.neg = -self.delta
        self.fro2 = float(np.einsum("ij,ij->", self.delta, self.delta, dtype=np.float64))
        d = self.delta.shape[1]
        # One A draw per target; a rank-r run starts from its first r rows.
        reps = (rep,) if rep else ()  # rep 0 keeps the streams of the single-seed study
        self.A_init, _ = synthetic.lora_init(self.delta.shape[0], d,
                                             max(cfg.probe_ranks + cfg.map_ranks
                                                 + (min(3 * cfg.ranks[0], d),)),  # equivalence
                                             seed=subseed(cfg.seed, 4, KINDS.index(kind), *reps),
                                             dtype=dtype)
        self.batch_seed = subseed(cfg.seed, 5, KINDS.index(kind), *reps)

    def loss(self, A, B, s) -> float:
        """Population loss ``||s B A - delta||^2 / ||delta||^2`` (E[||residual||^2] for x ~ N(0,I))."""
        E = self.neg.copy()
        merge(E, A, B, scale=s)
        return float(np.einsum("ij,ij->", E, E, dtype=np.float64)) / self.fro2


class _SGD:
    def __init__(self, lrs, params, cfg, eps):
        self.lrs = lrs

    def step(self, params, grads):
        for p, g, lr in zip(params, grads, self.lrs):
            g *= lr
            p -= g


class _Adam:
    """Adam with bias correction (PyTorch's formula), one learning rate per parameter."""

    def __init__(self, lrs, params, cfg, eps):
        self.lrs, (self.b1, self.b2), self.eps = lrs, cfg.adam_betas, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, g, m, v, lr in zip(params, grads, self.m, self.v, self.lrs):
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            denom = np.sqrt(v / c2)
            denom += self.eps
            if self.eps == 0:  # a zero gradient history (A's, on step 1) moves nothing
                p -= (lr / c1) * np.divide(m, denom, out=np.zeros_like(m), where=denom > 0)
            else:
                p -= (lr / c1) * m / denom


_OPT: dict[str, Any] = {"sgd": _SGD, "adam": _Adam}


def eval_steps(cfg) -> list:
    return sorted({int(round(t)) for t in np.linspace(0, cfg.steps, cfg.evals + 1)})


def run_cost(cfg, r: int) -> float:
    """Work units of one run (FLOPs / 1e6 of its GEMMs), for the progress bar."""
    n, d = cfg.batch, cfg.train_dim
    return cfg.steps * n * d * (2 * d + 10 * r) / 1e6


def train(cfg, problem: Problem, r: int, rule: str, optimizer: str, lr: float, *,
          lr_b: float | None = None, eps: float | None = None, return_adapter: bool = False,
          advance=lambda units: None) -> dict:
    """Train one adapter; returns its loss curve (population loss at :func:`eval_steps`).

    ``lr_b``: B's own learning rate (default ``lr``); ``eps``: Adam's (default ``cfg.adam_eps``).
    """
    s = rule_scale(cfg, rule, r)
    dt = problem.delta.dtype
    A = problem.A_init[:r].copy()
    B = np.zeros((problem.delta.shape[0], r), dtype=dt)
    opt = _OPT[optimizer]((lr, lr if lr_b is None else lr_b), (A, B), cfg,
                          cfg.adam_eps if eps is None else eps)
    rng = np.random.default_rng(problem.batch_seed)
    n, d = cfg.batch, problem.delta.shape[1]
    evals = eval_steps(cfg)
    per_step = run_cost(cfg, r) / cfg.steps
    steps: list[int] = []
    losses: list[float] = []
    diverged_at: int | None = None
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is detected, not warned
        for t in range(cfg.steps + 1):
            if t == evals[len(steps)]:
                loss = problem.loss(A, B, s)
                steps.append(t)
                losses.append(loss)
                if not (math.isfinite(loss) and loss < DIVERGED):
                    diverged_at = t
                    break
            if t == cfg.steps:
                break
            x = rng.standard_normal((n, d), dtype=dt)
            res, xa = lora_linear(x, problem.neg, A, B, scale=s, return_xa=True)
            res *= dt.type(1.0 / n)  # dL/dy for L = 1/(2n) sum ||residual||^2
            _, dA, dB = lora_linear_backward(res, x, problem.neg, A, B, scale=s,
                                             need=("A", "B"), xa=xa)
            opt.step((A, B), (dA, dB))
            advance(per_step)
    if diverged_at is not None:
        advance(per_step * (cfg.steps - diverged_at))
    final = losses[-1]
    out = {"rank": r, "rule": rule, "optimizer": optimizer, "lr": lr, "scale": s,
           "steps": steps, "loss": [x if math.isfinite(x) else None for x in losses],
           "final_loss": final if diverged_at is None else None, "diverged_at": diverged_at}
    if return_adapter:
        out["A"], out["B"] = A, B
    return out


def _slope(ranks, values) -> float:
    return float(np.polyfit(np.log(ranks), np.log(values), 1)[0])


def grad_norm_probe(cfg, problem: Problem) -> dict:
    """``||dL/dB||_F`` at initialisation vs rank, on one batch, next to its expectation.

    With B = 0 the residual is ``-delta x``; for x ~ N(0, I) and PEFT's A,
    ``E ||dL/dB||^2 = s^2 ||delta||^2 (r/3) ((1 + 1/n)/d_in + 1/n)``: ``s sqrt(r)`` times a constant,
    so slope -1/2 in log-log for s = alpha/r and 0 for s = alpha/sqrt(r).
    """
    n, d = cfg.batch, problem.delta.shape[1]
    x = np.random.default_rng(subseed(cfg.seed, 6, KINDS.index(problem.kind))).standard_normal(
        (n, d), dtype=np.float32)
    out = {}
    for rule in RULES:
        meas, theory = [], []
        for r in cfg.probe_ranks:
            s = rule_scale(cfg, rule, r)
            A = problem.A_init[:r]
            B = np.zeros((problem.delta.shape[0], r), dtype=np.float32)
            res, xa = lora_linear(x, problem.neg, A, B, scale=s, return_xa=True)
            res *= np.float32(1.0 / n)
            _, _, dB = lora_linear_backward(res, x, problem.neg, A, B, scale=s, need=("B",), xa=xa)
            assert dB is not None
            meas.append(float(np.linalg.norm(dB.astype(np.float64))))
            theory.append(s * math.sqrt(problem.fro2 * r / 3 * ((1 + 1 / n) / d + 1 / n)))
        out[rule] = {"ranks": list(cfg.probe_ranks), "grad_norm": meas, "expected": theory,
                     "slope": _slope(cfg.probe_ranks, meas),
                     "slope_theory": -0.5 if rule == "standard" else 0.0}
    return out


def one_step_probe(cfg, problem: Problem, lrs: dict) -> dict:
    """Relative change of the adapter's output on one input after one step on that input.

    SGD: ``B_1 = lr s (delta x)(A x)^T`` so the change is ``lr s^2 ||A x||^2 ∝ s^2 r``
    (slopes -1 standard, 0 rsLoRA). Adam's first step is ``lr sign(grad)`` whatever the gradient's
    size, so the change is ``lr s sqrt(d_out) ||A x||_1 / ||delta x|| ∝ s r`` (slopes 0 standard,
    +1/2 rsLoRA): the normalisation takes one factor of s out of the update. ``lrs``:
    optimizer -> the learning rate of the step (the one tuned at ranks[0]).
    """
    d = problem.delta.shape[1]
    xs = np.random.default_rng(subseed(cfg.seed, 7, KINDS.index(problem.kind))).standard_normal(
        (cfg.probe_inputs, 1, d), dtype=np.float32)
    out = {}
    for optimizer in OPTIMIZERS:
        lr = lrs[optimizer]
        for rule in RULES:
            meas = []
            for r in cfg.probe_ranks:
                s = rule_scale(cfg, rule, r)
                A = problem.A_init[:r]
                B = np.zeros((problem.delta.shape[0], r), dtype=np.float32)
                changes = []
                for x in xs:  # one step on one input, the change measured on that input
                    y0, xa = lora_linear(x, problem.neg, A, B, scale=s, return_xa=True)
                    _, _, dB = lora_linear_backward(y0, x, problem.neg, A, B, scale=s,
                                                    need=("B",), xa=xa)
                    assert dB is not None
                    if optimizer == "sgd":
                        B1 = -lr * dB
                    else:  # Adam's bias-corrected first step: m_hat = g, v_hat = g^2
                        B1 = -lr * dB / (np.abs(dB) + np.float32(cfg.adam_eps))
                    y1 = lora_linear(x, problem.neg, A, B1, scale=s)
                    changes.append(float(np.linalg.norm(y1 - y0)) / float(np.linalg.norm(y0)))
                meas.append(float(np.mean(changes)))
            theory = {("sgd", "standard"): -1.0, ("sgd", "rslora"): 0.0,
                      ("adam", "standard"): 0.0, ("adam", "rslora"): 0.5}[optimizer, rule]
            out[f"{optimizer}/{rule}"] = {"ranks": list(cfg.probe_ranks), "lr": lr,
                                         "change": meas, "slope": _slope(cfg.probe_ranks, meas),
                                         "slope_theory": theory}
    return out
