"""Merging a LoRA adapter into base weights: in memory (:func:`merge_adapter`) or from one
checkpoint on disk to another, one shard at a time (:func:`merge_checkpoint`)."""

from __future__ import annotations

import json
import os
from collections.abc import MutableMapping
from pathlib import Path

import numpy as np

from .atomic import atomic_output_dir, check_output_dir
from .peft_format import LoraAdapter, LoraModule, load_adapter
from .checkpoint import DTYPE_CODES, Checkpoint, CheckpointError, save_tensors
from ..linear import merge

__all__ = ["merge_adapter", "merge_checkpoint"]


def _as_adapter(adapter) -> LoraAdapter:
    if isinstance(adapter, LoraAdapter):
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        return load_adapter(adapter)
    raise TypeError(f"adapter must be a LoraAdapter or a folder path, got {type(adapter).__name__}")


def _merge_one(W: np.ndarray, mod: LoraModule, key: str) -> None:
    """W += scale * B @ A in place, in W's dtype (float32, or float64 for float64 weights)."""
    if W.shape != mod.shape:
        raise CheckpointError(f"base weight {key!r} has shape {W.shape} but the adapter's "
                              f"lora_B {mod.B.shape} @ lora_A {mod.A.shape} gives {mod.shape}")
    A, B = mod.A.astype(W.dtype, copy=False), mod.B.astype(W.dtype, copy=False)
    merge(W.T if mod.fan_in_fan_out else W, A, B, scale=mod.scale)


def _missing(adapter: LoraAdapter, have) -> None:
    absent = [name for name in adapter if f"{name}.weight" not in have]
    if absent:
        raise CheckpointError(f"{len(absent)} adapter module(s) have no weight in the base, "
                              f"e.g. {absent[0] + '.weight'!r}")


def merge_adapter(base, adapter):
    """Merge a LoRA adapter into base weights: ``W += scale * B @ A`` per adapted module.

    Parameters
    ----------
    base : dict of ndarray, or str or os.PathLike
        A mapping ``{"<module>.weight": W}`` of float32 or float64 arrays, merged **in place**
        (each W must be writable); or a checkpoint path (see :class:`rslora.checkpoint.Checkpoint`),
        read into a new dict of float32 arrays (non-float tensors as stored).
    adapter : LoraAdapter, or str or os.PathLike
        A loaded adapter or a PEFT adapter folder (:func:`rslora.load_adapter`).

    Returns
    -------
    dict
        ``base`` itself when a mapping was given, else the new dict.

    Notes
    -----
    Each update is one GEMM with beta = 1 (:func:`rslora.merge`), in the weight's own dtype; the
    scale is the one PEFT uses (``use_rslora``, ``rank_pattern``, ``alpha_pattern``), so the
    result equals PEFT's ``merge_and_unload`` to float32 rounding. For ``fan_in_fan_out``
    adapters (GPT-2's Conv1D) the transposed update is added.
    """
    adapter = _as_adapter(adapter)
    if isinstance(base, (str, os.PathLike)):
        with Checkpoint(base) as ck:
            _missing(adapter, ck)
            weights = {}
            for key in ck.keys():
                code = ck.dtype(key)
                weights[key] = ck.read(key) if code in ("F32", "F16", "BF16") else ck.read_raw(key)[0]
        base = weights
    elif not isinstance(base, MutableMapping):
        raise TypeError(f"base must be a dict of arrays or a checkpoint path, got {type(base).__name__}")
    _missing(adapter, base)
    for name, mod in adapter.modules.items():
        key = f"{name}.weight"
        W = base[key]
        if not isinstance(W, np.ndarray) or W.dtype not in (np.float32, np.float64):
            raise TypeError(f"base[{key!r}] must be a float32 or float64 NumPy array, got "
                            f"{getattr(W, 'dtype', type(W).__name__)}")
        _merge_one(W, mod, key)
    return base


def merge_checkpoint(base, adapter, out_dir, *, dtype: str | None = None, force: bool = False,
                     progress: bool = False) -> Path:
    """Write ``base`` with ``adapter`` merged into ``out_dir``, one shard in memory at a time.

    Parameters
    ----------
    base : str or os.PathLike
        The base checkpoint (file, folder or index).
    adapter : LoraAdapter, or str or os.PathLike
    out_dir : str or os.PathLike
        Output folder: the base's safetensors files under the same names (plus
        ``model.safetensors.index.json`` when the base has several files). Written atomically;
        an existing folder is replaced only with ``force=True``. Only weights are written (copy
        config.json and tokenizer files yourself).
    dtype : {"float32", "float16", "bfloat16"}, optional
        Storage dtype of the merged weights; default: each weight's own dtype. Merging runs in
        float32 (float64 for float64 weights). Tensors the adapter does not touch are copied
        bit for bit.
    """
    if dtype is not None and dtype not in DTYPE_CODES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
    inputs = (base, adapter if isinstance(adapter, (str, os.PathLike)) else adapter.path)
    check_output_dir(out_dir, force, inputs)
    adapter = _as_adapter(adapter)
    with Checkpoint(base) as ck:
        _missing(adapter, ck)
        files = ck.files()
        by_file: dict[Path, list[str]] = {f: [] for f in files}
        for key in ck.keys():
            by_file[ck.file_of(key)].append(key)
        bar = _bar(len(adapter), progress)
        weight_map, total = {}, 0
        with atomic_output_dir(out_dir, force, inputs) as tmp:
            for f in files:
                tensors = {}
                for key in by_file[f]:
                    name = key[: -len(".weight")] if key.endswith(".weight") else None
                    if name in adapter.modules:
                        code = ck.dtype(key)
                        W = ck.read_raw(key)[0].copy() if code == "F64" else ck.read(key)
                        _merge_one(W, adapter[name], key)
                        tensors[key] = (W, DTYPE_CODES[dtype] if dtype else code)
                        bar.update(1)
                    else:
                        tensors[key] = ck.read_raw(key)
                    weight_map[key] = f.name
                save_tensors(tmp / f.name, tensors)
                total += sum(_nbytes(a, c) for a, c in tensors.values())
                del tensors
            if len(files) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        bar.close()
    return Path(os.fspath(out_dir))


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _nbytes(arr: np.ndarray, code: str) -> int:
    return arr.size * _ITEMSIZE.get(code, arr.itemsize)


def _bar(total: int, on: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="merge", unit="layer", disable=None if on else True)
