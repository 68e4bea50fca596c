"""Multi-adapter LoRA on NumPy arrays: every row of a batch picks its own adapter.

This is the SGMV/BGMV operation of multi-LoRA serving (Punica, S-LoRA, vLLM): one base GEMM
for the whole batch, then each adapter's shrink ``x @ A.T`` and expand ``@ B.T`` on its rows.
Shapes follow PEFT, stacked: ``A_all (n_adapters, r, d_in)``, ``B_all (n_adapters, d_out, r)``.
``adapter_ids[i] == -1`` means row i uses the base model only.
"""

from __future__ import annotations

import numpy as np

from . import _arrays, _core

__all__ = ["lora_linear_multi", "lora_add_multi"]


def _stacks(x, A_all, B_all):
    A_all = _arrays.as_array(A_all, "A_all")
    B_all = _arrays.as_array(B_all, "B_all")
    if x.ndim < 1:
        raise ValueError("x must have shape (..., d_in), got a 0-d array")
    if A_all.ndim != 3:
        raise ValueError(f"A_all must be 3-D (n_adapters, r, d_in), got shape {A_all.shape}")
    if B_all.ndim != 3:
        raise ValueError(f"B_all must be 3-D (n_adapters, d_out, r), got shape {B_all.shape}")
    na, r, d_in = A_all.shape
    if d_in != x.shape[-1]:
        raise ValueError(f"A_all has shape {A_all.shape} but x has d_in={x.shape[-1]}")
    if B_all.shape[0] != na or B_all.shape[2] != r:
        raise ValueError(f"B_all has shape {B_all.shape} but A_all {A_all.shape} needs "
                         f"({na}, d_out, {r})")
    return A_all, B_all


def _ids(adapter_ids, batch: tuple, n_adapters: int) -> np.ndarray:
    """adapter_ids as a flat contiguous int64 array, every id checked to lie in [-1, n_adapters)."""
    ids = np.asarray(adapter_ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"adapter_ids must be integers, got {ids.dtype}")
    if ids.shape != batch:
        raise ValueError(f"adapter_ids has shape {ids.shape} but x has batch shape {batch}")
    bad = np.flatnonzero((ids >= n_adapters) | (ids < -1) if ids.dtype.kind == "i"
                         else ids >= n_adapters)
    if bad.size:  # named here with the full index; the core checks 1-D ids again itself
        where = np.unravel_index(bad[0], ids.shape)
        raise IndexError(f"adapter_ids[{', '.join(map(str, where))}] = {ids.flat[bad[0]]} is "
                         f"out of range for {n_adapters} adapters (valid: -1 for the base model, "
                         f"0..{n_adapters - 1})")
    return np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)


def _scales(scales, n_adapters: int) -> np.ndarray:
    if scales is None:
        raise TypeError("scales= is required: one scale per adapter, shape (n_adapters,)")
    arr = np.asarray(scales)
    if arr.dtype.kind not in "iuf" or arr.dtype.kind == "b":
        raise TypeError(f"scales must be real numbers, got {arr.dtype}")
    if arr.shape != (n_adapters,):
        raise ValueError(f"scales has shape {arr.shape} but there are {n_adapters} adapters "
                         f"(scales must have shape ({n_adapters},))")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"scales must be finite, got {arr[~np.isfinite(arr)][0]}")
    return arr


def lora_linear_multi(x, W, A_all, B_all, adapter_ids, *, scales, bias=None, out=None):
    """``y[i] = x[i] @ W.T + bias + scales[a] * (x[i] @ A_all[a].T) @ B_all[a].T``, a = adapter_ids[i].

    Parameters
    ----------
    x : array_like, shape (..., d_in)
        The batch, float32 or float64.
    W : array_like, shape (d_out, d_in)
        Base weight, shared by every row.
    A_all : array_like, shape (n_adapters, r, d_in)
        Stacked ``lora_A.weight`` of every adapter.
    B_all : array_like, shape (n_adapters, d_out, r)
        Stacked ``lora_B.weight``.
    adapter_ids : array_like of int, shape x.shape[:-1]
        The adapter of each row; -1 for "base model only".
    scales : array_like, shape (n_adapters,)
        Each adapter's scale s (e.g. ``rslora.scale(alpha, r)`` per adapter).
    bias : array_like, shape (d_out,), optional
    out : ndarray, shape (..., d_out), optional
        Where to write the result (the result's dtype, not overlapping an input).

    Returns
    -------
    y : ndarray, shape (..., d_out)

    Raises
    ------
    IndexError
        An id >= n_adapters or < -1, naming it and its row; raised before any work is done.

    Notes
    -----
    The base GEMM runs once for the whole batch; rows are then grouped by adapter inside the
    core (a counting sort, no Python loop) and each adapter is applied with one shrink and one
    expand GEMM over its rows (gemv for groups of one or two rows, as in a decode batch).
    See :func:`lora_add_multi` for the adapter part alone. GPU arrays (DLPack: torch, CuPy)
    run on the GPU through :mod:`rslora.cuda`.
    """
    if _arrays.on_gpu(x):
        from . import cuda

        return cuda.lora_linear_multi(x, W, A_all, B_all, adapter_ids, scales=scales, bias=bias,
                                      out=out)
    x = _arrays.as_array(x, "x")
    W = _arrays.as_array(W, "W")
    bias = None if bias is None else _arrays.as_array(bias, "bias")
    A_all, B_all = _stacks(x, A_all, B_all)
    dtype = _arrays.common_dtype(x=x, W=W, A_all=A_all, B_all=B_all, bias=bias)
    _arrays.require_ndim(W, "W", 2)
    d_in, d_out = x.shape[-1], W.shape[0]
    if W.shape[1] != d_in:
        raise ValueError(f"W has shape {W.shape} but x has d_in={d_in}")
    if B_all.shape[1] != d_out:
        raise ValueError(f"B_all has shape {B_all.shape} but W has d_out={d_out}")
    batch = x.shape[:-1]
    ids = _ids(adapter_ids, batch, A_all.shape[0])
    sc = _scales(scales, A_all.shape[0])
    out, out2, copy_back = _arrays.prepare_out(out, batch + (d_out,), dtype, x=x, W=W,
                                               A_all=A_all, B_all=B_all, bias=bias)
    _core.lora_linear_multi(x.reshape(ids.size, d_in), W, A_all, B_all, ids, sc, bias, out2)
    if copy_back:
        out[...] = out2.reshape(out.shape)
    return out


def lora_add_multi(y, x, A_all, B_all, adapter_ids, *, scales):
    """``y[i] += scales[a] * (x[i] @ A_all[a].T) @ B_all[a].T`` in place, a = adapter_ids[i].

    The adapter part of :func:`lora_linear_multi` on its own (what Punica's ``add_lora_sgmv``
    does): add it to the output of a base layer computed elsewhere. Rows with id -1 are left as
    they are.

    Parameters
    ----------
    y : ndarray, shape (..., d_out)
        Updated in place and returned; must not overlap x or the adapters.
    x, A_all, B_all, adapter_ids, scales
        As in :func:`lora_linear_multi`.

    Returns
    -------
    y : ndarray
        The same array.
    """
    if _arrays.on_gpu(y):
        from . import cuda

        return cuda.lora_add_multi(y, x, A_all, B_all, adapter_ids, scales=scales)
    if not isinstance(y, np.ndarray):
        raise TypeError(f"y must be a NumPy array (updated in place), got {type(y).__name__}")
    x = _arrays.as_array(x, "x")
    A_all, B_all = _stacks(x, A_all, B_all)
    _arrays.common_dtype(y=y, x=x, A_all=A_all, B_all=B_all)
    batch, d_in, d_out = x.shape[:-1], x.shape[-1], B_all.shape[1]
    if y.shape != batch + (d_out,):
        raise ValueError(f"y has shape {y.shape} but x {x.shape} and B_all {B_all.shape} "
                         f"need {batch + (d_out,)}")
    _arrays.check_writable(y, "y", "; lora_add_multi works in place")
    _arrays.check_no_alias(y, "y", x=x, A_all=A_all, B_all=B_all)
    ids = _ids(adapter_ids, batch, A_all.shape[0])
    sc = _scales(scales, A_all.shape[0])
    n = ids.size  # rows, spelled out: reshape(-1, 0) cannot infer them
    y2 = y.view()
    try:
        y2.shape = (n, d_out)  # a view when y's layout allows it
    except AttributeError:
        y2 = y.reshape(n, d_out)  # a copy, written back below
    _core.lora_add_multi(y2, x.reshape(n, d_in), A_all, B_all, ids, sc)
    if not np.shares_memory(y2, y):
        y[...] = y2.reshape(y.shape)
    return y
