"""Peak memory of ``rslora extract`` on the client: it must stay at a few layers whatever the
number of layers (the factors are written as they arrive, not held until the end). Also of
``rslora resize`` and ``rslora convert``, which must hold one module's factors at a time, not
the adapter (``test_rewrite_peak_memory``).

Full size: the 24-layer 2048 x 2048 float32 pair of bench_extract.py at rank 64 (a layer's delta
is 16 MiB, its factors 1 MiB); with ``--benchmark-disable`` (run as a test) a small pair. Each
run is a fresh ``python`` process, measured twice: peak NumPy/Python memory traced by
``tracemalloc``, and the process's peak resident set (``VmHWM``, imports included).
``RSLORA_BENCH_PYTHON`` names another interpreter to measure (e.g. a venv of an older rslora),
side by side with the same pair.

    python -m pytest bench/bench_extract_memory.py --benchmark-json=/tmp/extract_memory.json

Resize/convert, full size: an rsLoRA adapter of 48 modules of 4096 x 4096 at rank 64, float32
(2 MiB of factors per module, 96 MiB in all), a rank_pattern putting half of them at rank 32
(so convert rescales their lora_B); small: 6 modules of 256 x 256 at rank 16.
    RSLORA_BENCH_PYTHON=/tmp/venv-old/bin/python python -m pytest bench/bench_extract_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from benchutil import set_case, write_extract_pair

FULL = dict(layers=24, d=2048, rank=64)
SMALL = dict(layers=6, d=256, rank=16)

MEASURE = """
import json, sys, tracemalloc
import rslora.cli
tracemalloc.start()
rc = rslora.cli.main(sys.argv[1:])
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
# VmHWM: this process's peak resident set (ru_maxrss would report the forking parent's)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"rc": rc, "traced": peak, "maxrss": int(hwm) * 1024}))
"""


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    size = SMALL if request.config.getoption("benchmark_disable") else FULL
    folder = tmp_path_factory.mktemp("extract_memory")
    write_extract_pair(folder, size["layers"], size["d"], size["rank"])
    return dict(folder=folder, **size)


def measure(python: str, case, out, *args) -> dict:
    return run_measured(python, ["extract", str(case["folder"] / "base.safetensors"),
                                 str(case["folder"] / "tuned.safetensors"), "-o", str(out), "-q",
                                 "--force", *args])


def run_measured(python: str, argv: list) -> dict:
    """``rslora ARGV`` in a fresh ``python``: its traced peak and peak resident set."""
    p = subprocess.run([python, "-c", MEASURE, *argv], capture_output=True, text=True,
                       env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    return res


@pytest.mark.parametrize("mode", [["--rank"], ["--tol", "0.01", "--max-rank"]],
                         ids=["rank", "tol"])
def test_extract_peak_memory(benchmark, case, mode):
    python = os.environ.get("RSLORA_BENCH_PYTHON", sys.executable)
    args = [*mode, str(case["rank"])]
    set_case(benchmark, f"extract memory {case['layers']}x{case['d']}x{case['d']} "
             f"{' '.join(args)}", python)
    res = benchmark.pedantic(lambda: measure(python, case, case["folder"] / "out", *args),
                             rounds=1, iterations=1)
    d, r = case["d"], case["rank"]
    ranks = json.loads((case["folder"] / "out" / "adapter_config.json").read_text())
    assert ranks["r"] == r and not ranks["rank_pattern"]  # every layer at the full rank
    delta, factors = d * d * 4, 2 * r * d * 4
    benchmark.extra_info.update(traced_MiB=res["traced"] / 2**20,
                                maxrss_MiB=res["maxrss"] / 2**20,
                                all_factors_MiB=case["layers"] * factors / 2**20)
    print(f"\n{python} {' '.join(args)}: traced peak {res['traced'] / 2**20:.1f} MiB, "
          f"max RSS {res['maxrss'] / 2**20:.1f} MiB; one delta {delta / 2**20:.1f} MiB, all "
          f"factors {case['layers'] * factors / 2**20:.1f} MiB (rank {r} each)")
    if python == sys.executable:  # the code under test: a few layers, not all of them
        assert res["traced"] < 4 * delta + 4 * factors + (8 << 20)  # + imports, bookkeeping


# -- resize and convert ------------------------------------------------------------------------
REWRITE_FULL = dict(modules=48, d=4096, rank=64)
REWRITE_SMALL = dict(modules=6, d=256, rank=16)


@pytest.fixture(scope="module")
def adapter_case(request, tmp_path_factory):
    """An rsLoRA adapter (PEFT layout, float32), half its modules at rank/2 by rank_pattern,
    spectra decaying so --tol keeps about half the directions."""
    from rslora.adapters.checkpoint import save_tensors

    size = REWRITE_SMALL if request.config.getoption("benchmark_disable") else REWRITE_FULL
    n, d, r = size["modules"], size["d"], size["rank"]
    folder = tmp_path_factory.mktemp("rewrite_memory") / "adapter"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tensors, pattern = {}, {}
    for i in range(n):
        name = f"model.layers.{i}.mlp.down_proj"
        k = r if i % 2 else r // 2
        if k != r:
            pattern[name] = k
        B = rng.standard_normal((d, k), dtype=np.float32) * np.logspace(0, -3, k, dtype=np.float32)
        tensors[f"base_model.model.{name}.lora_A.weight"] = (
            rng.standard_normal((k, d), dtype=np.float32) / np.float32(np.sqrt(d)), "F32")
        tensors[f"base_model.model.{name}.lora_B.weight"] = (B, "F32")
    save_tensors(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 16, "use_rslora": True,
         "target_modules": ["down_proj"], "rank_pattern": pattern, "alpha_pattern": {}}))
    return dict(folder=folder, **size)


REWRITES = {"convert": ["convert", "--rule", "standard", "--alpha", "32"],
            "resize-rank": ["resize", "-q", "--rank", "{quarter}"],
            "resize-tol": ["resize", "-q", "--tol", "0.05"]}


@pytest.mark.parametrize("run", list(REWRITES))
def test_rewrite_peak_memory(benchmark, adapter_case, run):
    python = os.environ.get("RSLORA_BENCH_PYTHON", sys.executable)
    c = adapter_case
    argv = [a.format(quarter=c["rank"] // 4) for a in REWRITES[run]]
    out = c["folder"].parent / f"out-{run}"
    set_case(benchmark, f"rewrite memory {c['modules']}x{c['d']}x{c['d']} r={c['rank']} "
             f"{' '.join(argv)}", python)
    res = benchmark.pedantic(lambda: run_measured(python, [argv[0], str(c["folder"]), "-o",
                                                           str(out), "--force", *argv[1:]]),
                             rounds=1, iterations=1)
    d, r, n = c["d"], c["rank"], c["modules"]
    module64 = 2 * r * d * 8  # one module's factors at the top rank, widened to float64
    adapter = (n // 2) * (2 * r * d * 4) + (n - n // 2) * (r * d * 4)  # the file's factors
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["use_rslora"] is (run != "convert")
    benchmark.extra_info.update(traced_MiB=res["traced"] / 2**20,
                                maxrss_MiB=res["maxrss"] / 2**20, adapter_MiB=adapter / 2**20)
    print(f"\n{python} {' '.join(argv)}: traced peak {res['traced'] / 2**20:.1f} MiB, max RSS "
          f"{res['maxrss'] / 2**20:.1f} MiB; adapter {adapter / 2**20:.1f} MiB of float32 "
          f"factors, one module {module64 / 2**20:.1f} MiB in float64")
    if python == sys.executable:  # the code under test: a module or two, not the adapter
        assert res["traced"] < 6 * module64 + (8 << 20)  # + imports, bookkeeping
