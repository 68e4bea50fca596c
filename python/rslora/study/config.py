"""The study's settings: every choice the report documents, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StudyConfig:
    """Sizes and hyper-parameters of one study run (see :func:`quick_config`, :func:`full_config`).

    The two scaling rules are calibrated to coincide at the smallest trained rank ``ranks[0]``:
    rsLoRA uses ``alpha`` (``alpha / sqrt(r)``), the standard rule ``alpha * sqrt(ranks[0])``
    (``alpha_standard / r``), so any difference between them comes only from how the scale moves
    with the rank.

    Learning rates live on a lattice ``lr = lr_min * sqrt(2)**k`` (k an integer): each search
    starts at ``k = 0 .. lr_points - 1`` and widens by two points at an edge that holds the best
    loss, at most ``lr_widen`` points per side (:mod:`.lrsearch`).
    """

    mode: str
    seed: int = 0
    seeds: int = 3  # independent repetitions of every trained run (targets, A, batches)
    # 1. the scale table (the rsLoRA paper's, with PEFT's usual alpha)
    table_alpha: float = 16.0
    table_ranks: tuple = (1, 4, 8, 16, 32, 64)
    # 2./3. spectra and approximation: square d x d deltas
    spectrum_dim: int = 1024
    approx_ranks: tuple = (2, 4, 8, 16, 32, 64, 128, 256)
    approx_alpha: float = 16.0
    style_tau: float = 6.0
    facts_power: float = 0.5
    # 4. the linear toy: learning a facts update, learning-rate map at every rank (< train_dim)
    train_dim: int = 256
    ranks: tuple = (4, 16, 64)
    degenerate: bool = True  # also train at r = train_dim (reported apart: the loss can reach 0)
    probe_ranks: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    alpha: float = 16.0
    steps: int = 200
    batch: int = 64
    evals: int = 10
    probe_inputs: int = 32
    lr_points: int = 10
    lr_widen: int = 10
    sgd_lr_min: float = 0.04
    adam_lr_min: float = 7e-4
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    # 5. a nonlinear fine-tune: a 2-hidden-layer MLP, LoRA on both hidden layers
    mlp_dim: int = 64
    mlp_classes: int = 10
    mlp_ranks: tuple = (4, 16, 64)
    mlp_shift: float = 0.7
    mlp_pretrain_steps: int = 600
    mlp_steps: int = 200
    mlp_batch: int = 64
    mlp_eval: int = 2048
    mlp_weight_decay: float = 0.01
    mlp_sgd_lr_min: float = 0.04
    mlp_adam_lr_min: float = 7e-4

    @property
    def alpha_standard(self) -> float:
        return self.alpha * self.ranks[0] ** 0.5

    @property
    def map_ranks(self) -> tuple:
        """The toy's trained ranks: ``ranks`` plus ``train_dim`` when ``degenerate``."""
        return self.ranks + ((self.train_dim,) if self.degenerate else ())

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["alpha_standard"] = self.alpha_standard
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def from_dict(d: dict) -> StudyConfig:
    """The config back from :meth:`StudyConfig.as_dict` (results.json's ``config``)."""
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
                          if k in names}
    return StudyConfig(**kw)


def full_config(seed: int = 0) -> StudyConfig:
    """The full study: 1024 x 1024 deltas, the toy at 256 x 256 (a few minutes on 2 cores)."""
    return StudyConfig(mode="full", seed=seed)


def quick_config(seed: int = 0) -> StudyConfig:
    """The quick study: 512 x 512 deltas, the toy at 64 x 64, shorter runs (seconds)."""
    return StudyConfig(mode="quick", seed=seed, spectrum_dim=512, train_dim=64, ranks=(2, 8, 32),
                       probe_ranks=(1, 2, 4, 8, 16, 32, 64), steps=100, batch=32, evals=5,
                       lr_points=7, mlp_dim=32, mlp_ranks=(2, 8, 32), mlp_pretrain_steps=300,
                       mlp_steps=60, mlp_batch=32, mlp_eval=512)


def subseed(seed: int, *keys: int) -> np.random.SeedSequence:
    """An independent, reproducible random stream for one purpose of the study."""
    return np.random.SeedSequence([int(seed), *keys])


def int_seed(seed: int, *keys: int) -> int:
    """:func:`subseed` as one 32-bit integer (for APIs that take an int seed)."""
    return int(subseed(seed, *keys).generate_state(1)[0])
