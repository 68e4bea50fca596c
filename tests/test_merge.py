import numpy as np
import pytest

import rslora
from testutil import tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d_out,d_in,r", [(8, 6, 2), (65, 33, 7), (3, 100, 1), (40, 40, 40)])
def test_merge_matches_reference_and_unmerge_restores(rng, dtype, d_out, d_in, r):
    W0 = rng.standard_normal((d_out, d_in)).astype(dtype)
    A = rng.standard_normal((r, d_in)).astype(dtype)
    B = rng.standard_normal((d_out, r)).astype(dtype)
    s = rslora.scale(16, r)
    W = W0.copy()
    ret = rslora.merge(W, A, B, alpha=16)
    assert ret is W
    ref = W0.astype(np.float64) + s * B.astype(np.float64) @ A.astype(np.float64)
    np.testing.assert_allclose(W, ref, rtol=tol(dtype), atol=tol(dtype) * np.abs(ref).max())
    rslora.unmerge(W, A, B, alpha=16)
    np.testing.assert_allclose(W, W0, rtol=tol(dtype), atol=4 * tol(dtype) * np.abs(ref).max())


@pytest.mark.parametrize("layout", ["fortran", "strided"])
def test_merge_in_place_on_other_layouts(rng, layout):
    W0 = rng.standard_normal((12, 10))
    A = rng.standard_normal((3, 10))
    B = rng.standard_normal((12, 3))
    if layout == "fortran":
        W = np.asfortranarray(W0.copy())
        base = W
    else:
        base = np.zeros((12, 30))
        base[:, ::3] = W0
        W = base[:, ::3]
    rslora.merge(W, A, B, scale=0.5)
    np.testing.assert_allclose(W, W0 + 0.5 * B @ A, rtol=1e-13, atol=1e-13)
    if layout == "strided":
        assert (base[:, 1::3] == 0).all() and (base[:, 2::3] == 0).all()


def test_merge_equals_forward(rng):
    # x @ merge(W).T == lora_linear(x, W, A, B): the layer and the merged weight agree.
    x = rng.standard_normal((5, 16))
    W = rng.standard_normal((7, 16))
    A = rng.standard_normal((4, 16))
    B = rng.standard_normal((7, 4))
    y = rslora.lora_linear(x, W, A, B, alpha=8, rule="standard")
    Wm = rslora.merge(W.copy(), A, B, alpha=8, rule="standard")
    np.testing.assert_allclose(x @ Wm.T, y, rtol=1e-12, atol=1e-12)


def test_merge_zero_rank_leaves_w(rng):
    W = rng.standard_normal((4, 3))
    W0 = W.copy()
    rslora.merge(W, np.zeros((0, 3)), np.zeros((4, 0)), alpha=16)
    np.testing.assert_array_equal(W, W0)


def test_merge_rejects_bad_input(rng):
    W = rng.standard_normal((4, 3))
    A = rng.standard_normal((2, 3))
    B = rng.standard_normal((4, 2))
    with pytest.raises(TypeError, match="W must be a NumPy array"):
        rslora.merge(W.tolist(), A, B, scale=1.0)
    with pytest.raises(ValueError, match="read-only"):
        Wr = W.copy()
        Wr.flags.writeable = False
        rslora.merge(Wr, A, B, scale=1.0)
    with pytest.raises(ValueError, match=r"A has shape \(2, 5\) but W has d_in=3"):
        rslora.merge(W, np.zeros((2, 5)), B, scale=1.0)
    with pytest.raises(ValueError, match=r"B has shape \(4, 3\)"):
        rslora.merge(W, A, np.zeros((4, 3)), scale=1.0)
    with pytest.raises(TypeError, match="A is float32 but W is float64"):
        rslora.merge(W, A.astype(np.float32), B, scale=1.0)
    with pytest.raises(ValueError, match="W overlaps B"):
        big = np.zeros((4, 5))
        rslora.merge(big[:, :3], np.zeros((2, 3)), big[:, 3:], scale=1.0) if False else \
            rslora.merge(big[:, :2], np.zeros((2, 2)), big[:, 1:3], scale=1.0)
    with pytest.raises(ValueError, match="not both"):
        rslora.merge(W, A, B, scale=1.0, alpha=2.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        rslora.merge(W.astype(np.int64), A.astype(np.int64), B.astype(np.int64), scale=1.0)
