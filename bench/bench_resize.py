"""Adapter rank reduction: ``rslora.resize_adapter`` (SVD of ``B @ A`` from thin QRs of the
factors, ``O((d_out + d_in) r^2)``) against the kohya-style resize (``resize_lora``: form the dense
delta ``B @ A`` and take its full SVD with ``numpy.linalg.svd``), same reading and writing, same
new rank, side by side. Both must reach the Eckart-Young optimum (equal error).

Full size (the issue's case): 2 modules of 4096 x 4096 at r = 64 -> 16, float32 factors. With
``--benchmark-disable`` (run as a test) a small adapter is used instead.

    python -m pytest bench/bench_resize.py --benchmark-json=/tmp/resize.json \\
        --benchmark-min-rounds=1
    python bench/report.py /tmp/resize.json
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from benchutil import set_case

import rslora
from rslora.adapters.checkpoint import save_tensors
from rslora.adapters.peft_format import CONFIG_NAME, load_adapter
from rslora.adapters.resize import factor_svd
from rslora.adapters.atomic import atomic_output_dir
from rslora.adapters.rewrite import (adapter_file, narrow, open_raw_adapter, uniform_config,
                                    write_factors, write_folder_files)

FULL = dict(modules=2, d=4096, rank=64, new_rank=16)
SMALL = dict(modules=3, d=384, rank=16, new_rank=4)
# Relative error allowed above the optimum: float32 storage and the float32 dense SVD.
REL_SLACK = 1e-4


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    """An rsLoRA adapter (PEFT layout) with a decaying spectrum per module, and each module's
    optimal relative error at the new rank (from the exact singular values, float64)."""
    size = SMALL if request.config.getoption("benchmark_disable") else FULL
    n, d, r, k = size["modules"], size["d"], size["rank"], size["new_rank"]
    folder = tmp_path_factory.mktemp("resize") / "adapter"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tensors, optimum = {}, {}
    for i in range(n):
        name = f"model.layers.{i}.mlp.down_proj"
        sv = (1.0 + np.arange(r)) ** -(0.5 + 0.25 * i)  # power laws: "style" to "facts"
        B = np.linalg.qr(rng.standard_normal((d, r)))[0] * np.sqrt(sv)
        A = (np.linalg.qr(rng.standard_normal((d, r)))[0] * np.sqrt(sv)).T
        A32, B32 = A.astype(np.float32), B.astype(np.float32)
        tensors[f"base_model.model.{name}.lora_A.weight"] = (A32, "F32")
        tensors[f"base_model.model.{name}.lora_B.weight"] = (B32, "F32")
        s = factor_svd(A32, B32)[1]  # exact spectrum of the stored factors' product
        optimum[name] = math.sqrt((s[k:] ** 2).sum() / (s ** 2).sum())
    save_tensors(folder / "adapter_model.safetensors", tensors)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "use_rslora": True,
           "target_modules": ["down_proj"], "rank_pattern": {}, "alpha_pattern": {}}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    return dict(folder=folder, k=k, optimum=optimum, shape=f"{n}x{d}x{d} r={r}->{k}")


def dense_svd_resize(adapter, out_dir, k: int) -> dict:
    """kohya-style: per module the dense delta ``B @ A`` (float32) and its full SVD; the top-k
    triplets split evenly into new factors. Returns each module's measured relative error."""
    errors = {}
    with open_raw_adapter(adapter) as raw, \
            atomic_output_dir(out_dir, True, inputs=(raw.path,)) as tmp:
        ranks = {name: k for name in raw.modules}
        config, scales = uniform_config(raw.config, ranks, float(raw.config["lora_alpha"]),
                                        raw.rule)
        with adapter_file(raw, tmp, ranks) as f:
            for name, m in raw.modules.items():
                A64, B64 = raw.factors(name)
                delta = B64.astype(np.float32) @ A64.astype(np.float32)
                U, S, Vt = np.linalg.svd(delta, full_matrices=False)
                root = np.sqrt(S[:k] * (m.scale / scales[name]))
                A, B = root[:, None] * Vt[:k], U[:, :k] * root
                errors[name] = float(np.sqrt((S[k:].astype(np.float64) ** 2).sum()
                                             / (S.astype(np.float64) ** 2).sum()))
                write_factors(f, m, narrow(A.astype(np.float64), "F32", name),
                              narrow(B.astype(np.float64), "F32", name))
            raw.copy_other(f)
        write_folder_files(raw, tmp, config)
    return errors


def measured_error(adapter_in, adapter_out) -> dict:
    """``||s' B' A' - s B A||_F / ||s B A||_F`` per module, from the files (float64)."""
    a, b = load_adapter(adapter_in), load_adapter(adapter_out)
    out = {}
    for name in a:
        d0 = a[name].scale * (a[name].B.astype(np.float64) @ a[name].A.astype(np.float64))
        d1 = b[name].scale * (b[name].B.astype(np.float64) @ b[name].A.astype(np.float64))
        out[name] = float(np.linalg.norm(d1 - d0) / np.linalg.norm(d0))
    return out


def test_resize_rslora(benchmark, case):
    set_case(benchmark, f"resize {case['shape']}", "rslora")
    out = case["folder"].parent / "rslora"
    res = benchmark.pedantic(
        lambda: rslora.resize_adapter(case["folder"], out, rank=case["k"], force=True),
        rounds=3, iterations=1)
    assert all(m.new_rank == case["k"] for m in res.modules)
    err = measured_error(case["folder"], out)
    worst = max(err[m] / case["optimum"][m] for m in err)
    benchmark.extra_info["error / optimal error (worst module)"] = worst
    assert worst <= 1 + REL_SLACK


def test_resize_dense_svd(benchmark, case):
    set_case(benchmark, f"resize {case['shape']}", "dense SVD (kohya)")
    out = case["folder"].parent / "dense"
    benchmark.pedantic(lambda: dense_svd_resize(case["folder"], out, case["k"]),
                       rounds=1, iterations=1)
    err = measured_error(case["folder"], out)
    worst = max(err[m] / case["optimum"][m] for m in err)
    benchmark.extra_info["error / optimal error (worst module)"] = worst
    assert worst <= 1 + REL_SLACK
