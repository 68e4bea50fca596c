"""Tiny transformers models built from configs (random weights, nothing downloaded) with PEFT LoRA
adapters on them, for the convert/resize tests: save an adapter as PEFT does, load one back into
PEFT strictly (no missing or unexpected LoRA keys), and read PEFT's own per-module updates."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Storage rounding of one factor (relative, per element) -> relative error of the update.
TOL = {"float32": 4e-7, "float16": 2e-3, "bfloat16": 1.6e-2}

CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

#: LoRA targets per model: Linear + embedding (Llama), Conv1D (fan_in_fan_out) + embedding (GPT-2).
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
           "gpt2": ["c_attn", "c_proj", "wte"]}


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=40,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=32)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def make_adapter(path, kind: str, dtype: str = "float32", seed: int = 0, scale: float = 0.3,
                 **lora) -> Path:
    """A PEFT adapter with random non-zero factors (and modules_to_save copies), saved by PEFT."""
    lora.setdefault("target_modules", TARGETS[kind])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out for Conv1D, embedding layers saved
        pm = peft.get_peft_model(tiny_model(kind, seed), peft.LoraConfig(**lora))
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        pm.to(TORCH_DTYPES[dtype])
        pm.save_pretrained(str(path))
    return Path(path)


def load_strict(path, kind: str, seed: int = 0):
    """The adapter at ``path`` on a fresh tiny model, in float64; asserts PEFT finds every LoRA
    and modules_to_save tensor it expects and nothing else."""
    from safetensors.torch import load_file

    cfg = peft.LoraConfig.from_pretrained(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_model(kind, seed), cfg)
        state = load_file(str(Path(path) / "adapter_model.safetensors"))
        res = peft.set_peft_model_state_dict(pm, state)
    assert not res.unexpected_keys, res.unexpected_keys
    missing = [k for k in res.missing_keys if "lora_" in k or "modules_to_save" in k]
    assert not missing, missing
    return pm.double().eval()


def peft_deltas(pm) -> dict:
    """{module: PEFT's scale * B @ A in float64} for every LoRA layer of ``pm``."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        if "default" in mod.lora_A:
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        else:
            A, B = mod.lora_embedding_A["default"], mod.lora_embedding_B["default"]
        s = mod.scaling["default"]
        out[name[len("base_model.model."):]] = s * (B.double() @ A.double()).detach().numpy()
    return out


def logits(pm, seed: int = 3) -> np.ndarray:
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pm(input_ids=ids).logits.double().numpy()


def read_factors(path) -> dict:
    """{tensor key: (float64 array, safetensors dtype code)} of an adapter file, via torch."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            t = f.get_tensor(k)
            code = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                    torch.float64: "F64"}[t.dtype]
            out[k] = (t.double().numpy(), code)
    return out


def read_config(path) -> dict:
    return json.loads((Path(path) / "adapter_config.json").read_text())


def module_products(path) -> dict:
    """{module: B @ A in float64} read from the files (no scale)."""
    t = read_factors(path)
    out = {}
    for k, (a, _) in t.items():
        for part_a, part_b in ((".lora_A.weight", ".lora_B.weight"),
                               (".lora_embedding_A", ".lora_embedding_B")):
            if k.endswith(part_a):
                mod = k[: -len(part_a)][len("base_model.model."):]
                out[mod] = t[k[: -len(part_a)] + part_b][0] @ a
    return out


def uniform_deltas(path) -> dict:
    """What a client that ignores rank_pattern, alpha_pattern (and applies the top-level
    ``lora_alpha / r``, or ``/ sqrt(r)`` with use_rslora) computes for every module."""
    cfg = read_config(path)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / np.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return {m: s * p for m, p in module_products(path).items()}


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
