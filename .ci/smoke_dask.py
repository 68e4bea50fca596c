"""Smoke test of the wheel with its [cli,dask] extras in a bare venv (.ci/wheel): issue 12's
"rslora extract ... --workers 2 works from a fresh install". Writes a small base/tuned pair,
extracts it in one process and on a LocalCluster of 2 workers, and checks that the two adapters
are the same bytes and reproduce tuned - base at the rank of the change."""

import os
import subprocess
import sys
import tempfile

import json

import numpy as np
from safetensors.numpy import load_file, save_file

import rslora

exe = os.path.join(os.path.dirname(sys.executable), "rslora")
rng = np.random.default_rng(0)
with tempfile.TemporaryDirectory() as d:
    base, tuned = {}, {}
    for i in range(6):
        W = rng.standard_normal((96, 64)).astype(np.float32)
        delta = rng.standard_normal((96, 4)) @ rng.standard_normal((4, 64)) / 8
        base[f"model.layers.{i}.mlp.up_proj.weight"] = W
        tuned[f"model.layers.{i}.mlp.up_proj.weight"] = (W + delta).astype(np.float32)
    save_file(base, f"{d}/base.safetensors")
    save_file(tuned, f"{d}/tuned.safetensors")
    outs = {}
    for name, extra in (("one", []), ("two", ["--workers", "2"])):
        out = f"{d}/{name}"
        subprocess.run([exe, "extract", f"{d}/base.safetensors", f"{d}/tuned.safetensors",
                        "-o", out, "--rank", "4", "-q", *extra], check=True)
        with open(f"{out}/adapter_model.safetensors", "rb") as f:
            outs[name] = f.read()
    assert outs["one"] == outs["two"], "--workers 2 wrote other bytes than one process"
    ad = load_file(f"{d}/two/adapter_model.safetensors")
    with open(f"{d}/two/adapter_config.json") as f:
        cfg = json.load(f)
    s = rslora.scale(cfg["lora_alpha"], cfg["r"], "rslora" if cfg.get("use_rslora") else "standard")
    for key, W in base.items():
        stem = key[:-len(".weight")]
        A = next(v for k, v in ad.items() if k.endswith(f"{stem}.lora_A.weight"))
        B = next(v for k, v in ad.items() if k.endswith(f"{stem}.lora_B.weight"))
        got = s * (B.astype(np.float64) @ A.astype(np.float64))
        want = tuned[key].astype(np.float64) - W
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 1e-5, (key, err)
print("smoke dask: OK (extract --workers 2 = one process, byte for byte)")
