"""Rewriting a PEFT LoRA adapter in place of its factors: what ``convert`` and ``resize`` share.

An adapter is opened lazily (:func:`open_raw_adapter`): the config and the tensors' names, dtypes
and shapes are read and checked first, then each module's factors are read when asked for
(:meth:`RawAdapter.factors`: float64, with their storage dtype) and written to the new file at
their offsets (:func:`adapter_file`, a :class:`.safetensors_stream.TensorFile`), so a rewrite holds
one module's factors at a time, not the adapter. Every other tensor (``modules_to_save`` copies,
trained biases, saved embedding layers, trainable tokens) is copied as stored, one at a time, as
are the adapter folder's other files (README, tokenizer) and config fields. The file is the one
``safetensors`` writes from all tensors at once, byte for byte.

Only the product ``B @ A`` and the scale matter here, so the layouts need no special case: PEFT
stores ``A (r, d_in)``, ``B (d_out, r)`` for Linear and Conv1D alike (``fan_in_fan_out`` only
transposes the merged delta) and ``(B @ A).T`` is an embedding's delta.

The written config is in *uniform-scale form*: every module's scale is ``lora_alpha / r`` (or
``/ sqrt(r)`` with ``use_rslora``) for the config's top-level ``r``, and modules of another rank
get an ``alpha_pattern`` entry that gives them that same scale. A client that honours the
patterns (PEFT) and one that applies the top-level scale to every module (several serving
stacks) then compute the same update.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..scaling import scale as lora_scale
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    from_bfloat16_bits,
    to_bfloat16_bits,
)
from .peft_format import (CONFIG_NAME, WEIGHTS_NAME, _read_config, adapter_folder, common_rank,
                          pattern_key)
from .safetensors_stream import WRITABLE_CODES, TensorFile

__all__ = ["ModuleFactors", "RawAdapter", "open_raw_adapter", "module_patterns",
           "uniform_config", "adapter_file", "write_factors", "write_folder_files",
           "narrow"]

_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
                     r"lora_embedding_A|lora_embedding_B)$")
_PREFIX = "base_model.model."
#: Config fields of LoRA variants whose update is not ``scale * B @ A`` with plain factors.
_VARIANTS = ("kasa_config", "monteclora_config", "use_bdlora", "arrow_config",
             "target_parameters")
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")


@dataclass
class ModuleFactors:
    """One adapted module (no arrays: see :meth:`RawAdapter.factors`): update ``scale * B @ A``
    (transposed for embeddings/fan_in_fan_out), ``A (r, d_in)``, ``B (d_out, r)``."""

    name: str  # the module's name in the base model (PEFT's key for rank/alpha patterns)
    a_key: str
    b_key: str
    a_code: str  # storage dtype (safetensors code)
    b_code: str
    r: int
    alpha: float
    scale: float
    embedding: bool
    shape: tuple[int, int]  # (d_out, d_in) of the product B @ A


@dataclass
class RawAdapter:
    """An adapter open for rewriting: checked, its tensors not read yet. Close it (or use it as
    a context manager) when done."""

    path: Path
    config: dict
    rule: str  # "rslora" or "standard"
    weights: Path
    modules: dict = field(default_factory=dict)  # name -> ModuleFactors, in file order
    other: dict = field(default_factory=dict)  # key -> (code, shape), in file order
    order: list = field(default_factory=list)  # every tensor key, in file order
    checkpoint: Checkpoint | None = None

    def stored(self, name: str, part: str) -> np.ndarray:
        """Module ``name``'s factor ``part`` ("A" or "B") as stored (bfloat16 as its bit
        patterns), read from the file. CheckpointError if a value is not finite."""
        m = self.modules[name]
        key, code = (m.a_key, m.a_code) if part == "A" else (m.b_key, m.b_code)
        x = self._read(key)
        finite = (x & 0x7F80) != 0x7F80 if code == "BF16" else np.isfinite(x)
        if not finite.all():
            raise CheckpointError(f"{self.weights}: module {name!r}: factor {part} holds NaN or "
                                  "inf")
        return x

    def factors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Module ``name``'s ``(A, B)`` read from the file, in float64 (see :meth:`stored`)."""
        m = self.modules[name]
        return (_widen(self.stored(name, "A"), m.a_code),
                _widen(self.stored(name, "B"), m.b_code))

    def kept(self, name: str, factor: float, what: str) -> tuple[tuple, tuple]:
        """Module ``name``'s factors for :func:`write_factors` with ``B`` times ``factor``:
        ``A`` as stored (what rounding it from float64 gives, bit for bit), ``B`` too when
        ``factor`` is 1, else ``B * factor`` in float64 rounded once (``what`` names it in an
        overflow error)."""
        m = self.modules[name]
        a = (self.stored(name, "A"), m.a_code)
        B = self.stored(name, "B")
        if factor == 1.0:
            return a, (B, m.b_code)
        return a, narrow(_widen(B, m.b_code) * factor, m.b_code, what)

    def _read(self, key: str) -> np.ndarray:
        if self.checkpoint is None:
            raise ValueError(f"{self.weights} is closed")
        return self.checkpoint.read_raw(key)[0]

    def copy_other(self, out: TensorFile) -> None:
        """Write every tensor that is not a LoRA factor into ``out`` as stored, one at a time."""
        for key in self.other:
            out.write(key, self._read(key))

    def specs(self, ranks: dict) -> dict:
        """``{key: (code, shape)}`` of every tensor of the rewritten file, module ``m`` at rank
        ``ranks[m]``."""
        specs = dict(self.other)
        for name, m in self.modules.items():
            d_out, d_in = m.shape
            specs[m.a_key] = (m.a_code, (ranks[name], d_in))
            specs[m.b_key] = (m.b_code, (d_out, ranks[name]))
        return {key: specs[key] for key in self.order}

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()
            self.checkpoint = None

    def __enter__(self) -> RawAdapter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _widen(arr: np.ndarray, code: str) -> np.ndarray:
    if code == "BF16" and arr.dtype == np.uint16:  # bit patterns (checkpoint.read_raw)
        arr = from_bfloat16_bits(arr)
    return np.asarray(arr, dtype=np.float64)


def _round_to_odd_f32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd: truncate, then set the last bit if anything was lost.
    Rounding that to a narrower format (bfloat16) is then correctly rounded from float64 in one
    step, which float64 -> float32 -> bfloat16 by nearest is not (a value just above a bfloat16
    tie can land on the tie in float32 and then round down)."""
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, caught by narrow
        f = x.astype(np.float32)
        toward_zero = np.abs(f.astype(np.float64)) > np.abs(x)
    f = np.where(toward_zero, np.nextafter(f, np.float32(0)), f)
    bits = f.view(np.uint32).copy()
    inexact = (f.astype(np.float64) != x) & np.isfinite(x)
    bits[inexact] |= np.uint32(1)
    return bits.view(np.float32)


def narrow(x: np.ndarray, code: str, what: str) -> tuple[np.ndarray, str]:
    """float64 ``x`` rounded once to the storage dtype ``code``, for :func:`save_tensors`.
    ValueError naming ``what`` if a value does not fit."""
    if code == "BF16":
        out = to_bfloat16_bits(_round_to_odd_f32(x))
        finite = np.isfinite(from_bfloat16_bits(out))
    else:
        with np.errstate(over="ignore"):
            out = x.astype({"F64": np.float64, "F32": np.float32, "F16": np.float16}[code])
        finite = np.isfinite(out)
    if not finite.all():
        big = float(np.abs(x[~finite]).max())
        raise ValueError(f"{what}: a value ({big:.3g}) overflows {code} storage")
    return out, code


def open_raw_adapter(path) -> RawAdapter:
    """Open a PEFT LoRA adapter folder for rewriting (see the module docstring): the config and
    the file's header are read and checked, no tensor yet.

    Raises FileNotFoundError / CheckpointError (a ValueError) with a one-line message naming the
    file, field or module: not an adapter, a variant whose update is not ``scale * B @ A``
    (DoRA, lora_bias, ...), an unknown LoRA tensor, factors of the wrong shape, a tensor of a
    dtype rslora cannot copy. Non-finite factors are found as they are read
    (:meth:`RawAdapter.factors`).
    """
    folder = adapter_folder(path)
    cfg = _read_config(folder)
    for key in _VARIANTS:
        if cfg.get(key):
            raise CheckpointError(f"{folder / CONFIG_NAME}: {key} is set; only plain LoRA "
                                  "factors (update = scale * B @ A) can be rewritten")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CheckpointError(f"{folder / CONFIG_NAME}: r must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not math.isfinite(alpha) or alpha == 0:
        raise CheckpointError(f"{folder / CONFIG_NAME}: lora_alpha must be a finite nonzero "
                              f"number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise CheckpointError(f"{folder / CONFIG_NAME}: {key} must be an object")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise CheckpointError(f"{folder}: only adapter_model.bin (a pickle) is present; "
                                  f"rslora reads {WEIGHTS_NAME} (PEFT's default format)")
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME}")
    rule = "rslora" if cfg.get("use_rslora") else "standard"
    ck = Checkpoint(weights)
    try:
        raw = RawAdapter(folder, cfg, rule, weights, checkpoint=ck)
        _plan(raw, ck)
    except BaseException:
        ck.close()
        raise
    return raw


def _plan(raw: RawAdapter, ck: Checkpoint) -> None:
    """Fill ``raw``'s modules and other tensors from the header of ``ck``, checked."""
    cfg, weights = raw.config, raw.weights
    parts: dict[str, dict] = {}
    for key in ck.keys():  # noqa: SIM118 (Checkpoint is not iterable)
        raw.order.append(key)
        code, shape = ck.dtype(key), ck.shape(key)
        m = _FACTOR.match(key)
        if m is None:
            if re.search(r"(^|\.)lora_", key):
                raise CheckpointError(f"{weights}: tensor {key!r} is a LoRA tensor rslora "
                                      "cannot rewrite exactly (only lora_A/lora_B and "
                                      "lora_embedding_A/B)")
            if code not in WRITABLE_CODES:
                raise CheckpointError(f"{weights}: tensor {key!r} is {code}, which rslora cannot "
                                      f"copy (one of {', '.join(WRITABLE_CODES)})")
            raw.other[key] = (code, shape)
            continue
        if code not in _FLOAT_CODES:
            raise CheckpointError(f"{weights}: tensor {key!r} is {code}, not a float tensor")
        part = m["part"].replace(".weight", "").replace("embedding_", "")
        parts.setdefault(m["module"], {})[part] = (key, code, shape, "embedding" in m["part"])
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for mod, p in parts.items():
        name = mod.removeprefix(_PREFIX)
        if set(p) != {"lora_A", "lora_B"} or p["lora_A"][3] != p["lora_B"][3]:
            have = ", ".join(sorted(v[0][len(mod) + 1:] for v in p.values()))
            raise CheckpointError(f"{weights}: module {name!r} needs both LoRA factors of one "
                                  f"kind, has {have}")
        (a_key, a_code, a_shape, emb), (b_key, b_code, b_shape, _) = p["lora_A"], p["lora_B"]
        try:
            rk, ak = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
        except re.error as e:
            raise CheckpointError(f"{raw.path / CONFIG_NAME}: a rank_pattern or alpha_pattern "
                                  f"key is not a valid regular expression ({e})") from None
        r_m = rank_pattern[rk] if rk is not None else cfg["r"]
        alpha_m = alpha_pattern[ak] if ak is not None else cfg["lora_alpha"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r_m or b_shape[1] != r_m:
            raise CheckpointError(f"{weights}: module {name!r} has A {tuple(a_shape)} and B "
                                  f"{tuple(b_shape)}, but the config gives it r={r_m!r}")
        if isinstance(alpha_m, bool) or not isinstance(alpha_m, (int, float)) \
                or not math.isfinite(alpha_m):
            raise CheckpointError(f"{raw.path / CONFIG_NAME}: alpha_pattern gives module "
                                  f"{name!r} a non-number {alpha_m!r}")
        raw.modules[name] = ModuleFactors(name, a_key, b_key, a_code, b_code, int(r_m),
                                          float(alpha_m), lora_scale(alpha_m, int(r_m), raw.rule),
                                          emb, (int(b_shape[0]), int(a_shape[1])))
    if not raw.modules:
        raise CheckpointError(f"{weights}: no LoRA factors in it")


def module_patterns(values: dict, default) -> dict:
    """A PEFT pattern dict (``rank_pattern`` / ``alpha_pattern``) giving each module of
    ``values`` (``{module: value}``) its value, and ``default`` to modules with no entry.

    Keys are the module names, longest first (names of one length in the order of ``values``, so
    the config's bytes do not depend on the string hash seed); they are regex-escaped, and
    modules at the default that a shorter key would catch get their own entry, only if PEFT's
    suffix-regex matching (:func:`pattern_key`) would otherwise give a module a wrong value.
    """
    def lookup(pat, m):
        k = pattern_key(pat, m)
        return default if k is None else pat[k]

    for esc in (str, re.escape):
        keys = {m for m, v in values.items() if v != default}
        while True:
            pat = {esc(m): values[m] for m in sorted((m for m in values if m in keys), key=len,
                                                     reverse=True)}  # stable: ties in order
            try:
                wrong = {m for m in values if lookup(pat, m) != values[m]}
            except re.error:  # a name that is no valid regex as it stands
                break
            if not wrong:
                return pat
            if wrong <= keys:
                break
            keys |= wrong
    raise AssertionError("escaped module names always give an exact pattern")  # pragma: no cover


def _json_number(x: float):
    """An alpha as PEFT writes it: an int when it is one."""
    x = float(x)
    return int(x) if x.is_integer() and abs(x) < 2 ** 53 else x


def uniform_config(config: dict, ranks: dict, alpha: float, rule: str) -> tuple[dict, dict]:
    """``config`` rewritten for modules of ranks ``{module: r}`` under ``rule`` and top-level
    ``lora_alpha = alpha`` in uniform-scale form (module docstring). Returns the new config and
    ``{module: the scale PEFT will compute for it}`` (the value to fold the factors against)."""
    r = common_rank(ranks)
    alphas = {m: alpha * (math.sqrt(k / r) if rule == "rslora" else k / r)
              for m, k in ranks.items()}
    alphas = {m: (alpha if ranks[m] == r else a) for m, a in alphas.items()}
    cfg = dict(config)
    cfg.update(r=int(r), lora_alpha=_json_number(alpha), use_rslora=rule == "rslora",
               rank_pattern=module_patterns(ranks, r),
               alpha_pattern={k: _json_number(v) for k, v in
                              module_patterns(alphas, alpha).items()})
    a_written = {m: float(_json_number(a)) for m, a in alphas.items()}
    scales = {m: lora_scale(a_written[m], ranks[m], rule) for m in ranks}
    return cfg, scales


def adapter_file(raw: RawAdapter, folder: Path, ranks: dict) -> TensorFile:
    """``folder/adapter_model.safetensors`` for ``raw`` rewritten with module ``m`` at rank
    ``ranks[m]``, its header written: write each module's narrowed factors
    (:func:`write_factors`) and ``raw.copy_other``, in any order, then close it (as a
    ``with`` block)."""
    return TensorFile(folder / WEIGHTS_NAME, raw.specs(ranks))


def write_factors(out: TensorFile, m: ModuleFactors, a: tuple, b: tuple) -> None:
    """Store module ``m``'s new factors ``a``, ``b`` (``(array, code)`` from :func:`narrow`)."""
    out.write(m.a_key, a[0])
    out.write(m.b_key, b[0])


def write_folder_files(raw: RawAdapter, folder: Path, config: dict) -> None:
    """Write ``config`` and copy every other file of the input folder into ``folder``."""
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    for f in sorted(raw.path.iterdir()):
        # adapter_model.bin would hold the old weights: a loader preferring it would be wrong
        if f.is_file() and f.name not in (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin") \
                and not f.name.startswith("."):
            shutil.copy2(f, folder / f.name)
