"""Extraction of a LoRA adapter from two checkpoints: ``tuned - base`` per 2-D weight, factored
by the randomized SVD, written as a PEFT adapter (see :func:`extract_adapter`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_output_dir, check_output_dir
from .peft_format import common_rank, peft_config, write_adapter_files
from .checkpoint import DTYPE_CODES, FLOAT_CODES, Checkpoint, CheckpointError

__all__ = ["extract_adapter", "ExtractResult", "LayerReport", "EMBEDDING_NAMES"]

#: Module names treated as embeddings and left out: PEFT adapts nn.Embedding with other keys
#: (lora_embedding_A/B) than the Linear layers an extracted adapter describes.
EMBEDDING_NAMES = re.compile(r"(^|\.)(embed_tokens|embed_positions|embed_in|word_embeddings|"
                             r"position_embeddings|token_type_embeddings|wte|wpe)$")


@dataclass
class LayerReport:
    """One extracted module: its rank, the share of ``||delta||_F^2`` the adapter keeps, and the
    relative Frobenius error ``||delta - s B A||_F / ||delta||_F`` (measured, not estimated)."""

    module: str
    shape: tuple
    rank: int
    energy: float
    error: float
    norm: float  # ||delta||_F


@dataclass
class ExtractResult:
    out_dir: Path
    config: dict
    layers: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # module -> why
    only_in_base: list = field(default_factory=list)
    only_in_tuned: list = field(default_factory=list)
    #: Tensors of other shapes (biases, norms) that differ: a LoRA adapter cannot carry them.
    changed_not_extracted: list = field(default_factory=list)

    @property
    def error(self) -> float:
        """Relative Frobenius error over all extracted layers together."""
        num = sum((l.error * l.norm) ** 2 for l in self.layers)
        den = sum(l.norm ** 2 for l in self.layers)
        return math.sqrt(num / den) if den else 0.0

    def summary(self) -> str:
        """The per-layer table (rank, energy kept, relative error) as aligned text."""
        w = max([len("module")] + [len(l.module) for l in self.layers])
        head = f"{'module':<{w}}  {'shape':>12}  {'rank':>5}  {'energy kept':>12}  {'rel. error':>10}"
        lines = [head, "-" * len(head)]
        for l in self.layers:
            shape = "x".join(map(str, l.shape))
            lines.append(f"{l.module:<{w}}  {shape:>12}  {l.rank:>5}  {l.energy:>12.6f}  "
                         f"{l.error:>10.3e}")
        params = sum(l.rank * sum(l.shape) for l in self.layers)
        lines.append("-" * len(head))
        lines.append(f"{len(self.layers)} layer(s), {params:,} adapter parameters, overall "
                     f"relative error {self.error:.3e}")
        for name, why in self.skipped.items():
            lines.append(f"skipped {name}: {why}")
        return "\n".join(lines)


def _compile(pattern, what):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} is not a valid regular expression ({e}): {pattern!r}") from None


def _plan(base: Checkpoint, tuned: Checkpoint, include, exclude, result: ExtractResult):
    """The modules to extract, checked before any work: shapes, dtypes, presence."""
    def candidates(ck):
        return {k[: -len(".weight")]: k for k in ck.keys() if k.endswith(".weight")}

    cb, ct = candidates(base), candidates(tuned)
    modules = []
    for m in list(cb) + [m for m in ct if m not in cb]:
        if include is not None and not include.search(m) or exclude is not None and exclude.search(m):
            continue
        key = f"{m}.weight"
        if m not in ct or m not in cb:
            if len((base if m in cb else tuned).shape(key)) == 2:
                (result.only_in_base if m in cb else result.only_in_tuned).append(key)
            continue
        sb, st = base.shape(key), tuned.shape(key)
        if sb != st:
            raise CheckpointError(f"tensor {key!r} has shape {sb} in {base.path} but {st} in "
                                  f"{tuned.path}")
        if len(sb) != 2:
            continue
        for ck in (base, tuned):
            if ck.dtype(key) not in FLOAT_CODES:
                raise CheckpointError(f"{ck.file_of(key)}: tensor {key!r} is {ck.dtype(key)}, not "
                                      "a float tensor; leave it out with --exclude")
        if EMBEDDING_NAMES.search(m):
            result.skipped[m] = "an embedding (PEFT stores embedding LoRA differently)"
            continue
        modules.append(m)
    for key in base.keys():  # biases, norms: small, so compared in full
        if key in tuned and len(base.shape(key)) <= 1 and base.shape(key) == tuned.shape(key) \
                and base.dtype(key) in FLOAT_CODES and tuned.dtype(key) in FLOAT_CODES \
                and not np.array_equal(base.read(key), tuned.read(key)):
            result.changed_not_extracted.append(key)
    return modules


def extract_adapter(base, tuned, out_dir, *, rank: int | None = None, tol: float | None = None,
                    max_rank: int | None = None, rule: str = "rslora", alpha: float | None = None,
                    include: str | None = None, exclude: str | None = None,
                    dtype: str = "float32", on_missing: str = "error", force: bool = False,
                    seed: int | None = 0, progress: bool = False) -> ExtractResult:
    """Extract a PEFT LoRA adapter approximating ``tuned - base``.

    Parameters
    ----------
    base, tuned : str or os.PathLike
        Checkpoints (a ``.safetensors`` file, a folder, or a ``*.safetensors.index.json``).
        Float16, bfloat16, float32 and float64 weights are read and differenced in float32.
    out_dir : str or os.PathLike
        The adapter folder to write (``adapter_config.json``, ``adapter_model.safetensors``),
        atomically: nothing appears unless extraction completes. Replaced only with ``force``.
    rank : int, optional
        Fixed rank for every layer (capped at ``min(d_out, d_in)``).
    tol : float, optional
        Instead of ``rank``: per layer, the smallest rank whose relative Frobenius error
        ``||delta - s B A||_F / ||delta||_F`` is at most ``tol`` (up to ``max_rank``).
    max_rank : int, optional
        Upper bound on the rank with ``tol``.
    rule : {"rslora", "standard"}
        Written as ``use_rslora``: scale ``alpha / sqrt(r)`` or ``alpha / r``.
    alpha : float, optional
        ``lora_alpha`` for every layer; default: the adapter's ``r`` (its most common rank).
        Any value gives the same merged weights; it only sets how the scale is split.
    include, exclude : str, optional
        Regular expressions searched in module names (checkpoint keys without ``.weight``).
    dtype : {"float32", "float16", "bfloat16"}
        Storage dtype of the factors.
    on_missing : {"error", "skip"}
        What to do with 2-D weights present in only one checkpoint.
    seed : int or None
        Seed of the randomized SVD (per layer, derived from it); None draws fresh entropy.
    progress : bool
        Show a progress bar over layers (on a terminal).

    Returns
    -------
    ExtractResult
        The config written, a :class:`LayerReport` per layer, and what was left out.

    Notes
    -----
    Layers are processed one at a time: peak memory is about two float32 copies of the
    largest weight, plus the factors. Zero deltas (unchanged weights) and embeddings are
    skipped and reported. Keys are ``base_model.model.<module>.lora_A.weight`` (r, d_in) and
    ``...lora_B.weight`` (d_out, r).
    """
    if (rank is None) == (tol is None):
        raise ValueError("give exactly one of rank= and tol=")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                             or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if tol is not None and not (0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank!r}")
    if rule not in ("rslora", "standard"):
        raise ValueError(f"rule must be 'rslora' or 'standard', got {rule!r}")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if dtype not in DTYPE_CODES or dtype == "float64":
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    out = check_output_dir(out_dir, force, inputs=(base, tuned))

    result = ExtractResult(out_dir=out, config={})
    with Checkpoint(base) as cb, Checkpoint(tuned) as ct:
        modules = _plan(cb, ct, inc, exc, result)
        for side, names in (("BASE", result.only_in_base), ("TUNED", result.only_in_tuned)):
            if names and on_missing == "error":
                raise CheckpointError(f"{len(names)} weight(s) only in {side}, e.g. {names[0]!r}; "
                                      "pass --on-missing skip (on_missing='skip') to leave them out")
        if not modules:
            raise CheckpointError("no 2-D weight to extract (is --include/--exclude too narrow?)")
        factors = _factor_all(cb, ct, modules, rank, tol, max_rank, seed, progress, result)
    if not factors:
        raise CheckpointError("every selected weight is unchanged between BASE and TUNED: "
                              "nothing to extract")

    ranks = {m: A.shape[0] for m, (A, B) in factors.items()}
    a = float(common_rank(ranks)) if alpha is None else float(alpha)
    config = peft_config(ranks, a, rule == "rslora", base_model=base)
    for m, (A, B) in factors.items():
        # Factors were computed for s = 1 (B A = delta_r); split s evenly over both sides.
        r = A.shape[0]
        root = np.float32(math.sqrt(a / math.sqrt(r) if rule == "rslora" else a / r))
        A /= root
        B /= root
    with atomic_output_dir(out, force, inputs=(base, tuned)) as tmp:
        write_adapter_files(tmp, factors, config, dtype)
    result.config = config
    return result


def _factor_all(cb, ct, modules, rank, tol, max_rank, seed, progress, result) -> dict:
    from tqdm.auto import tqdm

    import rslora

    factors = {}
    seeds = np.random.SeedSequence(seed).spawn(len(modules))
    bar = tqdm(modules, desc="extract", unit="layer", disable=None if progress else True)
    for m, ss in zip(bar, seeds):
        key = f"{m}.weight"
        delta = ct.read(key)
        delta -= cb.read(key)
        if not np.isfinite(delta).all():
            raise CheckpointError(f"tensor {key!r}: the delta has NaN or Inf entries")
        norm = float(np.linalg.norm(delta))
        if norm == 0.0:
            result.skipped[m] = "unchanged (zero delta)"
            continue
        s = int(ss.generate_state(1)[0])
        if rank is not None:
            A, B = rslora.lora_from_delta(delta, min(rank, *delta.shape), seed=s)
        else:
            cap = None if max_rank is None else min(max_rank, *delta.shape)  # as --rank is
            A, B = rslora.lora_from_delta(delta, tol=tol, max_rank=cap, seed=s)
        if A.shape[0] == 0:
            result.skipped[m] = "rank 0 meets the tolerance"
            continue
        rslora.unmerge(delta, A, B, scale=1.0)  # delta becomes the residual
        err = float(np.linalg.norm(delta)) / norm
        result.layers.append(LayerReport(m, tuple(delta.shape), int(A.shape[0]),
                                         max(0.0, 1.0 - err * err), err, norm))
        factors[m] = (A, B)
        del delta
    bar.close()
    return factors
