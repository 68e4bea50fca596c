"""LoRALinear against PEFT's own LoRA Linear layer and against the functions it wraps."""

from __future__ import annotations

import numpy as np
import pytest

import rslora
from rslora import LoRALinear


def arrays(rng, d_in=12, d_out=9, r=4, dtype=np.float64):
    W = rng.standard_normal((d_out, d_in)).astype(dtype)
    A = rng.standard_normal((r, d_in)).astype(dtype)
    B = rng.standard_normal((d_out, r)).astype(dtype)
    b = rng.standard_normal(d_out).astype(dtype)
    return W, A, B, b


def peft_layer(W, A, B, b, alpha, use_rslora):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    base = torch.nn.Linear(W.shape[1], W.shape[0], bias=True, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(torch.tensor(W))
        base.bias.copy_(torch.tensor(b))
    cfg = LoraConfig(r=A.shape[0], lora_alpha=alpha, use_rslora=use_rslora, lora_dropout=0.0)
    layer = Linear(base, "default", config=cfg, r=A.shape[0], lora_alpha=alpha,
                   use_rslora=use_rslora, lora_dropout=0.0)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor(A))
        layer.lora_B["default"].weight.copy_(torch.tensor(B))
    return torch, layer


@pytest.mark.parametrize("rule", ["rslora", "standard"])
def test_matches_peft_forward_backward_merge(rule):
    rng = np.random.default_rng(0)
    W, A, B, b = arrays(rng)
    torch, ref = peft_layer(W, A, B, b, alpha=16, use_rslora=rule == "rslora")
    ours = LoRALinear(W, A, B, bias=b, alpha=16, rule=rule)
    assert ours.scaling == ref.scaling["default"]
    x = rng.standard_normal((2, 5, 12))
    dy = rng.standard_normal((2, 5, 9))
    tx = torch.tensor(x, requires_grad=True)
    ty = ref(tx)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(ours.forward(x), ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = ours.backward(dy)
    np.testing.assert_allclose(g.dx, tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.lora_A, ref.lora_A["default"].weight.grad.numpy(), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(g.lora_B, ref.lora_B["default"].weight.grad.numpy(), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(ours.get_delta_weight(), ref.get_delta_weight("default").detach().numpy(),
                               rtol=1e-12, atol=1e-12)
    ours.merge()
    ref.merge()
    np.testing.assert_allclose(ours.weight, ref.base_layer.weight.detach().numpy(), rtol=1e-12,
                               atol=1e-12)
    with torch.no_grad():
        np.testing.assert_allclose(ours.forward(x), ref(torch.tensor(x)).numpy(), rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thin_over_the_functions(dtype):
    rng = np.random.default_rng(1)
    W, A, B, b = arrays(rng, dtype=dtype)
    layer = LoRALinear(W, A, B, bias=b, scale=0.75)
    x = rng.standard_normal((7, 12)).astype(dtype)
    dy = rng.standard_normal((7, 9)).astype(dtype)
    # The packed layer's forward is one GEMM over [W; A] where lora_linear makes two: the same
    # sums, but a BLAS may order an edge tile's products differently (OpenBLAS's Nehalem kernels
    # do), so the two agree to float rounding, each with the float64 result to the same bound.
    y = layer(x)
    x64, W64, A64, B64 = (t.astype(np.float64) for t in (x, W, A, B))
    want = x64 @ W64.T + 0.75 * (x64 @ A64.T) @ B64.T + b
    eps = np.finfo(dtype).eps
    bound = 4 * 12 * eps * (np.abs(x64) @ np.abs(W64).T + 0.75 * (np.abs(x64) @ np.abs(A64).T)
                            @ np.abs(B64).T + np.abs(b))
    for got in (y, rslora.lora_linear(x, W, A, B, scale=0.75, bias=b)):
        assert (np.abs(got - want) <= bound).all()
    for got, want_g in zip(layer.backward(dy),
                           rslora.lora_linear_backward(dy, x, W, A, B, scale=0.75)):
        np.testing.assert_allclose(got, want_g, rtol=16 * eps, atol=16 * eps * np.abs(want_g).max())
    g = layer.backward(dy, need=("B",))
    assert g.dx is None and g.lora_A is None and g.lora_B.shape == (9, 4)


def test_merge_unmerge_state():
    rng = np.random.default_rng(2)
    W, A, B, b = arrays(rng)
    layer = LoRALinear(W, A, B, bias=b, alpha=8.0)
    x = rng.standard_normal((3, 12))
    y = layer.forward(x)
    assert layer.merge() is layer and layer.merged
    np.testing.assert_array_equal(W, arrays(np.random.default_rng(2))[0])  # caller's W untouched
    np.testing.assert_allclose(layer.forward(x), y, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal((3, 9))
    dx = layer.backward(dy, need="x").dx  # merged: dx through the merged weight
    np.testing.assert_allclose(dx, dy @ layer.weight, rtol=1e-12)
    with pytest.raises(RuntimeError, match="merged: unmerge"):
        layer.backward(dy)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    np.testing.assert_allclose(layer.weight, W, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    with pytest.raises(RuntimeError, match="needs a forward"):
        layer.backward(dy)  # merge/unmerge drop the cached activations


def test_state_dict_round_trip_and_repr():
    rng = np.random.default_rng(3)
    W, A, B, b = arrays(rng)
    layer = LoRALinear(W, A, B, bias=b, alpha=16, rule="standard").merge()
    sd = layer.state_dict()
    assert set(sd) == {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}
    np.testing.assert_allclose(sd["base_layer.weight"], W, rtol=1e-12, atol=1e-12)
    back = LoRALinear.from_state_dict(sd, alpha=16, rule="standard")
    x = rng.standard_normal((4, 12))
    np.testing.assert_allclose(back(x), layer(x), rtol=1e-12, atol=1e-12)
    text = repr(back)
    for part in ("in_features=12", "out_features=9", "r=4", "alpha=16", "'standard'",
                 "scaling=4.0", "merged=False", "float64"):
        assert part in text


def test_init_like_peft():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((6, 100)).astype(np.float32)
    layer = LoRALinear.init(W, 8, seed=0)
    assert layer.lora_A.dtype == np.float32 and layer.lora_A.shape == (8, 100)
    assert np.all(layer.lora_B == 0) and np.abs(layer.lora_A).max() <= 0.1
    assert layer.scaling == rslora.scale(8.0, 8)
    x = rng.standard_normal((3, 100)).astype(np.float32)
    np.testing.assert_allclose(layer(x), x @ W.T, rtol=1e-5)  # B = 0: the base layer at first


def test_bad_construction():
    rng = np.random.default_rng(5)
    W, A, B, b = arrays(rng)
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 11\)"):
        LoRALinear(W, A[:, :11], B, alpha=1.0)
    with pytest.raises(ValueError, match=r"lora_B has shape \(9, 3\)"):
        LoRALinear(W, A, B[:, :3], alpha=1.0)
    with pytest.raises(ValueError, match=r"bias has shape \(8,\)"):
        LoRALinear(W, A, B, bias=b[:8], alpha=1.0)
    with pytest.raises(TypeError, match="lora_A is float32 but weight is float64"):
        LoRALinear(W, A.astype(np.float32), B, alpha=1.0)
    with pytest.raises(ValueError, match="not both"):
        LoRALinear(W, A, B, alpha=1.0, scale=2.0)
    layer = LoRALinear(W, A, B, alpha=1.0)
    with pytest.raises(TypeError, match="float32 but W is float64|x is float32"):
        layer(np.zeros((2, 12), np.float32))


@pytest.mark.parametrize("r,err", [(0, ValueError), (-1, ValueError), (2**63, ValueError),
                                   (2.5, TypeError), (True, TypeError)])
def test_init_rank_is_range_checked(r, err):
    with pytest.raises(err, match="^r must be"):
        LoRALinear.init(np.zeros((4, 3)), r)
