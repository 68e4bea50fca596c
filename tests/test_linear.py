"""The fused forward against a float64 NumPy reference."""

import threading

import numpy as np
import pytest

import rslora
from testutil import tol


def make(rng, n, d_in, d_out, r, dtype):
    x = rng.standard_normal((n, d_in)).astype(dtype)
    W = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(dtype)
    A = (rng.standard_normal((r, d_in)) / np.sqrt(d_in)).astype(dtype)
    B = rng.standard_normal((d_out, r)).astype(dtype)
    b = rng.standard_normal(d_out).astype(dtype)
    return x, W, A, B, b


def reference(x, W, A, B, s, bias=None):
    f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    y = f(x) @ f(W).T + s * (f(x) @ f(A).T) @ f(B).T
    return y if bias is None else y + f(bias)


def assert_close(y, ref, dtype):
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    np.testing.assert_allclose(y, ref, rtol=tol(dtype), atol=tol(dtype) * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d_in,d_out,r", [(1, 8, 5, 1), (17, 33, 65, 4), (64, 128, 96, 16),
                                            (5, 7, 300, 7), (3, 200, 2, 2)])
def test_matches_float64_reference(rng, dtype, n, d_in, d_out, r):
    x, W, A, B, b = make(rng, n, d_in, d_out, r, dtype)
    s = rslora.scale(16, r)
    y = rslora.lora_linear(x, W, A, B, alpha=16, bias=b)
    assert y.dtype == dtype and y.shape == (n, d_out)
    assert_close(y, reference(x, W, A, B, s, b), dtype)
    y2 = rslora.lora_linear(x, W, A, B, scale=0.37)
    assert_close(y2, reference(x, W, A, B, 0.37), dtype)


def test_standard_rule(rng):
    x, W, A, B, _ = make(rng, 9, 12, 10, 4, np.float64)
    y = rslora.lora_linear(x, W, A, B, alpha=8, rule="standard")
    assert_close(y, reference(x, W, A, B, 2.0), np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layouts_fortran_strided_transposed(rng, dtype):
    x, W, A, B, b = make(rng, 20, 24, 18, 5, dtype)
    ref = reference(x, W, A, B, 0.5, b)
    big = rng.standard_normal((40, 72)).astype(dtype)
    xs = big[::2, ::3]  # neither axis unit-stride: copied by the core
    cases = {
        "fortran": (np.asfortranarray(x), np.asfortranarray(W), np.asfortranarray(A),
                    np.asfortranarray(B), b),
        "transposed views": (x.T.copy().T, W.T.copy().T, A.T.copy().T, B.T.copy().T, b),
        "row-strided": (np.repeat(x, 2, axis=0)[::2], W, A, B, np.repeat(b, 3)[::3]),
        "col-strided": (np.repeat(x, 2, axis=1)[:, ::2], np.repeat(W, 2, axis=1)[:, ::2], A, B, b),
    }
    for name, (xx, WW, AA, BB, bb) in cases.items():
        np.testing.assert_array_equal(xx, x)
        y = rslora.lora_linear(xx, WW, AA, BB, scale=0.5, bias=bb)
        assert_close(y, ref, dtype), name
    y = rslora.lora_linear(xs, W, A, B, scale=0.5)
    assert_close(y, reference(xs, W, A, B, 0.5), dtype)


@pytest.mark.parametrize("n", [1, 6])  # n = 1 runs the one-row GEMV path
def test_negative_strides_are_read_correctly(rng, n):
    x, W, A, B, b = make(rng, n, 10, 8, 3, np.float64)
    xr = x[::-1, ::-1]
    y = rslora.lora_linear(xr, W[:, ::-1], A[:, ::-1], B, scale=1.5, bias=b[::-1])
    assert_close(y, reference(xr, W[:, ::-1], A[:, ::-1], B, 1.5, b[::-1]), np.float64)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3), (2, 0, 4)])
def test_batch_dims(rng, batch):
    _, W, A, B, b = make(rng, 1, 11, 13, 3, np.float32)
    x = rng.standard_normal(batch + (11,)).astype(np.float32)
    y, xa = rslora.lora_linear(x, W, A, B, alpha=4, bias=b, return_xa=True)
    assert y.shape == batch + (13,) and xa.shape == batch + (3,)
    ref = reference(x.reshape(-1, 11), W, A, B, rslora.scale(4, 3), b).reshape(batch + (13,))
    assert_close(y, ref, np.float32)
    assert_close(xa, (x.astype(np.float64) @ A.T.astype(np.float64)), np.float32)


def test_zero_rank_is_the_base_layer(rng):
    x, W, _, _, b = make(rng, 4, 6, 5, 1, np.float64)
    A = np.zeros((0, 6))
    B = np.zeros((5, 0))
    y, xa = rslora.lora_linear(x, W, A, B, alpha=16, bias=b, return_xa=True)
    assert_close(y, x @ W.T + b, np.float64)
    assert xa.shape == (4, 0)


def test_empty_batch_and_zero_d_in(rng):
    _, W, A, B, b = make(rng, 1, 6, 5, 2, np.float64)
    y = rslora.lora_linear(np.zeros((0, 6)), W, A, B, scale=1.0, bias=b)
    assert y.shape == (0, 5)
    y = rslora.lora_linear(np.zeros((3, 0)), np.zeros((5, 0)), np.zeros((2, 0)), B, scale=1.0,
                           bias=b)
    np.testing.assert_array_equal(y, np.broadcast_to(b, (3, 5)))  # empty sums are zero


def test_out_is_written_and_returned(rng):
    x, W, A, B, b = make(rng, 7, 9, 6, 2, np.float64)
    out = np.full((7, 6), np.nan)
    y = rslora.lora_linear(x, W, A, B, scale=2.0, bias=b, out=out)
    assert y is out
    assert_close(out, reference(x, W, A, B, 2.0, b), np.float64)
    # A non-contiguous out is filled too (through a scratch buffer).
    big = np.full((7, 12), np.nan)
    outv = big[:, ::2]
    rslora.lora_linear(x, W, A, B, scale=2.0, bias=b, out=outv)
    assert_close(outv, reference(x, W, A, B, 2.0, b), np.float64)
    assert np.isnan(big[:, 1::2]).all()  # nothing outside the view is touched


def test_result_never_aliases_inputs(rng):
    x, W, A, B, b = make(rng, 4, 4, 4, 2, np.float64)
    y = rslora.lora_linear(x, W, A, B, scale=1.0, bias=b)
    for a in (x, W, A, B, b):
        assert not np.shares_memory(y, a)


def test_nan_and_inf_propagate_as_ieee(rng):
    x, W, A, B, _ = make(rng, 4, 5, 3, 2, np.float64)
    x[1, 2] = np.nan
    y = rslora.lora_linear(x, W, A, B, scale=1.0)
    assert np.isnan(y[1]).all() and np.isfinite(np.delete(y, 1, axis=0)).all()
    A2 = A.copy()
    A2[0, 0] = np.inf
    y = rslora.lora_linear(np.abs(x[[0]]) + 1, W, A2, np.abs(B) + 1, scale=0.0)
    assert np.isnan(y).all()  # 0 * inf, as the NumPy expression gives


def test_gil_released_two_threads_correct(rng):
    x, W, A, B, b = make(rng, 64, 256, 192, 8, np.float32)
    ref = reference(x, W, A, B, 0.25, b)
    errors = []

    def work():
        for _ in range(20):
            y = rslora.lora_linear(x, W, A, B, scale=0.25, bias=b)
            if not np.allclose(y, ref, rtol=1e-4, atol=1e-4):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_accepts_array_likes_and_torch_cpu_tensors(rng):
    torch = pytest.importorskip("torch")
    x, W, A, B, b = make(rng, 3, 4, 5, 2, np.float32)
    y = rslora.lora_linear(torch.from_numpy(x), torch.from_numpy(W), torch.from_numpy(A),
                           torch.from_numpy(B), scale=1.0)
    assert isinstance(y, np.ndarray)
    assert_close(y, reference(x, W, A, B, 1.0), np.float32)
    y = rslora.lora_linear(x.astype(float).tolist(), W.astype(float), A.astype(float),
                           B.astype(float), scale=1.0)
    assert y.dtype == np.float64


def test_peak_memory_beyond_output_is_n_by_r(rng):
    # The only scratch is x @ A.T (n x r); NumPy's expression makes n x d_out temporaries.
    import tracemalloc

    n, d, r = 512, 1024, 8
    x, W, A, B, b = make(rng, n, d, d, r, np.float32)
    tracemalloc.start()
    tracemalloc.reset_peak()
    y = rslora.lora_linear(x, W, A, B, scale=0.5, bias=b)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    extra = peak - y.nbytes
    assert extra <= n * r * 4 + 16384, extra
    tracemalloc.start()
    y2 = x @ W.T + b + 0.5 * ((x @ A.T) @ B.T)
    _, peak_np = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_np - y2.nbytes >= n * d * 4  # the contrast the fused kernel removes


def _layouts(draw, shape, dtype):
    """A float array with the given values' shape in a random memory layout."""
    from hypothesis import strategies as st

    kind = draw(st.sampled_from(["c", "f", "row-step", "col-step", "reversed", "both-step"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = rng.standard_normal(shape).astype(dtype)
    if kind == "f":
        return np.asfortranarray(base)
    if kind == "row-step" and len(shape) == 2:
        big = np.zeros((shape[0] * 2, shape[1]), dtype)
        big[::2] = base
        return big[::2]
    if kind == "col-step" and len(shape) == 2:
        big = np.zeros((shape[0], shape[1] * 3), dtype)
        big[:, ::3] = base
        return big[:, ::3]
    if kind == "reversed" and len(shape) == 2:
        return base[::-1, ::-1].copy()[::-1, ::-1]
    if kind == "both-step" and len(shape) == 2:
        big = np.zeros((shape[0] * 2, shape[1] * 2), dtype)
        big[::2, ::2] = base
        return big[::2, ::2]
    return base


def test_property_any_layout_any_shape_matches_reference():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None)
    @given(st.data())
    def check(data):
        dtype = data.draw(st.sampled_from([np.float32, np.float64]))
        n, d_in, d_out, r = (data.draw(st.integers(0, 9)) for _ in range(4))
        d_in, d_out = max(d_in, 1), max(d_out, 1)
        draw = data.draw
        x = _layouts(draw, (n, d_in), dtype)
        W = _layouts(draw, (d_out, d_in), dtype)
        A = _layouts(draw, (r, d_in), dtype)
        B = _layouts(draw, (d_out, r), dtype)
        bias = _layouts(draw, (d_out,), dtype) if draw(st.booleans()) else None
        s = draw(st.floats(-4, 4))
        y = rslora.lora_linear(x, W, A, B, scale=s, bias=bias)
        assert_close(y, reference(x, W, A, B, s, bias), dtype)
        W2 = W.copy(order=draw(st.sampled_from(["C", "F"])))
        rslora.merge(W2, A, B, scale=s)
        ref = W.astype(np.float64) + s * B.astype(np.float64) @ A.astype(np.float64)
        assert_close(W2, ref, dtype)

    check()
