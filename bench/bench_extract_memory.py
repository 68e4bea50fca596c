"""Peak memory of ``rslora extract`` on the client: it must stay at a few layers whatever the
number of layers (the factors are written as they arrive, not held until the end).

Full size: the 24-layer 2048 x 2048 float32 pair of bench_extract.py at rank 64 (a layer's delta
is 16 MiB, its factors 1 MiB); with ``--benchmark-disable`` (run as a test) a small pair. Each
run is a fresh ``python`` process, measured twice: peak NumPy/Python memory traced by
``tracemalloc``, and the process's peak resident set (``VmHWM``, imports included).
``RSLORA_BENCH_PYTHON`` names another interpreter to measure (e.g. a venv of an older rslora),
side by side with the same pair.

    python -m pytest bench/bench_extract_memory.py --benchmark-json=/tmp/extract_memory.json
    RSLORA_BENCH_PYTHON=/tmp/venv-old/bin/python python -m pytest bench/bench_extract_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    argv = ["extract", str(case["folder"] / "base.safetensors"),
            str(case["folder"] / "tuned.safetensors"), "-o", str(out), "-q", "--force", *args]
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
