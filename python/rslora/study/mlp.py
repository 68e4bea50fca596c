"""Section 6: a nonlinear fine-tune: does the linear toy's learning-rate picture carry over?

A teacher network ``x -> relu(W1 x + b1) -> relu(W2 h + b2) -> W3 h + b3`` (width ``mlp_dim``,
``mlp_classes`` classes, x ~ N(0, I)) labels inputs by its argmax. A student of the same shape is
pretrained (all weights, Adam, cross-entropy) on the teacher's labels; the task then shifts: a
second teacher whose two hidden weights carry a full-rank Gaussian change of relative size
``mlp_shift``. The student is LoRA-adapted to the new labels: adapters on both hidden layers
(PEFT initialisation), everything else frozen, cross-entropy, AdamW (decoupled weight decay
``mlp_weight_decay``) or plain SGD. Forward and backward of the adapted layers run on rslora's
``lora_linear`` / ``lora_linear_backward``. The metric is the cross-entropy on a fixed held-out
set after ``mlp_steps`` steps; the learning-rate protocol is the toy's (:mod:`.lrmap`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import synthetic
from ..backward import lora_linear_backward
from ..linear import lora_linear
from ..scaling import scale
from .config import subseed
from .dynamics import OPTIMIZERS, RULES, _slope
from .lrmap import _spread, cell
from .lrsearch import Search, drive, lattice_lr

DIVERGED = 1e3
_NETS: dict = {}  # per process: (cfg, rep) -> Net


def mlp_scale(cfg, rule: str, r: int) -> float:
    """As the toy: the rules agree at mlp_ranks[0]."""
    if rule == "rslora":
        return scale(cfg.alpha, r, "rslora")
    return scale(cfg.alpha * cfg.mlp_ranks[0] ** 0.5, r, "standard")


def _layers(rng, d, c, dt):
    W = [rng.standard_normal((d, d)) * math.sqrt(2 / d), rng.standard_normal((d, d)) *
         math.sqrt(2 / d), rng.standard_normal((c, d)) / math.sqrt(d)]
    b = [np.zeros(d), np.zeros(d), np.zeros(c)]
    return [w.astype(dt) for w in W], [x.astype(dt) for x in b]


def forward(W, b, x, adapters=None):
    """Logits and what the backward needs; ``adapters``: [(A1, B1, s), (A2, B2, s)] or None."""
    h, cache = x, []
    for i in range(2):
        if adapters is None:
            z, xa = h @ W[i].T + b[i], None
        else:
            A, B, s = adapters[i]
            z, xa = lora_linear(h, W[i], A, B, scale=s, bias=b[i], return_xa=True)
        cache.append((h, z, xa))
        h = np.maximum(z, 0)
    return h @ W[2].T + b[2], (cache, h)


def cross_entropy(logits, labels):
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = float(-np.mean(np.log(np.maximum(p[np.arange(n), labels].astype(np.float64), 1e-300))))
    p[np.arange(n), labels] -= 1
    return loss, p / p.dtype.type(n)


def backward_lora(W, dlogits, cache, adapters):
    """Gradients of (A1, B1, A2, B2) through both adapted layers (rslora's backward)."""
    (c1, c2), _ = cache
    dz = (dlogits @ W[2]) * (c2[1] > 0)
    A, B, s = adapters[1]
    dh1, dA2, dB2 = lora_linear_backward(dz, c2[0], W[1], A, B, scale=s, xa=c2[2])
    dz = dh1 * (c1[1] > 0)
    A, B, s = adapters[0]
    _, dA1, dB1 = lora_linear_backward(dz, c1[0], W[0], A, B, scale=s, need=("A", "B"),
                                       xa=c1[2])
    return [dA1, dB1, dA2, dB2]


class Net:
    """The pretrained student, the shifted teacher and the held-out set of one seed."""

    def __init__(self, cfg, rep: int):
        d, c, dt = cfg.mlp_dim, cfg.mlp_classes, np.float32
        rng = np.random.default_rng(subseed(cfg.seed, 20, rep))
        T1W, T1b = _layers(rng, d, c, dt)
        T2W = [T1W[0] + cfg.mlp_shift * (rng.standard_normal((d, d)) * math.sqrt(2 / d)).astype(dt),
               T1W[1] + cfg.mlp_shift * (rng.standard_normal((d, d)) * math.sqrt(2 / d)).astype(dt),
               T1W[2]]
        self.teacher = (T2W, T1b)
        self.W, self.b = _layers(rng, d, c, dt)
        self._pretrain(cfg, (T1W, T1b), rng)
        self.x_eval = rng.standard_normal((cfg.mlp_eval, d)).astype(dt)
        self.y_eval = self.label(self.x_eval)
        self.start_loss = cross_entropy(forward(self.W, self.b, self.x_eval)[0], self.y_eval)[0]
        self.old_task_loss = cross_entropy(forward(self.W, self.b, self.x_eval)[0],
                                           self._labels(T1W, T1b, self.x_eval))[0]
        self.A_init = synthetic.lora_init(d, d, max(cfg.mlp_ranks), seed=subseed(cfg.seed, 21, rep),
                                          dtype=dt)[0]
        self.A2_init = synthetic.lora_init(d, d, max(cfg.mlp_ranks),
                                           seed=subseed(cfg.seed, 22, rep), dtype=dt)[0]
        self.batch_seed = subseed(cfg.seed, 23, rep)

    @staticmethod
    def _labels(W, b, x):
        return np.argmax(forward(W, b, x)[0], axis=1)

    def label(self, x):
        return self._labels(*self.teacher, x)

    def _pretrain(self, cfg, teacher, rng, lr=3e-3, batch=128):
        params = self.W + self.b
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        for t in range(1, cfg.mlp_pretrain_steps + 1):
            x = rng.standard_normal((batch, cfg.mlp_dim)).astype(np.float32)
            logits, (cache, h2) = forward(self.W, self.b, x)
            _, g = cross_entropy(logits, self._labels(*teacher, x))
            grads_W, grads_b = [None] * 3, [None] * 3
            grads_W[2], grads_b[2] = g.T @ h2, g.sum(0)
            dh = g @ self.W[2]
            for i in (1, 0):
                h, z, _ = cache[i]
                dz = dh * (z > 0)
                grads_W[i], grads_b[i] = dz.T @ h, dz.sum(0)
                dh = dz @ self.W[i]
            for p, gr, mm, vv in zip(params, grads_W + grads_b, m, v):
                mm *= 0.9
                mm += 0.1 * gr
                vv *= 0.999
                vv += 0.001 * gr * gr
                p -= lr * (mm / (1 - 0.9 ** t)) / (np.sqrt(vv / (1 - 0.999 ** t)) + 1e-8)


def net(cfg, rep: int) -> Net:
    key = (cfg, rep)
    if key not in _NETS:
        if any(c != cfg for c, _ in _NETS):
            _NETS.clear()  # one config at a time, all its seeds (a worker gets any of them)
        _NETS[key] = Net(cfg, rep)
    return _NETS[key]


def finetune(cfg, model: Net, r: int, rule: str, optimizer: str, lr: float) -> float | None:
    """Held-out cross-entropy after LoRA fine-tuning (None: diverged)."""
    s = mlp_scale(cfg, rule, r)
    d = cfg.mlp_dim
    params = [model.A_init[:r].copy(), np.zeros((d, r), np.float32),
              model.A2_init[:r].copy(), np.zeros((d, r), np.float32)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    rng = np.random.default_rng(model.batch_seed)
    b1, b2 = 0.9, 0.999
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, cfg.mlp_steps + 1):
            x = rng.standard_normal((cfg.mlp_batch, d)).astype(np.float32)
            adapters = [(params[0], params[1], s), (params[2], params[3], s)]
            logits, cache = forward(model.W, model.b, x, adapters)
            loss, g = cross_entropy(logits, model.label(x))
            if not (math.isfinite(loss) and loss < DIVERGED):
                return None
            grads = backward_lora(model.W, g, cache, adapters)
            for p, gr, mm, vv in zip(params, grads, m, v):
                if optimizer == "sgd":
                    p -= lr * gr
                    continue
                p *= 1 - lr * cfg.mlp_weight_decay  # AdamW: decoupled decay
                mm *= b1
                mm += (1 - b1) * gr
                vv *= b2
                vv += (1 - b2) * gr * gr
                p -= (lr / (1 - b1 ** t)) * mm / (np.sqrt(vv / (1 - b2 ** t)) + cfg.adam_eps)
        adapters = [(params[0], params[1], s), (params[2], params[3], s)]
        loss = cross_entropy(forward(model.W, model.b, model.x_eval, adapters)[0],
                             model.y_eval)[0]
    return loss if math.isfinite(loss) and loss < DIVERGED else None


def lr_min(cfg, optimizer: str) -> float:
    return cfg.mlp_sgd_lr_min if optimizer == "sgd" else cfg.mlp_adam_lr_min


def run_job(cfg, j: tuple):
    rep, r, rule, optimizer, k = j
    return finetune(cfg, net(cfg, rep), r, rule, optimizer, lattice_lr(lr_min(cfg, optimizer), k))


def total_cost(cfg) -> float:
    return len(OPTIMIZERS) * len(RULES) * cfg.seeds * len(cfg.mlp_ranks) * cfg.lr_points * 1.2


def run(cfg, runner) -> dict:
    reps, ranks = range(cfg.seeds), cfg.mlp_ranks
    searches = {(o, rule, rep, r): Search(cfg.lr_points, cfg.lr_widen)
                for o in OPTIMIZERS for rule in RULES for rep in reps for r in ranks}
    done: dict = {}

    def canon(o, rule, rep, r, k):
        return (rep, r, "rslora" if r == ranks[0] else rule, o, k)

    def run_many(todo):
        jobs = [canon(*key, k) for key, k in todo]
        new = sorted({j for j in jobs if j not in done})
        done.update(zip(new, runner.map(run_job, cfg, new)))
        return [done[j] for j in jobs]

    drive(searches, run_many)
    k0 = {(o, rep): searches[o, "rslora", rep, ranks[0]].best_k() for o in OPTIMIZERS
          for rep in reps}
    run_many([((o, rule, rep, r), k0[o, rep]) for o in OPTIMIZERS for rule in RULES
              for rep in reps for r in ranks])
    nets = [net(cfg, rep) for rep in reps]
    out: dict[str, Any] = {"ranks": list(ranks), "cells": {},
           "start_loss": _spread([n.start_loss for n in nets]),
           "old_task_loss": _spread([n.old_task_loss for n in nets])}
    for o in OPTIMIZERS:
        for rule in RULES:
            per = [[searches[o, rule, rep, r].summary(lr_min(cfg, o)) for r in ranks]
                   for rep in reps]
            slopes = [_slope(list(ranks), [x["optimum_lr"] for x in p]) for p in per]
            fixed = [[done[canon(o, rule, rep, r, k0[o, rep])] for r in ranks] for rep in reps]
            out["cells"][f"{o}/{rule}"] = cell(
                per, slopes, fixed, [lattice_lr(lr_min(cfg, o), k0[o, rep]) for rep in reps])
    return out
