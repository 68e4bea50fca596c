"""lora_linear_backward against float64 closed forms, finite differences and torch autograd."""

from __future__ import annotations

import numpy as np
import pytest

import rslora

TOL = {np.float32: dict(rtol=2e-4, atol=2e-4), np.float64: dict(rtol=1e-11, atol=1e-11)}


def make(rng, batch, d_in, d_out, r, dtype=np.float64):
    x = rng.standard_normal(batch + (d_in,))
    W = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    A = rng.standard_normal((r, d_in)) / np.sqrt(d_in)
    B = rng.standard_normal((d_out, r))
    dy = rng.standard_normal(batch + (d_out,))
    return tuple(a.astype(dtype) for a in (dy, x, W, A, B))


def reference(dy, x, W, A, B, s):
    """The closed forms in float64, batch dims flattened."""
    f = lambda a: np.asarray(a, dtype=np.float64)
    dy, x, W, A, B = map(f, (dy, x, W, A, B))
    D, X = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    dx = (D @ W + s * (D @ B) @ A).reshape(x.shape)
    return dx, s * (D @ B).T @ X, s * D.T @ (X @ A.T)


def close(got, want, dtype):
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch,d_in,d_out,r", [((9,), 13, 7, 3), ((2, 5), 16, 24, 8),
                                                ((4, 1, 3), 5, 5, 1), ((33,), 64, 31, 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_forms(dtype, batch, d_in, d_out, r, seed):
    rng = np.random.default_rng(seed)
    dy, x, W, A, B = make(rng, batch, d_in, d_out, r, dtype)
    dx, dA, dB = rslora.lora_linear_backward(dy, x, W, A, B, scale=1.7)
    for got, want in zip((dx, dA, dB), reference(dy, x, W, A, B, 1.7)):
        assert got.dtype == dtype and got.shape == want.shape
        close(got, want, dtype)


@pytest.mark.parametrize("seed", [0, 3])
def test_finite_differences(seed):
    """Directional derivatives of L = <G, lora_linear(x, W, A, B)> in float64 match the grads.

    L is linear in each of x, A, B separately, so the central difference is exact up to rounding
    and a large step keeps that rounding small.
    """
    rng = np.random.default_rng(seed)
    G, x, W, A, B = make(rng, (3, 4), 10, 6, 4)
    bias = rng.standard_normal(6)
    s = rslora.scale(8.0, 4)

    def loss(x_, A_, B_):
        return float(np.sum(G * rslora.lora_linear(x_, W, A_, B_, scale=s, bias=bias)))

    dx, dA, dB = rslora.lora_linear_backward(G, x, W, A, B, alpha=8.0)
    h = 0.5
    for _ in range(3):
        for which, grad in (("x", dx), ("A", dA), ("B", dB)):
            args = {"x": x, "A": A, "B": B}
            V = rng.standard_normal(args[which].shape)
            plus = dict(args, **{which: args[which] + h * V})
            minus = dict(args, **{which: args[which] - h * V})
            fd = (loss(plus["x"], plus["A"], plus["B"]) - loss(minus["x"], minus["A"], minus["B"])) / (2 * h)
            assert fd == pytest.approx(float(np.sum(grad * V)), rel=1e-10, abs=1e-10)
    # and one coordinate of each, as a plain partial derivative
    e = np.zeros_like(A)
    e[2, 7] = 1.0
    fd = (loss(x, A + h * e, B) - loss(x, A - h * e, B)) / (2 * h)
    assert fd == pytest.approx(dA[2, 7], rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch_autograd(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    dy, x, W, A, B = make(rng, (2, 6), 12, 9, 4, dtype)
    tx, tA, tB = (torch.tensor(a, requires_grad=True) for a in (x, A, B))
    s = rslora.scale(16.0, 4, "standard")
    y = tx @ torch.tensor(W).T + s * (tx @ tA.T) @ tB.T
    y.backward(torch.tensor(dy))
    got = rslora.lora_linear_backward(dy, x, W, A, B, alpha=16.0, rule="standard")
    for g, t in zip(got, (tx, tA, tB)):
        close(g, t.grad.numpy().astype(np.float64), dtype)


def test_need_computes_only_what_is_asked():
    rng = np.random.default_rng(2)
    dy, x, W, A, B = make(rng, (8,), 6, 5, 3)
    full = rslora.lora_linear_backward(dy, x, W, A, B, scale=0.5)
    for need in [("x",), ("A",), ("B",), ("A", "B"), ("x", "B"), "A", []]:
        got = rslora.lora_linear_backward(dy, x, W, A, B, scale=0.5, need=need)
        names = {need} if isinstance(need, str) else set(need)
        for name, g, f in zip("xAB", got, full):
            if name in names:
                np.testing.assert_array_equal(g, f)
            else:
                assert g is None


def test_xa_is_reused():
    rng = np.random.default_rng(4)
    dy, x, W, A, B = make(rng, (3, 5), 8, 6, 2)
    _, xa = rslora.lora_linear(x, W, A, B, scale=2.0, return_xa=True)
    dx, dA, dB = rslora.lora_linear_backward(dy, x, W, A, B, scale=2.0, xa=xa)
    want = reference(dy, x, W, A, B, 2.0)
    for g, w in zip((dx, dA, dB), want):
        close(g, w, np.float64)
    # the given xa is what dB is built from (not a recomputation)
    fake = rng.standard_normal(xa.shape)
    _, _, dB_fake = rslora.lora_linear_backward(dy, x, W, A, B, scale=2.0, xa=fake, need="B")
    close(dB_fake, 2.0 * dy.reshape(-1, 6).T @ fake.reshape(-1, 2), np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_strided_and_fortran_inputs(dtype):
    rng = np.random.default_rng(6)
    dy, x, W, A, B = make(rng, (10,), 12, 9, 4, dtype)
    xa = (x @ A.T).astype(dtype)
    variants = dict(
        dy=np.asfortranarray(dy),
        x=np.repeat(x, 2, axis=1)[:, ::2],  # column stride 2
        W=np.ascontiguousarray(W.T).T,  # Fortran order
        A=np.asfortranarray(np.repeat(A, 3, axis=0)[::3]),
        B=np.repeat(B, 2, axis=0)[::2],  # row stride doubled
        xa=np.asfortranarray(xa),
    )
    for k, v in variants.items():
        np.testing.assert_array_equal(v, locals()[k] if k != "xa" else xa)
    got = rslora.lora_linear_backward(variants["dy"], variants["x"], variants["W"], variants["A"],
                                      variants["B"], scale=0.3, xa=variants["xa"])
    for g, w in zip(got, reference(dy, x, W, A, B, 0.3)):
        assert g.flags.c_contiguous
        close(g, w, dtype)


def test_results_do_not_alias_inputs():
    rng = np.random.default_rng(7)
    dy, x, W, A, B = make(rng, (4,), 5, 5, 5)
    for g in rslora.lora_linear_backward(dy, x, W, A, B, scale=1.0):
        for a in (dy, x, W, A, B):
            assert not np.shares_memory(g, a)


def test_rank_zero_and_empty_batch():
    rng = np.random.default_rng(8)
    dy, x, W, A, B = make(rng, (5,), 4, 3, 0)
    dx, dA, dB = rslora.lora_linear_backward(dy, x, W, A, B, alpha=1.0)
    assert dA.shape == (0, 4) and dB.shape == (3, 0)
    np.testing.assert_allclose(dx, dy @ W, rtol=1e-14)
    dy, x, W, A, B = make(rng, (0,), 4, 3, 2)
    dx, dA, dB = rslora.lora_linear_backward(dy, x, W, A, B, scale=1.0)
    assert dx.shape == (0, 4)
    np.testing.assert_array_equal(dA, np.zeros((2, 4)))
    np.testing.assert_array_equal(dB, np.zeros((3, 2)))


def test_rank_deficient_adapter():
    rng = np.random.default_rng(9)
    dy, x, W, A, B = make(rng, (6,), 8, 7, 3)
    A[2] = A[0] + A[1]  # rank 2 adapter in rank-3 factors, B zero as at initialisation
    B[:] = 0.0
    dx, dA, dB = rslora.lora_linear_backward(dy, x, W, A, B, scale=1.5)
    np.testing.assert_array_equal(dA, 0.0)  # PEFT's init: A gets no gradient until B moves
    for g, w in zip((dx, dB), reference(dy, x, W, A, B, 1.5)[::2]):
        close(g, w, np.float64)


# --- bad input -------------------------------------------------------------------------------

@pytest.fixture
def ops():
    return make(np.random.default_rng(0), (4,), 6, 5, 2)


def test_dy_of_the_wrong_shape(ops):
    dy, x, W, A, B = ops
    with pytest.raises(ValueError, match=r"dy has shape \(4, 4\).*\(4, 5\)"):
        rslora.lora_linear_backward(dy[:, :4], x, W, A, B, scale=1.0)
    with pytest.raises(ValueError, match=r"dy has shape \(3, 5\)"):
        rslora.lora_linear_backward(dy[:3], x, W, A, B, scale=1.0)


def test_xa_that_does_not_match(ops):
    dy, x, W, A, B = ops
    with pytest.raises(ValueError, match=r"xa has shape \(4, 3\).*\(4, 2\)"):
        rslora.lora_linear_backward(dy, x, W, A, B, scale=1.0, xa=np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"xa has shape \(2, 2, 2\)"):
        rslora.lora_linear_backward(dy, x, W, A, B, scale=1.0, xa=np.zeros((2, 2, 2)))
    with pytest.raises(TypeError, match="xa is float32"):
        rslora.lora_linear_backward(dy, x, W, A, B, scale=1.0, xa=np.zeros((4, 2), np.float32))


def test_mixed_and_bad_dtypes(ops):
    dy, x, W, A, B = ops
    with pytest.raises(TypeError, match="A is float32 but dy is float64"):
        rslora.lora_linear_backward(dy, x, W, A.astype(np.float32), B, scale=1.0)
    with pytest.raises(TypeError, match="x must be float32 or float64, got int64"):
        rslora.lora_linear_backward(dy, x.astype(np.int64), W, A, B, scale=1.0)
    with pytest.raises(TypeError, match="dy must be float32 or float64, got complex128"):
        rslora.lora_linear_backward(dy.astype(complex), x, W, A, B, scale=1.0)


def test_operand_shapes_and_need(ops):
    dy, x, W, A, B = ops
    with pytest.raises(ValueError, match=r"A has shape \(2, 5\) but x has d_in=6"):
        rslora.lora_linear_backward(dy, x, W, A[:, :5], B, scale=1.0)
    with pytest.raises(ValueError, match=r"B has shape \(5, 3\)"):
        rslora.lora_linear_backward(dy, x, W, A, np.zeros((5, 3)), scale=1.0)
    with pytest.raises(ValueError, match=r"W has shape \(5, 7\)"):
        rslora.lora_linear_backward(dy, x, np.zeros((5, 7)), A, B, scale=1.0)
    with pytest.raises(ValueError, match="need may only name.*'W'"):
        rslora.lora_linear_backward(dy, x, W, A, B, scale=1.0, need=("x", "W"))
    with pytest.raises(ValueError, match="not both"):
        rslora.lora_linear_backward(dy, x, W, A, B, scale=1.0, alpha=2.0)


def test_core_checks_shapes_itself(ops):
    """The binding validates on its own too (nothing unchecked reaches the C++ core)."""
    dy, x, W, A, B = ops
    from rslora import _core

    with pytest.raises(ValueError, match=r"dA has shape \(3, 6\)"):
        _core.lora_linear_backward(dy, x, W, A, B, 1.0, None, None, np.empty((3, 6)), None)
    with pytest.raises(ValueError, match=r"dy has shape"):
        _core.lora_linear_backward(dy[:2], x, W, A, B, 1.0, None, None, None, None)
