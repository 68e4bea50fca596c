"""The whole-adapter ``convert`` and ``resize`` that rslora had before they streamed (main at
8ffaff9), kept as the reference the streaming ones must match byte for byte: every factor read
and widened to float64 first, every new factor computed, then the file written at once with
``save_tensors``. Argument checks are left out (the tests pass valid arguments)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np

from rslora.adapters.atomic import atomic_output_dir
from rslora.adapters.checkpoint import Checkpoint, from_bfloat16_bits, save_tensors
from rslora.adapters.convert import _rule_factor
from rslora.adapters.peft_format import (CONFIG_NAME, WEIGHTS_NAME, _read_config,
                                         adapter_folder, pattern_key)
from rslora.adapters.resize import _Module, _plan_module, _tail_energy, truncate
from rslora.adapters.rewrite import _FACTOR, _PREFIX, narrow, uniform_config
from rslora.scaling import scale as lora_scale


def read_whole(path) -> dict:
    """Every module's float64 factors and every other tensor as stored, in file order."""
    folder = adapter_folder(path)
    cfg = _read_config(folder)
    rule = "rslora" if cfg.get("use_rslora") else "standard"
    parts: dict = {}
    other, order = {}, []
    with Checkpoint(folder / WEIGHTS_NAME) as ck:
        for key in ck.keys():  # noqa: SIM118
            order.append(key)
            m = _FACTOR.match(key)
            if m is None:
                other[key] = ck.read_raw(key)
                continue
            arr, code = ck.read_raw(key)
            if code == "BF16":
                arr = from_bfloat16_bits(arr)
            part = m["part"].replace(".weight", "").replace("embedding_", "")
            parts.setdefault(m["module"], {})[part] = (key, code, np.asarray(arr, np.float64))
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules = {}
    for mod, p in parts.items():
        name = mod.removeprefix(_PREFIX)
        rk, ak = pattern_key(rp, name), pattern_key(ap, name)
        r = rp[rk] if rk is not None else cfg["r"]
        alpha = ap[ak] if ak is not None else cfg["lora_alpha"]
        modules[name] = dict(a_key=p["lora_A"][0], a_code=p["lora_A"][1], A=p["lora_A"][2],
                             b_key=p["lora_B"][0], b_code=p["lora_B"][1], B=p["lora_B"][2],
                             r=int(r), scale=lora_scale(alpha, int(r), rule))
    return dict(path=folder, config=cfg, rule=rule, modules=modules, other=other, order=order)


def write_whole(raw: dict, out_dir, config: dict, factors: dict, force: bool) -> None:
    keyed = {}
    for name, (a, b) in factors.items():
        m = raw["modules"][name]
        keyed[m["a_key"]], keyed[m["b_key"]] = a, b
    tensors = {k: keyed[k] if k in keyed else raw["other"][k] for k in raw["order"]}
    with atomic_output_dir(out_dir, force, inputs=(raw["path"],)) as tmp:
        save_tensors(tmp / WEIGHTS_NAME, tensors)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for f in sorted(raw["path"].iterdir()):
            if f.is_file() and f.name not in (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin") \
                    and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)


def convert_whole(adapter, out_dir, *, rule: str, alpha=None, force: bool = False) -> dict:
    raw = read_whole(adapter)
    cfg = raw["config"]
    if alpha is None:
        alpha = cfg["lora_alpha"] * _rule_factor(cfg["r"], raw["rule"], rule)
    ranks = {n: m["r"] for n, m in raw["modules"].items()}
    config, scales = uniform_config(cfg, ranks, float(alpha), rule)
    factors = {}
    for name, m in raw["modules"].items():
        ratio = m["scale"] / scales[name]
        factors[name] = (narrow(m["A"], m["a_code"], "A"),
                         narrow(m["B"] * ratio, m["b_code"], "B"))
    write_whole(raw, out_dir, config, factors, force)
    return config


def resize_whole(adapter, out_dir, *, rank=None, tol=None, energy=None, max_rank=None,
                 force: bool = False) -> tuple[dict, list]:
    """Returns the config and ``[(module, new rank, energy kept, error, norm)]``."""
    raw = read_whole(adapter)
    plans = {n: _plan_module(_Module(m["A"], m["B"], m["r"], rank, tol, energy, max_rank))
             for n, m in raw["modules"].items()}
    ranks = {n: p[3] for n, p in plans.items()}
    config, scales = uniform_config(raw["config"], ranks, float(raw["config"]["lora_alpha"]),
                                    raw["rule"])
    factors, reports = {}, []
    for name, (L, S, Rt, k) in plans.items():
        m = raw["modules"][name]
        factor = m["scale"] / scales[name]
        if k == m["r"]:
            a, b = narrow(m["A"], m["a_code"], "A"), narrow(m["B"] * factor, m["b_code"], "B")
        else:
            A, B = truncate(L, S, Rt, k, factor)
            a, b = narrow(A, m["a_code"], "A"), narrow(B, m["b_code"], "B")
        factors[name] = (a, b)
        t = _tail_energy(S)
        rel = t[min(k, S.size)] / t[0] if t[0] > 0 else 0.0
        reports.append((name, k, 1.0 - rel, math.sqrt(rel), abs(m["scale"]) * math.sqrt(t[0])))
    write_whole(raw, out_dir, config, factors, force)
    return config, reports

