"""Bad input to lora_linear: a clear error naming the argument, never a crash or a silent answer."""

import numpy as np
import pytest

import rslora


@pytest.fixture
def ops(rng):
    x = rng.standard_normal((4, 6))
    W = rng.standard_normal((5, 6))
    A = rng.standard_normal((2, 6))
    B = rng.standard_normal((5, 2))
    return x, W, A, B


def test_shape_mismatches_name_argument_and_shapes(ops):
    x, W, A, B = ops
    with pytest.raises(ValueError, match=r"W has shape \(5, 7\) but x has d_in=6"):
        rslora.lora_linear(x, np.zeros((5, 7)), A, B, scale=1.0)
    with pytest.raises(ValueError, match=r"A has shape \(2, 8\) but x has d_in=6"):
        rslora.lora_linear(x, W, np.zeros((2, 8)), B, scale=1.0)
    with pytest.raises(ValueError, match=r"B has shape \(5, 3\) but W and A need \(5, 2\)"):
        rslora.lora_linear(x, W, A, np.zeros((5, 3)), scale=1.0)
    with pytest.raises(ValueError, match=r"B has shape \(4, 2\)"):
        rslora.lora_linear(x, W, A, np.zeros((4, 2)), scale=1.0)
    with pytest.raises(ValueError, match=r"bias has shape \(4,\) but W has d_out=5"):
        rslora.lora_linear(x, W, A, B, scale=1.0, bias=np.zeros(4))
    with pytest.raises(ValueError, match="W must be 2-D"):
        rslora.lora_linear(x, W[None], A, B, scale=1.0)
    with pytest.raises(ValueError, match="A must be 2-D"):
        rslora.lora_linear(x, W, A[0], B, scale=1.0)
    with pytest.raises(ValueError, match="x must have shape"):
        rslora.lora_linear(np.float64(1.0), W, A, B, scale=1.0)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex128, np.float16, object, bool])
def test_wrong_dtypes_are_type_errors(ops, dtype):
    x, W, A, B = ops
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        rslora.lora_linear(x.astype(dtype), W, A, B, scale=1.0)
    with pytest.raises(TypeError, match="B must be float32 or float64"):
        rslora.lora_linear(x, W, A, B.astype(dtype), scale=1.0)


def test_mixed_precision_is_a_type_error(ops):
    x, W, A, B = ops
    with pytest.raises(TypeError, match="W is float32 but x is float64"):
        rslora.lora_linear(x, W.astype(np.float32), A, B, scale=1.0)
    with pytest.raises(TypeError, match="bias is float32 but x is float64"):
        rslora.lora_linear(x, W, A, B, scale=1.0, bias=np.zeros(5, np.float32))


def test_out_validation(ops):
    x, W, A, B = ops
    with pytest.raises(ValueError, match=r"out has shape \(4, 4\) but the result has shape \(4, 5\)"):
        rslora.lora_linear(x, W, A, B, scale=1.0, out=np.empty((4, 4)))
    with pytest.raises(ValueError, match="out has dtype float32 but the result is float64"):
        rslora.lora_linear(x, W, A, B, scale=1.0, out=np.empty((4, 5), np.float32))
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        rslora.lora_linear(x, W, A, B, scale=1.0, out=[[0.0] * 5] * 4)
    ro = np.empty((4, 5))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        rslora.lora_linear(x, W, A, B, scale=1.0, out=ro)


def test_out_overlapping_an_input_is_rejected(rng):
    buf = rng.standard_normal((4, 11))
    x, out = buf[:, :6], buf[:, 6:]  # disjoint: fine
    W = rng.standard_normal((5, 6))
    A = rng.standard_normal((2, 6))
    B = rng.standard_normal((5, 2))
    rslora.lora_linear(x, W, A, B, scale=1.0, out=out)
    x2 = buf[:, :6]
    with pytest.raises(ValueError, match="out overlaps x"):
        rslora.lora_linear(x2, W, A, B, scale=1.0, out=buf[:, 5:10])
    Wsq = rng.standard_normal((6, 6))
    with pytest.raises(ValueError, match="out overlaps W"):
        rslora.lora_linear(rng.standard_normal((6, 6)), Wsq, A, rng.standard_normal((6, 2)),
                           scale=1.0, out=Wsq)


def test_scale_arguments(ops):
    x, W, A, B = ops
    with pytest.raises(ValueError, match="not both"):
        rslora.lora_linear(x, W, A, B, scale=1.0, alpha=16)
    with pytest.raises(ValueError, match="give scale= or alpha="):
        rslora.lora_linear(x, W, A, B)
    with pytest.raises(ValueError, match="rule must be"):
        rslora.lora_linear(x, W, A, B, alpha=16, rule="rsLoRA")
    with pytest.raises(TypeError, match="scale must be a real number"):
        rslora.lora_linear(x, W, A, B, scale="1")


def test_core_rejects_bad_shapes_even_when_called_directly(ops):
    # The bindings validate on their own: no out-of-bounds access through rslora._core.
    from rslora import _core

    x, W, A, B = ops
    with pytest.raises(ValueError, match="out has shape"):
        _core.lora_linear(x, W, A, B, 1.0, None, np.empty((3, 5)), np.empty((4, 2)))
    with pytest.raises(ValueError, match="xa has shape"):
        _core.lora_linear(x, W, A, B, 1.0, None, np.empty((4, 5)), np.empty((4, 1)))
    with pytest.raises(TypeError, match="xa is float32"):
        _core.lora_linear(x, W, A, B, 1.0, None, np.empty((4, 5)), np.empty((4, 2), np.float32))


def test_outputs_whose_elements_alias_each_other_are_refused(rng):
    # Issue 11 fuzzing: a writable zero-stride out/y/W (as_strided) was accepted and written
    # with one row's result over another's (a silent wrong result). Refused, nothing written.
    from numpy.lib.stride_tricks import as_strided

    x = rng.standard_normal((3, 2))
    W, A, B = rng.standard_normal((4, 2)), rng.standard_normal((1, 2)), rng.standard_normal((4, 1))
    base = np.zeros(4)
    shared = as_strided(base, shape=(3, 4), strides=(0, 8))  # 3 rows, one memory row
    with pytest.raises(ValueError, match="out has overlapping elements"):
        rslora.lora_linear(x, W, A, B, scale=1.0, out=shared)
    with pytest.raises(ValueError, match="out has overlapping elements"):
        rslora.lora_linear_multi(x, W, A[None], B[None], [0, 0, 0], scales=[1.0], out=shared)
    with pytest.raises(ValueError, match="y has overlapping elements"):
        rslora.lora_add_multi(shared, x, A[None], B[None], [0, 0, 0], scales=[1.0])
    interleaved = as_strided(np.zeros(6), shape=(4, 2), strides=(8, 8))  # rows overlap by one
    with pytest.raises(ValueError, match="W has overlapping elements"):
        rslora.merge(interleaved, A, B, scale=1.0)
    assert not base.any()
    # every layout slicing makes is still accepted (reversed, strided, transposed)
    big = np.zeros((8, 9))
    for out in (big[:3, :4], big[::-2, ::2][:3, :4], big[:4, :3].T, big[:3, 8:4:-1]):
        rslora.lora_linear(x, W, A, B, scale=1.0, out=out)
        np.testing.assert_allclose(out, x @ W.T + (x @ A.T) @ B.T, atol=1e-12)
