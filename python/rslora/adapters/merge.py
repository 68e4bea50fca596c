"""Merging a LoRA adapter into base weights: in memory (:func:`merge_adapter`) or from a model
folder on disk to a new one (:func:`merge_checkpoint`), one shard at a time.

What PEFT's ``merge_and_unload`` does, module by module: tensors the adapter saved in full
(``modules_to_save`` copies, trained biases, the base weights PEFT saves beside embedding and
``lm_head`` LoRA) replace the base's; then ``W += scale * B @ A``, transposed for Conv1D and
embedding layers. Every module is matched, its layout decided and its shape checked before any
output is written (see :mod:`.naming`, :mod:`.layouts`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import MutableMapping
from pathlib import Path

import numpy as np

from .atomic import atomic_output_dir, check_output_dir
from .checkpoint import DTYPE_CODES, FLOAT_CODES, Checkpoint, CheckpointError
from .layouts import (SHARED, STACK_EMBEDDING, WORD_EMBEDDINGS,
                      decide_conv1d, model_config, module_renames, rename_module,
                      stored_ties)
from .naming import match_modules
from .parallel import run_items
from .peft_format import LoraAdapter, LoraModule, load_adapter
from .safetensors_stream import TensorFile
from ..linear import merge

__all__ = ["merge_adapter", "merge_checkpoint", "MergePlan", "plan_merge"]

#: Files in a model folder that hold weights in other formats: never copied into a merged model
#: (they would be the unmerged weights).
_OTHER_WEIGHTS = re.compile(r"\.(bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|safetensors)$|"
                            r"\.safetensors\.index\.json$|\.bin\.index\.json$")


def _as_adapter(adapter) -> LoraAdapter:
    if isinstance(adapter, LoraAdapter):
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        return load_adapter(adapter)
    raise TypeError(f"adapter must be a LoraAdapter or a folder path, got {type(adapter).__name__}")


@dataclasses.dataclass
class MergePlan:
    """What merging changes, by base key: LoRA updates (layout resolved) and full replacements."""

    updates: dict  # key -> [LoraModule, ...] (several when lm_head is tied to the embedding)
    replace: dict  # key -> ndarray
    notes: list


def _tied_embedding(name: str, mod: LoraModule, shapes: dict, stems: set, cfg: dict):
    """The input-embedding key an output layer ``name`` is tied to, or None; or, for the
    encoder's or decoder's ``embed_tokens`` of an encoder-decoder model (T5, BART), the one
    ``shared`` embedding both are saved as."""
    if any(s == name or s.endswith("." + name) or name.endswith("." + s) for s in stems):
        return None
    if mod.kind == "embedding":
        if not STACK_EMBEDDING.search(name):
            return None
        cand = [s for s in stems if SHARED.search(s) and shapes[f"{s}.weight"] == mod.shape]
        return f"{cand[0]}.weight" if len(cand) == 1 else None
    if cfg and not cfg.get("tie_word_embeddings", True):  # transformers' default: tied
        return None
    d_out, d_in = mod.B.shape[0], mod.A.shape[1]
    cand = [s for s in stems if WORD_EMBEDDINGS.search(s) and shapes[f"{s}.weight"] == (d_out, d_in)]
    return f"{cand[0]}.weight" if len(cand) == 1 else None


def plan_merge(adapter: LoraAdapter, shapes: dict, *, model_cfg=None, evidence=frozenset(),
               prefix=None) -> MergePlan:
    """Match every adapter module and saved tensor to a base key and check it (no arrays read).

    ``shapes`` maps base keys to shapes; ``model_cfg`` is config.json's content (or {}).
    """
    cfg = model_cfg or {}
    model_type = cfg.get("model_type")
    stems = {k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight")}
    plan = MergePlan({}, {}, [])
    # A module transformers >= 5 renames on load (PEFT's name for it) found under the
    # checkpoint's own name.
    back = {m: c for c, m in module_renames(cfg, shapes).items()}

    def ckpt_name(n: str, have) -> str | None:
        """The checkpoint's name of a module transformers >= 5 renames (PEFT's name for it)."""
        c = rename_module(n, back)
        return c if prefix is None and n not in have and c != n and c in have else None

    renamed = {n: c for n in adapter.modules if (c := ckpt_name(n, stems)) is not None}
    tied, found = {}, {}
    for name, mod in adapter.modules.items():
        key = None if prefix is not None or name in renamed else \
            _tied_embedding(name, mod, shapes, stems, cfg)
        if key is not None:
            tied[name] = key
            plan.notes.append(f"{name} is tied to {key[: -len('.weight')]}: its update is merged "
                              "into the shared weight, so " + ("every module that shares it "
                                                               if mod.kind == "embedding" else
                                                               "the input embedding ") +
                              "changes too (as PEFT's merge_and_unload does)")
        elif name in renamed:
            found[name] = f"{renamed[name]}.weight"
    found |= {n: f"{s}.weight" for n, s in match_modules(
        [n for n in adapter.modules if n not in tied and n not in found], stems, prefix=prefix,
        where="the base", suffix=".weight").items()}
    found |= tied
    flag = adapter.config.get("fan_in_fan_out")
    for name, mod in adapter.modules.items():
        key = found[name]
        stored = tuple(shapes[key])
        if len(stored) != 2:
            raise CheckpointError(f"module {name!r}: base weight {key!r} is {len(stored)}-D "
                                  f"{stored}, not a Linear, Conv1D or Embedding weight")
        if mod.kind == "embedding":
            if stored != mod.shape:
                raise CheckpointError(f"module {name!r}: base weight {key!r} has shape {stored} "
                                      f"but the embedding LoRA gives {mod.shape} (shape mismatch)")
        else:
            d_out, d_in = mod.B.shape[0], mod.A.shape[1]
            if mod.fan_in_fan_out is None:
                conv = decide_conv1d(name, stored, d_out, d_in, model_type=model_type,
                                     evidence=evidence, flag=flag, key=key)
            else:
                conv = bool(mod.fan_in_fan_out)
                if stored != ((d_in, d_out) if conv else (d_out, d_in)):
                    raise CheckpointError(f"module {name!r}: base weight {key!r} has shape "
                                          f"{stored} but the adapter's lora_B {mod.B.shape} @ "
                                          f"lora_A {mod.A.shape} gives {mod.shape}")
            mod = dataclasses.replace(mod, fan_in_fan_out=conv)
        plan.updates.setdefault(key, []).append(mod)
    _stored_ties(plan, shapes, stems, cfg)
    # Full tensors, matched by module path with the parameter name kept.
    by_param: dict[str, list] = {}
    for k in adapter.tensors:
        stem, _, param = k.rpartition(".")
        by_param.setdefault(param, []).append(stem)
    for param, names in by_param.items():
        avail = {k[: -len(param) - 1] for k in shapes if k.endswith("." + param)}
        tied_names = {n: tied[n] for n in names if n in tied and param == "weight"}
        got = match_modules([n for n in names if n and n not in tied_names
                             and ckpt_name(n, avail) is None],
                            avail, prefix=prefix, what="saved tensor", where="the base",
                            suffix="." + param)
        for n in names:
            name = f"{n}.{param}" if n else param  # "": a top-level tensor (final_logits_bias)
            if not n and param not in shapes:
                raise CheckpointError(f"adapter tensor {param!r} has no tensor of that name in the "
                                      "base")
            key = tied_names.get(n) or (param if not n else f"{got.get(n) or ckpt_name(n, avail)}.{param}")
            arr = adapter.tensors[name]
            if tuple(arr.shape) != tuple(shapes[key]):
                raise CheckpointError(f"adapter tensor {name} has shape {tuple(arr.shape)} "
                                      f"but base {key!r} has {tuple(shapes[key])} (shape mismatch)")
            if key in plan.replace and not np.array_equal(plan.replace[key], arr):
                raise CheckpointError(f"the adapter saves two different values for {key!r}")
            plan.replace[key] = arr
    return plan


def _stored_ties(plan: MergePlan, shapes: dict, stems: set, cfg: dict) -> None:
    """Tied weights saved more than once (:func:`.layouts.stored_ties`): transformers keeps one
    copy on load, so an update to any of them must go to all, as PEFT's shared weight gets it."""
    for source, group in stored_ties(stems, shapes, cfg):
        mods = [m for s in sorted(group) for m in plan.updates.get(f"{s}.weight", [])]
        if not mods:
            continue
        for s in group:
            plan.updates[f"{s}.weight"] = list(mods)
        plan.notes.append(f"{' and '.join(sorted(group - {source}))} tied to {source}: the update "
                          "of any is merged into all (as PEFT's merge_and_unload changes the "
                          "shared weight)")


def _apply(W: np.ndarray, key: str, plan: MergePlan) -> np.ndarray:
    """Replacement then updates, in W's float dtype (float32, or float64 for float64 weights)."""
    return _apply_to(W, plan.replace.get(key), plan.updates.get(key, ()))


def _apply_to(W: np.ndarray, replace, mods) -> np.ndarray:
    if replace is not None:
        W[...] = replace
    for mod in mods:
        A, B = mod.A.astype(W.dtype, copy=False), mod.B.astype(W.dtype, copy=False)
        merge(W.T if mod.transposed else W, A, B, scale=mod.scale)
    return W


def _read_weight(ck: Checkpoint, key: str) -> np.ndarray:
    """A weight to merge into: float32, or float64 kept for float64 weights."""
    return ck.read_raw(key)[0].copy() if ck.dtype(key) == "F64" else ck.read(key)


@dataclasses.dataclass(frozen=True)
class _Update:
    """One base tensor to merge, by name, with what goes into it: picklable for a Dask task."""

    file: str
    key: str
    shape: tuple
    code: str
    replace: object  # ndarray or None
    mods: tuple


class _MergeOpen:
    """Merge into a tensor read from the checkpoint this process holds open."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck

    def __call__(self, job: _Update) -> np.ndarray:
        return _apply_to(_read_weight(self.ck, job.key), job.replace, job.mods)


def _merge_by_path(job: _Update) -> np.ndarray:
    """Merge into a tensor a Dask task reads from its file by path, after checking it is still
    what the client planned."""
    with Checkpoint(job.file) as ck:
        if job.key not in ck or ck.shape(job.key) != job.shape or ck.dtype(job.key) != job.code:
            raise CheckpointError(f"{ck.path}: tensor {job.key!r} changed since the run began "
                                  "(or this worker sees another file at that path)")
        return _apply_to(_read_weight(ck, job.key), job.replace, job.mods)


def _dict_evidence(base) -> set:
    seen = set()
    for k, W in base.items():
        b = base.get(k[: -len("weight")] + "bias") if k.endswith(".weight") else None
        s: tuple[int, ...] = getattr(W, "shape", ())
        if b is not None and len(s) == 2 and s[0] != s[1] and getattr(b, "ndim", 0) == 1:
            if b.shape[0] == s[1]:
                seen.add("conv1d")
            elif b.shape[0] == s[0]:
                seen.add("linear")
    return seen


def merge_adapter(base, adapter, *, prefix=None, config: dict | None = None):
    """Merge a LoRA adapter into base weights, as PEFT's ``merge_and_unload`` does.

    Parameters
    ----------
    base : dict of ndarray, or str or os.PathLike
        A mapping ``{"<module>.weight": W}`` of float32 or float64 arrays, merged **in place**
        (each W must be writable); or a checkpoint path (see :class:`rslora.checkpoint.Checkpoint`),
        read into a new dict of float32 arrays (non-float tensors as stored).
    adapter : LoraAdapter, or str or os.PathLike
        A loaded adapter or a PEFT adapter folder (:func:`rslora.load_adapter`).
    prefix : str, optional
        ``"OLD=NEW"``: adapter module names starting with OLD are base keys starting with NEW
        (``"NEW"`` alone adds NEW). Default: exact names, else a unique dotted suffix.
    config : dict, optional
        The model's config.json content (``model_type`` decides Conv1D layers, and
        ``tie_word_embeddings`` a tied lm_head); read from beside a checkpoint path by default.

    Returns
    -------
    dict
        ``base`` itself when a mapping was given, else the new dict.

    Notes
    -----
    Each update is one GEMM with beta = 1 (:func:`rslora.merge`), in the weight's own dtype; the
    scale is the one PEFT uses (``use_rslora``, ``rank_pattern``, ``alpha_pattern``). Conv1D
    layers (GPT-2) and embeddings get the transposed update; whether a layer is a Conv1D is
    decided per module as PEFT does (see :mod:`rslora.adapters.layouts`).
    """
    adapter = _as_adapter(adapter)
    if isinstance(base, (str, os.PathLike)):
        cfg = model_config(base) if config is None else config
        with Checkpoint(base) as ck:
            weights = {}
            for key in ck.keys():
                weights[key] = ck.read(key) if ck.dtype(key) in ("F32", "F16", "BF16") \
                    else ck.read_raw(key)[0]
        base = weights
    elif not isinstance(base, MutableMapping):
        raise TypeError(f"base must be a dict of arrays or a checkpoint path, got {type(base).__name__}")
    else:
        cfg = config or {}
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in base.items()}
    plan = plan_merge(adapter, shapes, model_cfg=cfg, evidence=_dict_evidence(base), prefix=prefix)
    for key in list(plan.updates) + [k for k in plan.replace if k not in plan.updates]:
        W = base[key]
        if not isinstance(W, np.ndarray) or W.dtype not in (np.float32, np.float64):
            raise TypeError(f"base[{key!r}] must be a float32 or float64 NumPy array, got "
                            f"{getattr(W, 'dtype', type(W).__name__)}")
    for key in list(plan.updates) + [k for k in plan.replace if k not in plan.updates]:
        _apply(base[key], key, plan)
    return base


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """``"5GB"``, ``"500MiB"``, ``2_000_000`` -> bytes (transformers' max_shard_size spelling)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        n = int(size)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if m is None or m[2] not in _UNITS:
            raise ValueError(f"max_shard_size must be a size like '5GB' or '500MB', got {size!r}")
        n = int(float(m[1]) * _UNITS[m[2]])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def _model_folder(base: Path) -> Path | None:
    """The model folder whose other files belong in the output (a folder or an index's folder)."""
    if base.is_dir():
        return base
    if base.name.endswith(".json"):
        return base.parent
    return None


def merge_checkpoint(base, adapter, out_dir, *, dtype: str | None = None, force: bool = False,
                     progress: bool = False, prefix=None, max_shard_size=None,
                     notes: list | None = None, client=None) -> Path:
    """Write ``base`` with ``adapter`` merged into ``out_dir`` as a model folder, one shard in
    memory at a time.

    Parameters
    ----------
    base : str or os.PathLike
        The base model: a folder (config.json, tokenizer files, safetensors weights), an index,
        or a single ``.safetensors`` file.
    adapter : LoraAdapter, or str or os.PathLike
    out_dir : str or os.PathLike
        Output folder, written atomically; an existing folder is replaced only with ``force``.
        For a folder (or index) base: every other file of the folder is copied (config.json,
        generation_config.json, tokenizer files; weights in other formats are not), and the
        weights are written under the base's file names with its index.
    dtype : {"float32", "float16", "bfloat16"}, optional
        Storage dtype of every floating-point tensor (config.json's dtype updated to match);
        default: each tensor's own. Merging runs in float32 (float64 for float64 weights);
        tensors left alone are copied bit for bit.
    prefix : str, optional
        Force the name mapping (see :func:`merge_adapter`).
    max_shard_size : int or str, optional
        Re-shard the weights (``"2GB"``) as transformers names them, instead of the base's files.
    notes : list, optional
        Receives one line per thing worth telling the user (a tied lm_head).
    client : distributed.Client, optional
        Merge the updated tensors of each output file as tasks on this Dask cluster (each
        reads its tensor from BASE's files by path: every worker must see them at the same
        paths); this process writes the files. Same bytes as one process's at equal BLAS
        threads. Default: this process.
    """
    if dtype is not None and (dtype not in DTYPE_CODES or dtype == "float64"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    shard_limit = None if max_shard_size is None else parse_size(max_shard_size)
    inputs = (base, adapter if isinstance(adapter, (str, os.PathLike)) else adapter.path)
    check_output_dir(out_dir, force, inputs)
    adapter = _as_adapter(adapter)
    base_path = Path(os.fspath(base))
    folder = _model_folder(base_path) if base_path.exists() else None
    cfg = model_config(base_path) if base_path.exists() else {}
    with Checkpoint(base) as ck:
        from .layouts import layout_evidence

        shapes = {k: ck.shape(k) for k in ck.keys()}
        plan = plan_merge(adapter, shapes, model_cfg=cfg, evidence=layout_evidence(ck),
                          prefix=prefix)
        for key in set(plan.updates) | set(plan.replace):
            if ck.dtype(key) not in FLOAT_CODES:
                raise CheckpointError(f"base tensor {key!r} is {ck.dtype(key)}, not a float tensor")
        if notes is not None:
            notes.extend(plan.notes)
        groups = _shards(ck, shard_limit, dtype)
        bar = _bar(len(plan.updates), progress)
        weight_map, total = {}, 0
        fn = _MergeOpen(ck) if client is None else _merge_by_path
        with atomic_output_dir(out_dir, force, inputs) as tmp:
            for fname, keys in groups:
                # This file's updated tensors first (as tasks on a cluster), then the file.
                jobs = [_Update(str(ck.file_of(k)), k, ck.shape(k), ck.dtype(k),
                                plan.replace.get(k), tuple(plan.updates.get(k, ())))
                        for k in keys if k in plan.updates or k in plan.replace]
                out_codes = {k: DTYPE_CODES[dtype] if dtype and ck.dtype(k) in FLOAT_CODES
                             else ck.dtype(k) for k in keys}
                # Each tensor goes to its offset in the file as it is ready: one tensor in
                # memory (and the tasks in flight), not the shard.
                with TensorFile(tmp / fname, {k: (out_codes[k], ck.shape(k)) for k in keys}) as f:
                    for i, W in run_items(client, fn, jobs,
                                          weights=[math.prod(j.shape) for j in jobs],
                                          name=lambda j: f"merge-{j.key}"):
                        f.write(jobs[i].key, W)
                        del W
                        bar.update(jobs[i].key in plan.updates)
                    for key in keys:
                        weight_map[key] = fname
                        if key in plan.updates or key in plan.replace:
                            continue  # written above
                        f.write(key, ck.read(key) if out_codes[key] != ck.dtype(key)
                                else ck.read_raw(key)[0])
                total += sum(e - s for s, e in f.ranges.values())
            if len(groups) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            if folder is not None:
                _copy_other_files(folder, tmp, dtype)
        bar.close()
    return Path(os.fspath(out_dir))


def _shards(ck: Checkpoint, limit, dtype) -> list:
    """[(file name, keys)]: the base's files, or new shards of at most ``limit`` bytes."""
    if limit is None:
        by_file: dict[str, list] = {f.name: [] for f in ck.files()}
        for key in ck.keys():
            by_file[ck.file_of(key).name].append(key)
        return [(f, keys) for f, keys in by_file.items() if keys]
    groups: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for key in ck.keys():
        code = ck.dtype(key)
        itemsize = _ITEMSIZE.get(DTYPE_CODES[dtype] if dtype and code in FLOAT_CODES else code, 8)
        n = int(np.prod(ck.shape(key), dtype=np.int64)) * itemsize
        if cur and size + n > limit:
            groups.append(cur)
            cur, size = [], 0
        cur.append(key)
        size += n
    groups.append(cur)
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _copy_other_files(folder: Path, out: Path, dtype) -> None:
    """Copy the model folder's non-weight files (config, tokenizer, ...) into ``out``."""
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith(".") or _OTHER_WEIGHTS.search(f.name):
            continue
        if f.name == "config.json" and dtype is not None:
            cfg = json.loads(f.read_text())
            for k in ("torch_dtype", "dtype"):
                if k in cfg or k == "dtype" and "torch_dtype" not in cfg:
                    cfg[k] = dtype
            (out / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(f, out / f.name)


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}


def _bar(total: int, on: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="merge", unit="layer", disable=None if on else True)
