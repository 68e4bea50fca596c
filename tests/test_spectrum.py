"""lora_from_delta and spectrum against float64 LAPACK and PEFT's own scaling."""

from __future__ import annotations

import numpy as np
import pytest

import rslora
from testutil import make, style


def best_rank(M, r):
    U, s, Vt = np.linalg.svd(M.astype(np.float64), full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vt[:r], s


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
@pytest.mark.parametrize("kw, s", [
    ({}, 1.0),
    ({"alpha": 16}, 16 / np.sqrt(8)),
    ({"alpha": 16, "rule": "standard"}, 2.0),
    ({"scale": 0.25}, 0.25),
    ({"scale": -3.0}, -3.0),
])
def test_lora_from_delta_rank(dtype, shape, kw, s):
    d_out, d_in = shape
    delta = make(d_out, d_in, style(min(shape)), dtype, seed=1)
    A, B = rslora.lora_from_delta(delta, 8, seed=0, **kw)
    assert A.shape == (8, d_in) and B.shape == (d_out, 8)  # PEFT: lora_A (r, d_in), lora_B (d_out, r)
    assert A.dtype == B.dtype == dtype
    ref, sv = best_rank(delta, 8)
    approx = s * B.astype(np.float64) @ A.astype(np.float64)
    # randomized: 5 subspace iterations leave (s_18 / s_8)^11 ~ 1e-6 of the neighbours in
    tol = 1e-5 if dtype == np.float32 else 1e-6
    assert np.abs(approx - ref).max() <= tol * sv[0]
    # singular values split evenly: A A^T = B^T B = diag(S / |s|)
    AAt, BtB = A.astype(np.float64) @ A.T, B.T.astype(np.float64) @ B
    assert np.allclose(AAt, BtB, atol=tol * sv[0] / abs(s))
    assert np.allclose(np.diag(AAt), sv[:8] / abs(s), rtol=10 * tol)


def test_lora_from_delta_tol():
    s = style(120)
    delta = make(150, 120, s, np.float64, seed=2)
    A, B = rslora.lora_from_delta(delta, tol=0.05, alpha=8, seed=3)
    r = A.shape[0]
    scale = rslora.scale(8, r)
    err = np.linalg.norm(delta - scale * B @ A) / np.linalg.norm(delta)
    assert err <= 0.05
    tail = np.sqrt(np.cumsum((s ** 2)[::-1])[::-1]) / np.linalg.norm(s)
    assert tail[r - 1] > 0.05  # one rank fewer would not do
    A2, B2 = rslora.lora_from_delta(delta, tol=0.05, max_rank=5, seed=3)
    assert A2.shape == (5, 120) and B2.shape == (150, 5)


def test_lora_from_delta_zero_delta_with_tol():
    A, B = rslora.lora_from_delta(np.zeros((20, 30), np.float32), tol=0.1, alpha=16)
    assert A.shape == (0, 30) and B.shape == (20, 0) and A.dtype == np.float32


def test_lora_from_delta_matches_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    d_out, d_in, r, alpha = 48, 40, 4, 16
    delta = make(d_out, d_in, style(40), np.float32, seed=4)
    A, B = rslora.lora_from_delta(delta, r, alpha=alpha, rule="rslora", seed=0)
    base = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False))
    W0 = base[0].weight.detach().numpy().copy()
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, target_modules=["0"])
    model = peft.get_peft_model(base, cfg)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
    merged = model.merge_and_unload()[0].weight.detach().numpy()
    ref, sv = best_rank(delta, r)
    assert np.abs((merged - W0) - ref).max() <= 1e-5 * sv[0]


@pytest.mark.parametrize("kw, err, msg", [
    ({}, ValueError, "exactly one of r= .* and tol="),
    ({"r": 3, "tol": 0.1}, ValueError, "exactly one of"),
    ({"r": 3, "max_rank": 4}, ValueError, "max_rank= goes with tol="),
    ({"r": 3, "alpha": 8, "scale": 1.0}, ValueError, "not both"),
    ({"r": 3, "scale": 0.0}, ValueError, "scale is 0"),
    ({"r": 3, "rule": "linear", "alpha": 4}, ValueError, "rule must be"),
    ({"r": 0}, ValueError, "r must be in"),
    ({"tol": 1.5}, ValueError, "tol must be in"),
])
def test_lora_from_delta_bad(kw, err, msg):
    with pytest.raises(err, match=msg):
        rslora.lora_from_delta(np.ones((10, 12), np.float32), **kw)
    with pytest.raises(TypeError, match="float32 or float64"):
        rslora.lora_from_delta(np.ones((10, 12), np.int64), 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_spectrum_full(dtype):
    M = make(70, 50, (1.0 + np.arange(50)) ** -0.5, dtype, seed=5)
    sp = rslora.spectrum(M)
    M64 = M.astype(np.float64)
    s_ref = np.linalg.svd(M64, compute_uv=False)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert sp.singular_values.dtype == dtype and len(sp) == 50
    assert np.allclose(sp.singular_values, s_ref, rtol=tol, atol=tol * s_ref[0])
    assert sp.total_energy == pytest.approx(np.sum(M64 ** 2), rel=1e-12)  # exact, from M
    share_ref = np.cumsum(s_ref ** 2) / np.sum(M64 ** 2)
    assert np.allclose(sp.energy, share_ref, atol=10 * tol)
    assert np.all(np.diff(sp.energy) >= 0)
    for share in (0.1, 0.5, 0.9, 0.99):
        r = sp.rank_for(share)
        assert share_ref[r - 1] >= share * (1 - 1e-6) and (r == 1 or share_ref[r - 2] < share)
    assert sp.rank_for(1.0) == 50
    assert "Spectrum(k=50" in repr(sp)


def test_spectrum_low_rank_and_zero():
    M = make(40, 30, np.array([5.0, 1.0, 0.1]), np.float32, seed=6)
    assert rslora.spectrum(M).rank_for(1.0) == 3
    z = rslora.spectrum(np.zeros((5, 4)))
    assert z.total_energy == 0 and z.rank_for(0.5) == 0


def test_spectrum_top_k():
    M = make(200, 150, style(150), np.float64, seed=7)
    sp = rslora.spectrum(M, 20, seed=1)
    s_ref = np.linalg.svd(M, compute_uv=False)
    assert len(sp) == 20
    assert np.allclose(sp.singular_values, s_ref[:20], rtol=1e-8)
    assert sp.total_energy == pytest.approx(np.sum(s_ref ** 2), rel=1e-12)
    assert sp.rank_for(0.9) == int(np.searchsorted(np.cumsum(s_ref ** 2) / np.sum(s_ref ** 2), 0.9) + 1)
    with pytest.raises(ValueError, match="larger k"):
        sp.rank_for(0.999999)


@pytest.mark.parametrize("share, err", [(0.0, ValueError), (1.2, ValueError), (-1, ValueError),
                                        ("half", TypeError)])
def test_rank_for_bad(share, err):
    with pytest.raises(err, match="share"):
        rslora.spectrum(np.eye(3)).rank_for(share)


def test_spectrum_bad_input():
    with pytest.raises(TypeError, match="M must be float32 or float64"):
        rslora.spectrum(np.ones((3, 3), np.complex128))
    with pytest.raises(ValueError, match="M must be 2-D"):
        rslora.spectrum(np.ones(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        rslora.spectrum(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="NaN or Inf"):
        rslora.spectrum(np.full((30, 30), np.inf), 3)


@pytest.mark.parametrize("r", [0, 6, -1])
def test_lora_from_delta_rank_out_of_range_names_r(r):
    with pytest.raises(ValueError, match=r"r must be in \[1, min\(d_out, d_in\)\] = \[1, 5\]"):
        rslora.lora_from_delta(np.ones((6, 5)), r)
