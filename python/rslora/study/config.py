"""The study's settings: every choice the report documents, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StudyConfig:
    """Sizes and hyper-parameters of one study run (see :func:`quick_config`, :func:`full_config`).

    The two scaling rules are calibrated to coincide at the smallest trained rank ``ranks[0]``:
    rsLoRA uses ``alpha`` (``alpha / sqrt(r)``), the standard rule ``alpha * sqrt(ranks[0])``
    (``alpha_standard / r``), so any difference between them comes only from how the scale moves
    with the rank. Learning rates are picked once per optimizer and target from the grids, by the
    final loss at ``ranks[0]`` (where both rules are the same run), then held fixed for all ranks.
    """

    mode: str
    seed: int = 0
    # 1. the scale table (the rsLoRA paper's, with PEFT's usual alpha)
    table_alpha: float = 16.0
    table_ranks: tuple = (1, 4, 8, 16, 32, 64)
    # 2./3. spectra and approximation: square d x d deltas
    spectrum_dim: int = 1024
    approx_ranks: tuple = (2, 4, 8, 16, 32, 64, 128, 256)
    approx_alpha: float = 16.0
    style_tau: float = 6.0
    facts_power: float = 0.5
    # 4. training dynamics
    train_dim: int = 1024
    ranks: tuple = (4, 16, 64, 256, 1024)
    probe_ranks: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    alpha: float = 16.0
    steps: int = 400
    batch: int = 64
    evals: int = 30
    probe_inputs: int = 32
    sgd_lrs: tuple = (0.02, 0.04, 0.08, 0.16)
    adam_lrs: tuple = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8

    @property
    def alpha_standard(self) -> float:
        return self.alpha * self.ranks[0] ** 0.5

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["alpha_standard"] = self.alpha_standard
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def full_config(seed: int = 0) -> StudyConfig:
    """The full study: 1024 x 1024 deltas, ranks 4..1024 (a few minutes on 2 cores)."""
    return StudyConfig(mode="full", seed=seed)


def quick_config(seed: int = 0) -> StudyConfig:
    """The quick study: 512 x 512 deltas, training at 256 x 256 with ranks 4..256 (about a minute)."""
    return StudyConfig(mode="quick", seed=seed, spectrum_dim=512, train_dim=256,
                       ranks=(4, 16, 64, 256), probe_ranks=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                       steps=300, batch=64, evals=20)


def subseed(seed: int, *keys: int) -> np.random.SeedSequence:
    """An independent, reproducible random stream for one purpose of the study."""
    return np.random.SeedSequence([int(seed), *keys])


def int_seed(seed: int, *keys: int) -> int:
    """:func:`subseed` as one 32-bit integer (for APIs that take an int seed)."""
    return int(subseed(seed, *keys).generate_state(1)[0])
