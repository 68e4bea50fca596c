"""Section 4: training LoRA adapters on the synthetic targets, standard vs rsLoRA scaling.

The task: learn ``delta`` (style or facts, ``||delta||_F = 1``, float32) from batches
``x ~ N(0, I)``, ``y = x @ delta.T``, with a PEFT-initialised adapter (``A`` Kaiming-uniform,
``B = 0``) and the loss ``L = 1/(2n) sum ||s B A x - delta x||^2``. A frozen base weight ``W0``
cancels from the residual, so the forward runs with the base ``-delta``:
``lora_linear(x, -delta, A, B)`` is the residual itself and its gradients are those of the task
with any ``W0``. Every step uses rslora's fused kernels: ``lora_linear(..., return_xa=True)``
forward, ``lora_linear_backward(..., need=("A", "B"), xa=xa)`` backward.

For these inputs the population loss is ``||s B A - delta||_F^2 / ||delta||_F^2`` exactly; that is
what the curves show (formed with ``rslora.merge`` at evaluation steps), not a noisy batch loss.
All runs of one target see the same batches and start from nested ``A`` (rank r uses the first r
rows of one draw), so ranks and rules are compared on paired data.
"""

from __future__ import annotations

import math

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

    def __init__(self, cfg, kind: str, delta: np.ndarray):
        self.kind = kind
        self.delta = np.ascontiguousarray(delta, dtype=np.float32)
        self.neg = -self.delta
        self.fro2 = float(np.einsum("ij,ij->", self.delta, self.delta, dtype=np.float64))
        d = self.delta.shape[1]
        # One A draw per target; a rank-r run starts from its first r rows.
        self.A_init, _ = synthetic.lora_init(self.delta.shape[0], d, max(cfg.probe_ranks + cfg.ranks),
                                             seed=subseed(cfg.seed, 4, KINDS.index(kind)),
                                             dtype=np.float32)
        self.batch_seed = subseed(cfg.seed, 5, KINDS.index(kind))

    def loss(self, A, B, s) -> float:
        """Population loss ``||s B A - delta||^2 / ||delta||^2`` (E[||residual||^2] for x ~ N(0,I))."""
        E = self.neg.copy()
        merge(E, A, B, scale=s)
        return float(np.einsum("ij,ij->", E, E, dtype=np.float64)) / self.fro2


class _SGD:
    def __init__(self, lr, params, cfg):
        self.lr = lr

    def step(self, params, grads):
        for p, g in zip(params, grads):
            g *= self.lr
            p -= g


class _Adam:
    def __init__(self, lr, params, cfg):
        self.lr, (self.b1, self.b2), self.eps = lr, cfg.adam_betas, cfg.adam_eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            denom = np.sqrt(v / c2)
            denom += self.eps
            p -= (self.lr / c1) * m / denom


_OPT = {"sgd": _SGD, "adam": _Adam}


def eval_steps(cfg) -> list:
    return sorted({int(round(t)) for t in np.linspace(0, cfg.steps, cfg.evals + 1)})


def run_cost(cfg, r: int) -> float:
    """Work units of one run (FLOPs / 1e6 of its GEMMs), for the progress bar."""
    n, d = cfg.batch, cfg.train_dim
    return cfg.steps * n * d * (2 * d + 10 * r) / 1e6


def train(cfg, problem: Problem, r: int, rule: str, optimizer: str, lr: float,
          advance=lambda units: None) -> dict:
    """Train one adapter; returns its loss curve (population loss at :func:`eval_steps`)."""
    s = rule_scale(cfg, rule, r)
    A = problem.A_init[:r].copy()
    B = np.zeros((problem.delta.shape[0], r), dtype=np.float32)
    opt = _OPT[optimizer](lr, (A, B), cfg)
    rng = np.random.default_rng(problem.batch_seed)
    n, d = cfg.batch, problem.delta.shape[1]
    evals = eval_steps(cfg)
    per_step = run_cost(cfg, r) / cfg.steps
    steps, losses, diverged_at = [], [], None
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
            x = rng.standard_normal((n, d), dtype=np.float32)
            res, xa = lora_linear(x, problem.neg, A, B, scale=s, return_xa=True)
            res *= np.float32(1.0 / n)  # dL/dy for L = 1/(2n) sum ||residual||^2
            _, dA, dB = lora_linear_backward(res, x, problem.neg, A, B, scale=s,
                                             need=("A", "B"), xa=xa)
            opt.step((A, B), (dA, dB))
            advance(per_step)
    if diverged_at is not None:
        advance(per_step * (cfg.steps - diverged_at))
    final = losses[-1]
    return {"rank": r, "rule": rule, "optimizer": optimizer, "lr": lr, "scale": s,
            "steps": steps, "loss": [x if math.isfinite(x) else None for x in losses],
            "final_loss": final if diverged_at is None else None, "diverged_at": diverged_at}


def pick_lrs(cfg, problems: dict, advance) -> dict:
    """Per optimizer and target: the grid lr with the lowest final loss at rank ranks[0]."""
    r0 = cfg.ranks[0]
    out = {}
    for optimizer in OPTIMIZERS:
        grid = cfg.sgd_lrs if optimizer == "sgd" else cfg.adam_lrs
        for kind in KINDS:
            runs = [train(cfg, problems[kind], r0, "rslora", optimizer, lr, advance) for lr in grid]
            finals = [x["final_loss"] if x["final_loss"] is not None else math.inf for x in runs]
            best = int(np.argmin(finals))
            out[f"{optimizer}/{kind}"] = {"grid": list(grid), "final_loss": [
                None if math.isinf(f) else f for f in finals], "lr": grid[best], "run": runs[best]}
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
    +1/2 rsLoRA): the normalisation takes one factor of s out of the update.
    """
    d = problem.delta.shape[1]
    xs = np.random.default_rng(subseed(cfg.seed, 7, KINDS.index(problem.kind))).standard_normal(
        (cfg.probe_inputs, 1, d), dtype=np.float32)
    out = {}
    for optimizer in OPTIMIZERS:
        lr = lrs[f"{optimizer}/{problem.kind}"]["lr"]
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


def total_cost(cfg) -> float:
    sweep = len(KINDS) * (len(cfg.sgd_lrs) + len(cfg.adam_lrs)) * run_cost(cfg, cfg.ranks[0])
    main = len(KINDS) * len(OPTIMIZERS) * len(RULES) * sum(run_cost(cfg, r) for r in cfg.ranks[1:])
    return sweep + main


def run(cfg, deltas: dict, advance=lambda units: None) -> dict:
    problems = {k: Problem(cfg, k, deltas[k][0]) for k in KINDS}
    lrs = pick_lrs(cfg, problems, advance)
    runs = []
    for kind in KINDS:
        for optimizer in OPTIMIZERS:
            chosen = lrs[f"{optimizer}/{kind}"]
            for rule in RULES:
                # At ranks[0] both rules have the same scale: the sweep's run is this run.
                first = dict(chosen["run"], rule=rule, target=kind)
                runs.append(first)
                for r in cfg.ranks[1:]:
                    run_ = train(cfg, problems[kind], r, rule, optimizer, chosen["lr"], advance)
                    runs.append(dict(run_, target=kind))
    for v in lrs.values():
        del v["run"]
    optimum = {}
    for kind in KINDS:
        S = deltas[kind][1]
        tail = np.cumsum((S * S)[::-1])[::-1] / float(np.sum(S * S))
        optimum[kind] = [float(tail[r]) if r < len(S) else 0.0 for r in cfg.ranks]
    return {
        "optimum": optimum,
        "learning_rates": lrs,
        "runs": runs,
        "grad_norm": {k: grad_norm_probe(cfg, problems[k]) for k in KINDS},
        "one_step": {k: one_step_probe(cfg, problems[k], lrs) for k in KINDS},
    }
