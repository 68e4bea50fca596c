"""LoRALinear's packed forward ([W; A] in one buffer, two GEMMs; issue 13 item 4).

Against float64 references: the output equals lora_linear's (and the NumPy expression) to
rounding for batch dims, bias or none, both dtypes; merge/unmerge act on the packed weight; a
rebound weight or lora_A falls back to the three-GEMM path instead of using a stale buffer.
"""

import numpy as np
import pytest

from rslora import lora_linear
from rslora.layer import LoRALinear


def _case(rng, d_out, d_in, r, dtype, bias):
    W = rng.standard_normal((d_out, d_in)).astype(dtype)
    A = (rng.standard_normal((r, d_in)) / np.sqrt(d_in)).astype(dtype)
    B = rng.standard_normal((d_out, r)).astype(dtype)
    b = rng.standard_normal(d_out).astype(dtype) if bias else None
    return W, A, B, b


def _reference(x, W, A, B, b, s):
    x, W, A, B = (np.asarray(a, np.float64) for a in (x, W, A, B))
    y = x @ W.T + s * (x @ A.T) @ B.T
    return y if b is None else y + b.astype(np.float64)


def _tol(dtype, x, W, A, B, s):
    # forward error of a dot product of length d_in (or r): ~ d u sum|x_i||w_i|
    u = np.finfo(dtype).eps
    x64 = np.abs(np.asarray(x, np.float64))
    bound = x64 @ np.abs(W.astype(np.float64)).T
    bound += abs(s) * (x64 @ np.abs(A.astype(np.float64)).T) @ np.abs(B.astype(np.float64)).T
    return 4 * (W.shape[1] + A.shape[0]) * u * bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch", [(7,), (2, 3), (), (0,)])
@pytest.mark.parametrize("dims", [(33, 20, 4), (64, 96, 1), (16, 40, 16)])
def test_packed_forward_matches(dtype, bias, batch, dims):
    rng = np.random.default_rng(hash((dtype().itemsize, bias, batch, dims)) % 2**32)
    d_out, d_in, r = dims
    W, A, B, b = _case(rng, d_out, d_in, r, dtype, bias)
    layer = LoRALinear(W, A, B, bias=b, alpha=3.0)
    assert layer._is_packed()
    assert np.shares_memory(layer.weight, layer._packed) and np.shares_memory(layer.lora_A, layer._packed)
    x = rng.standard_normal(batch + (d_in,)).astype(dtype)
    y = layer(x)
    assert y.shape == batch + (d_out,) and y.dtype == dtype
    ref = _reference(x, W, A, B, b, layer.scaling)
    assert np.all(np.abs(y - ref) <= _tol(dtype, x, W, A, B, layer.scaling) + 1e-300)
    # the same numbers as the three-GEMM op, to rounding
    y3 = lora_linear(x, W, A, B, scale=layer.scaling, bias=b)
    assert np.all(np.abs(y - y3) <= 2 * _tol(dtype, x, W, A, B, layer.scaling) + 1e-300)
    # the cached x @ A.T that backward reuses is the shrink
    _, xa = layer._cache
    x64, A64 = np.asarray(x, np.float64), A.astype(np.float64)
    bound = 4 * d_in * np.finfo(dtype).eps * (np.abs(x64) @ np.abs(A64).T)
    assert xa.shape == batch + (r,)
    assert np.all(np.abs(xa - x64 @ A64.T) <= bound + 1e-300)


def test_packed_backward_matches_unpacked():
    rng = np.random.default_rng(3)
    W, A, B, b = _case(rng, 24, 18, 5, np.float64, True)
    packed = LoRALinear(W, A, B, bias=b, scale=0.7)
    plain = LoRALinear(W, A, B, bias=b, scale=0.7, copy=False)
    assert packed._is_packed() and not plain._is_packed()
    x = rng.standard_normal((4, 6, 18))
    np.testing.assert_allclose(packed(x), plain(x), rtol=1e-13, atol=1e-13)
    dy = rng.standard_normal((4, 6, 24))
    for g1, g2 in zip(packed.backward(dy), plain.backward(dy)):
        np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-12)


def test_merge_unmerge_on_packed_buffer():
    rng = np.random.default_rng(4)
    W, A, B, b = _case(rng, 30, 22, 6, np.float64, False)
    layer = LoRALinear(W, A, B, scale=1.5)
    x = rng.standard_normal((5, 22))
    y_unmerged = layer(x).copy()
    layer.merge()
    assert layer._is_packed()  # merge works in place on the weight view
    np.testing.assert_allclose(layer._packed[:30], W + 1.5 * B @ A, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(layer._packed[30:], A)  # lora_A untouched by merge
    np.testing.assert_allclose(layer(x), y_unmerged, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight, W, rtol=0, atol=1e-13)
    sd = layer.state_dict()
    assert set(sd) == {"base_layer.weight", "lora_A.weight", "lora_B.weight"}
    assert all(sd[k].flags.c_contiguous and not np.shares_memory(sd[k], layer._packed) for k in sd)
    np.testing.assert_allclose(layer(x), y_unmerged, rtol=1e-12, atol=1e-12)


def test_in_place_updates_are_seen_and_rebinding_falls_back():
    rng = np.random.default_rng(5)
    W, A, B, b = _case(rng, 20, 12, 3, np.float64, True)
    layer = LoRALinear(W, A, B, bias=b, scale=2.0)
    x = rng.standard_normal((4, 12))
    # a training step's in-place update of lora_A reaches the packed buffer
    layer.lora_A -= 0.1
    layer.bias += 1.0
    np.testing.assert_allclose(layer(x), _reference(x, W, A - 0.1, B, b + 1.0, 2.0), rtol=1e-12,
                               atol=1e-12)
    # rebinding lora_A must not use the stale buffer
    A2 = rng.standard_normal((3, 12))
    layer.lora_A = A2
    assert not layer._is_packed()
    np.testing.assert_allclose(layer(x), _reference(x, W, A2, B, b + 1.0, 2.0), rtol=1e-12,
                               atol=1e-12)


def test_copy_false_keeps_callers_arrays():
    rng = np.random.default_rng(6)
    W, A, B, _ = _case(rng, 10, 8, 2, np.float32, False)
    layer = LoRALinear(W, A, B, scale=1.0, copy=False)
    assert layer.weight is W and layer.lora_A is A and not layer._is_packed()


def test_bad_x_rejected_like_lora_linear():
    rng = np.random.default_rng(7)
    W, A, B, _ = _case(rng, 10, 8, 2, np.float32, False)
    layer = LoRALinear(W, A, B, scale=1.0)
    with pytest.raises(ValueError, match="x"):
        layer(np.zeros((3, 9), np.float32))
    with pytest.raises(TypeError):
        layer(np.zeros((3, 8), np.int32))
