"""Adapter extraction from two checkpoints: ``rslora.extract_adapter`` (randomized SVD) against
full-SVD extraction (``numpy.linalg.svd`` per layer, what mergekit-extract-lora and kohya's
extract_lora_from_models do with torch), same reading and writing, same rank, side by side.

Full size (the issue's case): 24 layers of 2048 x 2048 float32 at rank 64. With
``--benchmark-disable`` (run as a test) a small checkpoint is used instead.

    python -m pytest bench/bench_extract.py --benchmark-json=/tmp/extract.json
    python bench/report.py /tmp/extract.json
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from benchutil import set_case

import rslora
from rslora.adapters.peft_format import save_adapter
from rslora.adapters.checkpoint import Checkpoint, save_tensors

FULL = dict(layers=24, d=2048, rank=64)
SMALL = dict(layers=3, d=256, rank=16)
# Relative error allowed above the Eckart-Young optimum (the full SVD's error).
REL_SLACK = 1e-3


def spectrum(d: int, rank: int) -> np.ndarray:
    """Singular values of each synthetic delta: a power law (fine-tuning deltas are
    "low-rank-ish", not low rank) over 8 * rank directions, scaled to the weights."""
    k = min(d, 8 * rank)
    return 0.05 * (1.0 + np.arange(k) * (16.0 / rank)) ** -1.5


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    """base.safetensors and tuned.safetensors written once; per layer, the optimal error."""
    size = SMALL if request.config.getoption("benchmark_disable") else FULL
    n, d, rank = size["layers"], size["d"], size["rank"]
    folder = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(0)
    s = spectrum(d, rank)
    base, tuned, optimum = {}, {}, {}
    for i in range(n):
        key = f"model.layers.{i}.mlp.proj.weight"
        W = (rng.standard_normal((d, d), dtype=np.float32) / np.float32(math.sqrt(d)))
        G1 = rng.standard_normal((d, s.size), dtype=np.float32) / np.float32(math.sqrt(d))
        G2 = rng.standard_normal((s.size, d), dtype=np.float32) / np.float32(math.sqrt(d))
        noise = rng.standard_normal((d, d), dtype=np.float32) * np.float32(1e-5 / math.sqrt(d))
        base[key] = (W, "F32")
        tuned[key] = (W + (G1 * s.astype(np.float32)) @ G2 + noise, "F32")
        delta = tuned[key][0] - W
        sv = np.linalg.svd(delta, compute_uv=False).astype(np.float64)
        optimum[key[: -len(".weight")]] = math.sqrt((sv[rank:] ** 2).sum() / (sv ** 2).sum())
    save_tensors(folder / "base.safetensors", base)
    save_tensors(folder / "tuned.safetensors", tuned)
    return dict(folder=folder, rank=rank, optimum=optimum, shape=f"{n}x{d}x{d}")


def full_svd_extract(base, tuned, out_dir, rank: int) -> dict:
    """The usual extraction: a full (thin) SVD of each delta, keep the top ``rank`` triplets.
    Returns the measured relative error per module."""
    errors, factors = {}, {}
    with Checkpoint(base) as cb, Checkpoint(tuned) as ct:
        for key in cb.keys():
            delta = ct.read(key)
            delta -= cb.read(key)
            U, S, Vt = np.linalg.svd(delta, full_matrices=False)
            root = np.sqrt(S[:rank])
            A, B = root[:, None] * Vt[:rank], U[:, :rank] * root
            norm = np.linalg.norm(delta)
            rslora.unmerge(delta, A, B, scale=1.0)
            name = key[: -len(".weight")]
            errors[name] = float(np.linalg.norm(delta) / norm)
            factors[name] = (A, B / np.float32(math.sqrt(rank)))  # s = rank / sqrt(rank)
    save_adapter(out_dir, factors, alpha=rank, rule="rslora", force=True)
    return errors


def test_extract_rslora(benchmark, case):
    set_case(benchmark, f"extract {case['shape']} r={case['rank']}", "rslora")
    out = case["folder"] / "rslora"
    res = benchmark.pedantic(
        lambda: rslora.extract_adapter(case["folder"] / "base.safetensors",
                                       case["folder"] / "tuned.safetensors", out,
                                       rank=case["rank"], force=True),
        rounds=1, iterations=1)
    ratio = max(l.error / case["optimum"][l.module] for l in res.layers)
    benchmark.extra_info["error / optimal error (worst layer)"] = ratio
    assert len(res.layers) == len(case["optimum"])
    assert ratio <= 1 + REL_SLACK
    assert rslora.load_adapter(out)[res.layers[0].module].r == case["rank"]


def test_extract_full_svd(benchmark, case):
    set_case(benchmark, f"extract {case['shape']} r={case['rank']}", "numpy full SVD")
    errors = benchmark.pedantic(
        lambda: full_svd_extract(case["folder"] / "base.safetensors",
                                 case["folder"] / "tuned.safetensors", case["folder"] / "svd",
                                 case["rank"]),
        rounds=1, iterations=1)
    for name, err in errors.items():
        assert err == pytest.approx(case["optimum"][name], rel=1e-3)
