"""Shared helpers for the benchmark suites (import as ``from benchutil import set_case``).
Each benchmark also asserts correctness, so ``pytest bench --benchmark-disable`` runs them as tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def set_case(benchmark, group: str, role: str, **info) -> None:
    """Name the side-by-side group and this entry's role in it (see bench/report.py)."""
    benchmark.group = group
    benchmark.extra_info["role"] = role
    benchmark.extra_info.update(info)


def extract_spectrum(d: int, rank: int) -> np.ndarray:
    """Singular values of each synthetic delta: a power law (fine-tuning deltas are
    "low-rank-ish", not low rank) over 8 * rank directions, scaled to the weights."""
    k = min(d, 8 * rank)
    return 0.05 * (1.0 + np.arange(k) * (16.0 / rank)) ** -1.5


def write_extract_pair(folder: Path, layers: int, d: int, rank: int,
                       optimum: bool = False) -> dict:
    """``folder/base.safetensors`` and ``folder/tuned.safetensors``: ``layers`` float32 weights of
    d x d, each tuned = base + a delta of spectrum :func:`extract_spectrum` + a little noise.
    Returns, with ``optimum``, each module's Eckart-Young error at ``rank`` (a full SVD each)."""
    from rslora.adapters.checkpoint import save_tensors

    rng = np.random.default_rng(0)
    s = extract_spectrum(d, rank)
    base, tuned, best = {}, {}, {}
    for i in range(layers):
        key = f"model.layers.{i}.mlp.proj.weight"
        W = (rng.standard_normal((d, d), dtype=np.float32) / np.float32(math.sqrt(d)))
        G1 = rng.standard_normal((d, s.size), dtype=np.float32) / np.float32(math.sqrt(d))
        G2 = rng.standard_normal((s.size, d), dtype=np.float32) / np.float32(math.sqrt(d))
        noise = rng.standard_normal((d, d), dtype=np.float32) * np.float32(1e-5 / math.sqrt(d))
        base[key] = (W, "F32")
        tuned[key] = (W + (G1 * s.astype(np.float32)) @ G2 + noise, "F32")
        if optimum:
            sv = np.linalg.svd(tuned[key][0] - W, compute_uv=False).astype(np.float64)
            best[key[: -len(".weight")]] = math.sqrt((sv[rank:] ** 2).sum() / (sv ** 2).sum())
    save_tensors(folder / "base.safetensors", base)
    save_tensors(folder / "tuned.safetensors", tuned)
    return best
