"""PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow PEFT's saved form, ``base_model.model.<module>.lora_A.weight`` (r, d_in) and
``...lora_B.weight`` (d_out, r), where ``<module>`` is the module's name in the base model (the
checkpoint key without ``.weight``). The scale of each module is computed as PEFT does:
r and alpha from ``rank_pattern`` / ``alpha_pattern`` (first pattern key ``k`` in file order for
which ``re.match(rf"(.*\\.)?({k})$", module)`` matches), else ``r`` / ``lora_alpha``; then
``alpha / math.sqrt(r)`` with ``use_rslora`` and ``alpha / r`` without.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..scaling import scale
from . import lora_config
from .atomic import atomic_output_dir
from .checkpoint import (DTYPE_CODES, FLOAT_CODES, Checkpoint, CheckpointError, read_json_object,
                         save_tensors)

__all__ = ["LoraModule", "LoraAdapter", "load_adapter", "save_adapter", "pattern_key"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?:(?P<part>lora_A|lora_B)\.weight|"
                  r"(?P<emb>lora_embedding_A|lora_embedding_B))$")
#: bias values PEFT's LoraConfig accepts; "all"/"lora_only" adapters carry trained biases.
BIAS_MODES = ("none", "all", "lora_only")


def pattern_key(patterns, module: str) -> str | None:
    """The key of ``patterns`` that PEFT applies to ``module`` (its ``get_pattern_key`` rule:
    the first key ``k``, in order, with ``re.match(rf"(.*\\.)?({k})$", module)``), or None."""
    return lora_config.pattern_key(patterns, module)  # with a time bound on regex keys


@dataclass
class LoraModule:
    """One adapted module: ``W' = W + scale * B @ A``, transposed where the weight is stored
    (in, out): a Conv1D (``fan_in_fan_out``) or an embedding (``kind="embedding"``: A is
    ``lora_embedding_A`` (r, num_embeddings), B ``lora_embedding_B`` (dim, r)).

    ``fan_in_fan_out=None`` (as loaded from a file) means "not known yet": PEFT sets it per
    module from the layer's class, so merging decides it from the model (see ``layouts``).
    """

    name: str
    A: np.ndarray  # (r, d_in)
    B: np.ndarray  # (d_out, r)
    r: int
    alpha: float
    scale: float
    fan_in_fan_out: bool | None = None
    kind: str = "linear"  # or "embedding"

    @property
    def transposed(self) -> bool:
        """Whether the stored weight is (d_in, d_out): Conv1D or embedding."""
        return self.kind == "embedding" or bool(self.fan_in_fan_out)

    @property
    def shape(self) -> tuple[int, int]:
        """The base weight's shape as stored ((d_in, d_out) when :attr:`transposed`)."""
        d_out, d_in = self.B.shape[0], self.A.shape[1]
        return (d_in, d_out) if self.transposed else (d_out, d_in)

    def delta(self) -> np.ndarray:
        """``scale * B @ A`` in float32 (transposed when stored so), the weight update."""
        d = (self.B @ self.A) * np.float32(self.scale)
        return d.T.copy() if self.transposed else d


@dataclass
class LoraAdapter:
    """A loaded LoRA adapter: ``modules`` maps module names to :class:`LoraModule`.

    Behaves as a read-only mapping (``adapter["model.layers.0.self_attn.q_proj"]``, ``len``,
    iteration over names). ``config`` is the ``adapter_config.json`` content.
    """

    modules: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    path: Path | None = None
    #: Full tensors the adapter replaces, by key in the model (``<module>.weight`` / ``.bias``):
    #: ``modules_to_save`` copies, trained biases (``bias="all"/"lora_only"``), and the base
    #: weights PEFT saves beside embedding/lm_head LoRA (``base_layer``), float32.
    tensors: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> LoraModule:
        return self.modules[name]

    def __contains__(self, name) -> bool:
        return name in self.modules

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def __repr__(self) -> str:
        ranks = sorted({m.r for m in self.modules.values()})
        return (f"LoraAdapter({len(self)} modules, r={ranks}, use_rslora={self.use_rslora}"
                + (f", path={str(self.path)!r})" if self.path else ")"))


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} (is this a PEFT adapter folder?)")
    cfg = read_json_object(path)
    lora_config.validate(cfg, path)  # every field as PEFT's LoraConfig takes it
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: peft_type is {cfg['peft_type']!r}; only LORA adapters "
                              "are supported")
    if cfg.get("target_parameters"):  # PEFT's ParamWrapper: 3-D MoE experts, transformers 5 routers
        raise CheckpointError(f"{path}: LoRA on parameters (target_parameters "
                              f"{cfg['target_parameters']!r}, e.g. fused 3-D MoE experts) is not "
                              "supported")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias"),
                       ("use_qalora", "QALoRA"), ("ensure_weight_tying", "ensure_weight_tying")):
        if cfg.get(flag):
            raise CheckpointError(f"{path}: {what} adapters ({flag}=true) are not supported")
    if cfg.get("layer_replication"):
        raise CheckpointError(f"{path}: adapters with layer_replication are not supported")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise CheckpointError(f"{path}: missing {key!r}")
    if cfg.get("bias", "none") not in BIAS_MODES:
        raise CheckpointError(f"{path}: bias is {cfg['bias']!r}; PEFT accepts "
                              f"{', '.join(map(repr, BIAS_MODES))}")
    return cfg


def _full_key(key: str) -> str:
    """A saved full tensor's key in the model: PEFT's wrapper segments dropped."""
    return ".".join(p for p in key.split(".") if p not in ("base_layer", "modules_to_save"))


def adapter_folder(path) -> Path:
    """``path`` as an adapter folder, or the one-line error a user should see."""
    folder = Path(os.fspath(path))
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: an adapter is a folder with {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME}")
    return folder


def load_adapter(path) -> LoraAdapter:
    """Load a PEFT LoRA adapter folder (written by PEFT's ``save_pretrained`` or by rslora).

    Parameters
    ----------
    path : str or os.PathLike
        A folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns
    -------
    LoraAdapter
        Per module: A (r, d_in), B (d_out, r) as float32 (float16/bfloat16 files are widened),
        r and alpha after ``rank_pattern`` / ``alpha_pattern``, and the scale PEFT uses.

    Raises
    ------
    FileNotFoundError
        No such folder or a file missing from it.
    CheckpointError
        An adapter rslora cannot use exactly (DoRA, lora_bias, embedding or other non-Linear
        LoRA keys, a pickled ``adapter_model.bin``), an unreadable file, or shapes that disagree
        with the config.
    """
    folder = adapter_folder(path)
    cfg = _read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise CheckpointError(f"{folder}: only adapter_model.bin (a pickle) is present; "
                                  f"rslora reads {WEIGHTS_NAME} (PEFT's default format)")
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME}")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))
    parts: dict[str, dict] = {}
    adapter = LoraAdapter(config=cfg, path=folder)
    with Checkpoint(weights) as ck:
        for key in ck.keys():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            m = _KEY.match(name)
            if m is not None:
                part = m["part"] or m["emb"]
                parts.setdefault(m["module"], {})[part] = ck.read(key)
            elif "lora_" in name or "magnitude" in name:
                why = "DoRA" if "magnitude" in name else "a LoRA variant rslora cannot apply"
                raise CheckpointError(f"{weights}: tensor {key!r} belongs to {why} (module "
                                      f"{name.split('.lora_')[0]!r}); not supported")
            else:  # modules_to_save copies, trained biases, saved base layers
                code = ck.dtype(key)
                adapter.tensors[_full_key(name)] = ck.read(key) if code in FLOAT_CODES \
                    else ck.read_raw(key)[0]
    for name, p in parts.items():
        emb = any(k.startswith("lora_embedding") for k in p)
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        if set(p) != {a_key, b_key}:
            missing = sorted({a_key, b_key} - set(p)) or sorted(p)
            raise CheckpointError(f"{weights}: module {name!r} has no {missing[0]}"
                                  f"{'' if emb else '.weight'}" + ("" if set(p) <= {a_key, b_key}
                                  else " (it mixes Linear and embedding LoRA keys)"))
        A, B = p[a_key], p[b_key]
        if A.ndim != 2 or B.ndim != 2:
            raise CheckpointError(f"{weights}: module {name!r} has {A.ndim}-D LoRA factors "
                                  f"{A.shape}, {B.shape}: not a Linear, Conv1D or Embedding layer "
                                  "(unknown layer type); not supported")
        rk, ak = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
        r = int(rank_pattern[rk]) if rk is not None else int(cfg["r"])
        alpha = alpha_pattern[ak] if ak is not None else cfg["lora_alpha"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise CheckpointError(f"{weights}: module {name!r} has lora_A {A.shape} and lora_B "
                                  f"{B.shape}, but the config gives it r={r}")
        s = scale(alpha, r, "rslora" if use_rslora else "standard")
        adapter.modules[name] = LoraModule(name, A, B, r, alpha, s,
                                           kind="embedding" if emb else "linear")
    lora_config.check_scale(adapter, folder)
    return adapter


def common_rank(ranks: dict) -> int:
    """The most common value of ``{module: r}`` (the larger on ties; 1 if empty)."""
    counts: dict[int, int] = {}
    for k in ranks.values():
        counts[k] = counts.get(k, 0) + 1
    return max(counts, key=lambda k: (counts[k], k)) if counts else 1


def peft_config(ranks: dict, alpha: float, use_rslora: bool, *, base_model=None,
                r: int | None = None, fan_in_fan_out: bool = False) -> dict:
    """An ``adapter_config.json`` for modules with the given ranks (``{module: r}``).

    ``r`` defaults to the most common rank; the others go to ``rank_pattern``, whose keys are
    the module names (escaped as regexes only if PEFT's matching rule would otherwise give a
    module another's rank). ``lora_alpha`` is the same for all modules, so no alpha_pattern.
    """
    r = common_rank(ranks) if r is None else r
    differing = {m: k for m, k in ranks.items() if k != r}
    # Longest names first: a name that is a dotted suffix of another must not be matched first.
    rank_pattern = {m: differing[m] for m in sorted(differing, key=len, reverse=True)}
    if any(ranks[m] != (rank_pattern[pattern_key(rank_pattern, m)]
                        if pattern_key(rank_pattern, m) is not None else r) for m in ranks):
        rank_pattern = {re.escape(m): k for m, k in rank_pattern.items()}
    alpha = float(alpha)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None if base_model is None else str(base_model),
        "r": int(r),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "use_rslora": bool(use_rslora),
        "target_modules": sorted(ranks),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": bool(fan_in_fan_out),
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


def factor_keys(module: str, embedding: bool = False) -> tuple[str, str]:
    """The keys of a module's A and B in ``adapter_model.safetensors``: ``lora_A.weight`` /
    ``lora_B.weight``, or PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings."""
    a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else \
        ("lora_A.weight", "lora_B.weight")
    return f"{PREFIX}{module}.{a}", f"{PREFIX}{module}.{b}"


def write_adapter_config(folder: Path, config: dict) -> None:
    """Write ``config`` as ``folder/adapter_config.json``."""
    # Top-level keys sorted as PEFT writes them; rank_pattern keeps its order (PEFT takes the
    # first matching key, so json's sort_keys would change which rank a module gets).
    (folder / CONFIG_NAME).write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")


def write_adapter_files(folder: Path, factors: dict, config: dict, dtype: str = "float32",
                        embeddings=(), full=None) -> None:
    """Write ``{module: (A, B)}`` and ``config`` into ``folder`` (which must exist); modules in
    ``embeddings`` are written as PEFT's ``lora_embedding_A`` / ``lora_embedding_B``; ``full``
    maps keys in the PEFT model (``<module>.base_layer.bias``, ...) to tensors saved whole."""
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
    code = DTYPE_CODES[dtype]
    tensors = {}
    for name, (A, B) in factors.items():
        a, b = factor_keys(name, name in embeddings)
        tensors[a], tensors[b] = (A, code), (B, code)
    for key, arr in (full or {}).items():
        tensors[f"{PREFIX}{key}"] = (arr, code)
    save_tensors(folder / WEIGHTS_NAME, tensors)
    write_adapter_config(folder, config)


def save_adapter(out_dir, factors: dict, *, alpha: float, rule: str = "rslora", base_model=None,
                 dtype: str = "float32", force: bool = False) -> dict:
    """Write a PEFT LoRA adapter folder atomically.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Created (via a temporary sibling folder renamed into place). An existing folder is
        replaced only with ``force=True``.
    factors : dict
        ``{module: (A, B)}``, A (r, d_in), B (d_out, r), for ``W' = W + s * B @ A`` with
        ``s = alpha / sqrt(r)`` (``rule="rslora"``) or ``alpha / r`` (``"standard"``).
    alpha : float
        ``lora_alpha``, the same for every module.
    dtype : {"float32", "float16", "bfloat16"}
        Storage dtype of the factors.

    Returns
    -------
    dict
        The config written.
    """
    if rule not in ("rslora", "standard"):
        raise ValueError(f"rule must be 'rslora' or 'standard', got {rule!r}")
    ranks = {name: int(A.shape[0]) for name, (A, B) in factors.items()}
    config = peft_config(ranks, alpha, rule == "rslora", base_model=base_model)
    with atomic_output_dir(out_dir, force) as tmp:
        write_adapter_files(tmp, factors, config, dtype)
    return config
