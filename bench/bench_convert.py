"""Rule conversion: ``rslora.convert_adapter`` (rsLoRA -> standard, the scale ratio folded into
``lora_B`` in float64 and rounded once) against the I/O floor of the same adapter: reading every
tensor and writing them again with safetensors (no arithmetic, no fsync). Both side by side; the
converted adapter must give every module the same update to float32 rounding.

Full size: 8 modules of 4096 x 4096 at r = 64 with a rank_pattern (so every lora_B is rescaled),
float32 factors. With ``--benchmark-disable`` (run as a test) a small adapter is used instead.

    python -m pytest bench/bench_convert.py --benchmark-json=/tmp/convert.json
    python bench/report.py /tmp/convert.json
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from benchutil import set_case

import rslora
from rslora.adapters.checkpoint import save_tensors
from rslora.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME

FULL = dict(modules=8, d=4096, rank=64)
SMALL = dict(modules=4, d=256, rank=8)
_runs = itertools.count()


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    size = SMALL if request.config.getoption("benchmark_disable") else FULL
    n, d, r = size["modules"], size["d"], size["rank"]
    root = tmp_path_factory.mktemp("convert")
    folder = root / "adapter"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tensors, ranks = {}, {}
    for i in range(n):
        name = f"model.layers.{i}.self_attn.q_proj"
        ri = r if i % 2 else r // 2  # half the modules off the top-level r: rank_pattern
        ranks[name] = ri
        tensors[f"base_model.model.{name}.lora_A.weight"] = (
            rng.standard_normal((ri, d)).astype(np.float32) / np.sqrt(d), "F32")
        tensors[f"base_model.model.{name}.lora_B.weight"] = (
            rng.standard_normal((d, ri)).astype(np.float32), "F32")
    save_tensors(folder / WEIGHTS_NAME, tensors)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "use_rslora": True,
           "target_modules": ["q_proj"],
           "rank_pattern": {k: v for k, v in ranks.items() if v != r}, "alpha_pattern": {}}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    return dict(root=root, folder=folder, shape=f"{n}x{d}x{d} r={r}")


def _updates(folder) -> dict:
    ad = rslora.load_adapter(folder)
    return {n: m.scale * (m.B.astype(np.float64) @ m.A.astype(np.float64))
            for n, m in ad.modules.items()}


def test_rslora(benchmark, case):
    set_case(benchmark, f"convert {case['shape']}", "rslora")
    outs = []

    def run():
        out = case["root"] / f"std-{next(_runs)}"
        outs.append(out)
        return rslora.convert_adapter(case["folder"], out, rule="standard", alpha=32.0)

    res = benchmark(run)
    assert res.rescaled  # every module's lora_B really was rescaled (alpha changed)
    before, after = _updates(case["folder"]), _updates(outs[-1])
    assert json.loads((outs[-1] / CONFIG_NAME).read_text())["use_rslora"] is False
    for name, u in before.items():
        err = np.abs(after[name] - u).max() / np.abs(u).max()
        assert err <= 4 * np.finfo(np.float32).eps, (name, err)


def test_io_floor(benchmark, case):
    """Read every tensor and write them again: what any rewrite of the adapter must cost."""
    from safetensors.numpy import load_file, save_file

    set_case(benchmark, f"convert {case['shape']}", "read+write")
    src = case["folder"] / WEIGHTS_NAME

    def run():
        out = case["root"] / f"copy-{next(_runs)}.safetensors"
        save_file(load_file(src), out)
        return out

    out = benchmark(run)
    a, b = load_file(src), load_file(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
