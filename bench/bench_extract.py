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
from benchutil import set_case, write_extract_pair

import rslora
from rslora.adapters.peft_format import save_adapter
from rslora.adapters.checkpoint import Checkpoint

FULL = dict(layers=24, d=2048, rank=64)
SMALL = dict(layers=3, d=256, rank=16)
# Relative error allowed above the Eckart-Young optimum (the full SVD's error).
REL_SLACK = 1e-3


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    """base.safetensors and tuned.safetensors written once; per layer, the optimal error."""
    size = SMALL if request.config.getoption("benchmark_disable") else FULL
    n, d, rank = size["layers"], size["d"], size["rank"]
    folder = tmp_path_factory.mktemp("extract")
    optimum = write_extract_pair(folder, n, d, rank, optimum=True)
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
