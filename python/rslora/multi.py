"""Multi-adapter LoRA on NumPy arrays: every row of a batch picks its own adapter.

This is the SGMV/BGMV operation of multi-LoRA serving (Punica, S-LoRA, vLLM): one base GEMM
for the whole batch, then each adapter's shrink ``x @ A.T`` and expand ``@ B.T`` on its rows.
Shapes follow PEFT, stacked: ``A_all (n_adapters, r, d_in)``, ``B_all (n_adapters, d_out, r)``.
``adapter_ids[i] == -1`` means row i uses the base model only.
"""

from __future__ import annotations

from typing import Any

from . import _backend

__all__ = ["lora_linear_multi", "lora_add_multi"]


def lora_linear_multi(x: Any, W: Any, A_all: Any, B_all: Any, adapter_ids: Any, *, scales: Any,
                      bias: Any = None, out: Any = None) -> Any:
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
    core (a counting sort, no Python loop, so random and sorted ids do the same work). Groups of
    up to 32 rows run through SIMD kernels (AVX-512, AVX2+FMA or the baseline, chosen at run
    time: :func:`rslora.kernel_path`) that read each adapter once, on the BLAS thread count
    split by work; bigger groups run one shrink and one expand GEMM. In the kernels' groups a
    row's result is the same bits wherever it sits in the batch and wherever the arrays lie in
    memory.
    See :func:`lora_add_multi` for the adapter part alone. GPU arrays (DLPack: torch, CuPy)
    run on the GPU through :mod:`rslora.cuda`.
    """
    return _backend.op("lora_linear_multi", x)(x, W, A_all, B_all, adapter_ids, scales=scales,
                                               bias=bias, out=out)


def lora_add_multi(y: Any, x: Any, A_all: Any, B_all: Any, adapter_ids: Any, *,
                   scales: Any) -> Any:
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
    return _backend.op("lora_add_multi", y)(y, x, A_all, B_all, adapter_ids, scales=scales)
