"""rslora against PEFT itself: adapters PEFT saves load in rslora with PEFT's scales, forward and
merged weights; adapters rslora extracts load in PEFT and merge to the same weights."""

from __future__ import annotations

import numpy as np
import pytest

import rslora
import rslora.cli

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from safetensors.numpy import save_file  # noqa: E402

nn = torch.nn
EPS32 = np.finfo(np.float32).eps


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d + 4)
        self.v_proj = nn.Linear(d + 4, d, bias=False)
        self.mlp = nn.ModuleDict({"up": nn.Linear(d, 2 * d), "down": nn.Linear(2 * d, d)})

    def forward(self, x):
        x = x + self.v_proj(torch.tanh(self.q_proj(x)))
        return x + self.mlp["down"](torch.relu(self.mlp["up"](x)))


class Net(nn.Module):
    def __init__(self, d=16, n=3):
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def numpy_state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


TARGETS = ["q_proj", "v_proj", "up", "down"]
CASES = {
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "standard": dict(r=4, lora_alpha=8, use_rslora=False),
    # Overlapping patterns: PEFT takes the first key (in the file's order) that matches as a
    # dotted suffix / regex; "layers.1.q_proj" is matched by both keys below.
    "patterns": dict(r=4, lora_alpha=8, use_rslora=True,
                     rank_pattern={r"layers\.1\.q_proj": 6, "1.mlp.up": 2, "q_proj": 3},
                     alpha_pattern={"v_proj": 5, r"layers\.[02]\.mlp\.down": 1.5}),
    "patterns-standard": dict(r=2, lora_alpha=3, use_rslora=False,
                              rank_pattern={"down": 5}, alpha_pattern={"up": 7}),
}


def save_peft_adapter(path, case, seed=0):
    """A PEFT adapter with random (non-zero) lora_A and lora_B, saved by save_pretrained."""
    model = peft.get_peft_model(make_net(seed), peft.LoraConfig(target_modules=TARGETS,
                                                                **CASES[case]))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    return path


def peft_lora_layers(pm) -> dict:
    """{module name in the base model: PEFT's LoRA Linear layer}."""
    from peft.tuners.lora import Linear

    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in pm.named_modules() if isinstance(m, Linear)}


def load_in_peft(path, seed=0):
    return peft.PeftModel.from_pretrained(make_net(seed), str(path)).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_scales_factors_forward(tmp_path, case):
    path = save_peft_adapter(tmp_path / "a", case)
    ours = rslora.load_adapter(path)
    pm = load_in_peft(path)
    layers = peft_lora_layers(pm)
    assert set(ours) == set(layers) and len(layers) == 12
    rng = np.random.default_rng(3)
    for name, layer in layers.items():
        mod = ours[name]
        assert mod.r == layer.r["default"]
        assert mod.scale == layer.scaling["default"]  # same float64 formula, bit for bit
        np.testing.assert_array_equal(mod.A, layer.lora_A["default"].weight.detach().numpy())
        np.testing.assert_array_equal(mod.B, layer.lora_B["default"].weight.detach().numpy())
        W = layer.base_layer.weight.detach().numpy()
        b = layer.base_layer.bias
        b = None if b is None else b.detach().numpy()
        x = rng.standard_normal((7, W.shape[1])).astype(np.float32)
        with torch.no_grad():
            y_peft = layer(torch.from_numpy(x)).numpy()
        y = rslora.lora_linear(x, W, mod.A, mod.B, scale=mod.scale, bias=b)
        ref = (x.astype(np.float64) @ W.T.astype(np.float64) + (0 if b is None else b)
               + mod.scale * (x @ mod.A.T.astype(np.float64)) @ mod.B.T.astype(np.float64))
        tol = 16 * EPS32 * (np.abs(x) @ np.abs(W.T) + mod.scale * (np.abs(x) @ np.abs(mod.A.T))
                            @ np.abs(mod.B.T) + 1)
        assert np.all(np.abs(y - ref) <= tol)
        assert np.all(np.abs(y_peft - ref) <= tol)


def test_patterns_follow_the_file_order(tmp_path):
    # layers.1.q_proj: the first key in the saved file that matches wins, as in PEFT.
    ours = rslora.load_adapter(save_peft_adapter(tmp_path / "a", "patterns"))
    cfg = ours.config["rank_pattern"]
    first = next(k for k in cfg if k in (r"layers\.1\.q_proj", "q_proj"))
    assert ours["layers.1.q_proj"].r == cfg[first]
    assert ours["layers.0.q_proj"].r == 3 and ours["layers.1.mlp.up"].r == 2
    assert ours["layers.0.mlp.up"].r == 4
    assert ours["layers.2.mlp.down"].alpha == 1.5 and ours["layers.1.mlp.down"].alpha == 8


@pytest.mark.parametrize("case", ["rslora", "standard", "patterns"])
def test_merge_matches_peft_merge_and_unload(tmp_path, case):
    path = save_peft_adapter(tmp_path / "a", case, seed=5)
    base = numpy_state(make_net(5))
    merged_peft = numpy_state(load_in_peft(path, seed=5).merge_and_unload())
    ours = rslora.merge_adapter({k: v.copy() for k, v in base.items()}, path)
    adapter = rslora.load_adapter(path)
    assert set(ours) == set(merged_peft)
    for key, W in ours.items():
        name = key.rsplit(".", 1)[0]
        if name not in adapter or not key.endswith(".weight"):
            np.testing.assert_array_equal(W, merged_peft[key])
            continue
        m = adapter[name]
        ref = base[key].astype(np.float64) + m.scale * (m.B.astype(np.float64) @ m.A)
        tol = 8 * EPS32 * (np.abs(base[key]) + m.scale * np.abs(m.B) @ np.abs(m.A))
        assert np.all(np.abs(W - ref) <= tol), key
        assert np.all(np.abs(merged_peft[key] - ref) <= tol), key


def test_merge_checkpoint_from_disk_matches_peft(tmp_path):
    path = save_peft_adapter(tmp_path / "a", "patterns", seed=2)
    base = numpy_state(make_net(2))
    save_file(base, tmp_path / "model.safetensors")
    assert rslora.cli.main(["merge", str(tmp_path / "model.safetensors"), str(path), "-o",
                            str(tmp_path / "merged"), "-q"]) == 0
    merged = rslora.Checkpoint(tmp_path / "merged")
    merged_peft = numpy_state(load_in_peft(path, seed=2).merge_and_unload())
    assert set(merged.keys()) == set(merged_peft)
    for key in merged.keys():
        np.testing.assert_allclose(merged.read(key), merged_peft[key], rtol=1e-5, atol=1e-6)


def low_rank_tuned(base: dict, ranks: dict, seed=0) -> dict:
    """base + a rank-ranks[module] update on the named weights."""
    rng = np.random.default_rng(seed)
    tuned = {k: v.copy() for k, v in base.items()}
    for name, k in ranks.items():
        W = tuned[f"{name}.weight"]
        tuned[f"{name}.weight"] = (W + (rng.standard_normal((W.shape[0], k))
                                        @ rng.standard_normal((k, W.shape[1]))) * 0.05
                                   ).astype(np.float32)
    tuned["layers.0.q_proj.bias"] += 1.0  # a 1-D change: not part of a LoRA adapter
    return tuned


@pytest.mark.parametrize("rule", ["rslora", "standard"])
@pytest.mark.parametrize("mode", ["rank", "tol"])
def test_extracted_adapter_loads_in_peft(tmp_path, rule, mode):
    base = numpy_state(make_net(1))
    ranks = {"layers.0.q_proj": 3, "layers.1.mlp.up": 5, "layers.2.v_proj": 2, "head": 3,
             "layers.1.q_proj": 3}
    tuned = low_rank_tuned(base, ranks)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    out = tmp_path / "adapter"
    how = ["--rank", "5"] if mode == "rank" else ["--tol", "1e-4"]
    assert rslora.cli.main(["extract", str(tmp_path / "base.safetensors"),
                            str(tmp_path / "tuned.safetensors"), "-o", str(out), "-q",
                            "--rule", rule, "--alpha", "7", *how]) == 0
    adapter = rslora.load_adapter(out)
    assert set(adapter) == set(ranks)  # unchanged weights are left out
    cfg = adapter.config
    assert cfg["use_rslora"] == (rule == "rslora") and cfg["lora_alpha"] == 7
    if mode == "tol":  # the smallest rank meeting the tolerance: the true rank
        assert {n: m.r for n, m in adapter.modules.items()} == ranks
        assert cfg["r"] == 3 and set(cfg["rank_pattern"]) == {"layers.1.mlp.up", "layers.2.v_proj"}
    pm = load_in_peft(out, seed=1)
    layers = peft_lora_layers(pm)
    assert set(layers) == set(ranks)
    for name, layer in layers.items():
        assert layer.scaling["default"] == adapter[name].scale
    merged_peft = numpy_state(pm.merge_and_unload())
    ours = rslora.merge_adapter({k: v.copy() for k, v in base.items()}, adapter)
    for key in base:
        np.testing.assert_allclose(ours[key], merged_peft[key], rtol=1e-5, atol=1e-6)
        if key.endswith(".weight"):  # the merged weights are the tuned ones
            np.testing.assert_allclose(ours[key], tuned[key], rtol=1e-4, atol=1e-5)


def test_extracted_bfloat16_adapter_loads_in_peft(tmp_path):
    base = numpy_state(make_net(4))
    tuned = low_rank_tuned(base, {"layers.0.mlp.down": 2, "head": 1}, seed=4)
    torch_save = pytest.importorskip("safetensors.torch").save_file
    # bf16 checkpoints in, bf16 adapter out
    torch_save({k: torch.from_numpy(v).bfloat16() for k, v in base.items()}, tmp_path / "b.safetensors")
    torch_save({k: torch.from_numpy(v).bfloat16() for k, v in tuned.items()}, tmp_path / "t.safetensors")
    out = tmp_path / "adapter"
    assert rslora.cli.main(["extract", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"),
                            "-o", str(out), "--rank", "2", "--dtype", "bfloat16", "-q"]) == 0
    assert rslora.Checkpoint(out / "adapter_model.safetensors").dtype(
        "base_model.model.head.lora_A.weight") == "BF16"
    adapter = rslora.load_adapter(out)
    pm = load_in_peft(out, seed=4)
    merged_peft = numpy_state(pm.merge_and_unload())
    ours = rslora.merge_adapter({k: v.copy() for k, v in base.items()}, adapter)
    for key in base:
        np.testing.assert_allclose(ours[key], merged_peft[key], rtol=1e-5, atol=1e-6)
