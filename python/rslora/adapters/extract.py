"""Extraction of a LoRA adapter from two checkpoints: ``tuned - base`` per 2-D weight, factored
by the randomized SVD, written as a PEFT adapter (see :func:`extract_adapter`)."""

from __future__ import annotations

import math
import re
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_output_dir, check_output_dir
from .checkpoint import DTYPE_CODES, FLOAT_CODES, Checkpoint, CheckpointError
from .layouts import (EMBEDDING_NAMES, layout_evidence, model_config, module_renames,
                      rename_module, stored_conv1d, stored_ties)
from .naming import match_modules, parse_prefix
from .factor_stream import FactorStream
from .peft_format import peft_config, write_adapter_config

__all__ = ["extract_adapter", "ExtractResult", "LayerReport", "EMBEDDING_NAMES"]


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
    #: Non-2-D tensors in only one checkpoint, or of other shapes: signs of different models.
    structure_differs: list = field(default_factory=list)
    #: Module -> "linear", "conv1d" or "embedding": the PEFT layout each module was written in.
    layouts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    tied: bool = False  # config.json ties the output layer to the input embedding

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


def _split(key: str) -> tuple[str, str]:
    stem, _, param = key.rpartition(".")
    return stem, param


def _join(stem: str, param: str) -> str:
    """The inverse of :func:`_split`: a top-level tensor (BART's ``final_logits_bias``) has no
    module part."""
    return f"{stem}.{param}" if stem else param


def _check_same_model(base, tuned, cb, ct, result):
    """Refuse two checkpoints whose config.json name different architectures; return the config."""
    fb, ft = model_config(base), model_config(tuned)
    tb, tt = fb.get("model_type"), ft.get("model_type")
    if tb and tt and tb != tt:
        raise CheckpointError(f"BASE is a {tb!r} model and TUNED a {tt!r} model (config.json "
                              "model_type): they are different architectures")
    if ft.get("tie_word_embeddings") or fb.get("tie_word_embeddings"):
        result.tied = True
        result.notes.append("the model ties lm_head to its input embedding: an extracted "
                            "embedding LoRA reproduces TUNED once merged (PEFT merges it into the "
                            "shared weight); unmerged, PEFT applies it to the input side only")
    return ft or fb


def _plan(base: Checkpoint, tuned: Checkpoint, include, exclude, result: ExtractResult,
          prefix=None, model_type=None, saved=frozenset(), cfg=None, renames=None):
    """The modules to extract, checked before any work: names, shapes, dtypes, layouts.

    Returns ``[(adapter module name, base key, tuned key, layout)]``. TUNED's keys are matched
    to BASE's by module path (exact, else a unique dotted suffix); the adapter names modules as
    TUNED does, rewritten by ``prefix`` ("OLD=NEW": TUNED's NEW... is the adapter's OLD...).
    TUNED's keys in ``saved`` (the modules saved whole) are neither extracted nor reported.
    """
    stems_b = {_split(k)[0] for k in base.keys()}
    stems_t = {_split(k)[0] for k in tuned.keys()}
    found, _ = match_modules(sorted(stems_t), stems_b, what="TUNED module", where="BASE",
                             partial=True)
    key_map = {}  # tuned key -> base key
    for k in tuned.keys():
        stem, param = _split(k)
        if stem in found and f"{found[stem]}.{param}" in base:
            key_map[k] = f"{found[stem]}.{param}"
        elif not stem and k in base:  # a top-level tensor: no module path to match
            key_map[k] = k
    mapped_b = set(key_map.values())
    rewrite = parse_prefix(prefix)
    evidence = layout_evidence(tuned)
    # Tied weights saved more than once: transformers keeps the source, and an adapter with a
    # LoRA per copy would add the update once per copy to the one shared weight.
    weights = {k: tuned.shape(k) for k in tuned.keys() if k.endswith(".weight")}
    copies = {m: src for src, group in stored_ties({k[: -len(".weight")] for k in weights},
                                                   weights, cfg or {}) for m in group if m != src}
    modules, renamed = [], []
    for kt in list(tuned.keys()):
        if kt in saved:
            continue
        stem, param = _split(kt)
        kb = key_map.get(kt)
        st = tuned.shape(kt)
        if kb is None:
            (result.only_in_tuned if len(st) == 2 and param == "weight"
             else result.structure_differs).append(kt)
            continue
        sb = base.shape(kb)
        if sb != st:
            if len(sb) == 2 and len(st) == 2:
                raise CheckpointError(f"tensor {kt!r} has shape {sb} in {base.path} but {st} in "
                                      f"{tuned.path}")
            result.structure_differs.append(kt)
            continue
        name: str | None = stem
        if rewrite is not None:
            old, new = rewrite
            name = old + stem[len(new):] if stem.startswith(new) else None
        # PEFT names modules as the model does, and transformers >= 5 renames a few on load
        stored_name = name
        if name is not None:
            name = rename_module(name, renames or {})
        chosen = name if stem else kt  # what --include/--exclude see (a top-level tensor: its key)
        selected = chosen is not None and not (include is not None and not include.search(chosen)
                                               or exclude is not None and exclude.search(chosen))
        if len(st) != 2 or param != "weight":
            floats = base.dtype(kb) in FLOAT_CODES and tuned.dtype(kt) in FLOAT_CODES
            if (len(st) <= 1 or "bias" in param) and floats and not _same(base, kb, tuned, kt):
                result.changed_not_extracted.append(kt)  # biases: --biases carries them
            elif len(st) >= 2 and selected and floats and not _same(base, kb, tuned, kt):
                # Fused MoE experts (E, out, in) as transformers >= 5 stores them, a convolution,
                # a 2-D parameter of another name: dropping its change would be silent.
                raise CheckpointError(f"tensor {kt!r} ({len(st)}-D {tuple(st)}) differs between "
                                      "BASE and TUNED, but it is not the 2-D .weight of a Linear, "
                                      "Conv1D or Embedding layer, so a LoRA adapter cannot carry it; "
                                      f"leave it out with --exclude '{stem.rpartition('.')[2] or kt}$'")
            continue
        if rewrite is not None and not stem.startswith(rewrite[1]):
            result.skipped[stem] = f"outside --prefix (does not start with {rewrite[1]!r})"
            continue
        if name is None or not selected:
            continue
        if stem in copies:
            result.skipped[name] = (f"a saved copy of {copies[stem]}, tied to it (transformers "
                                    "keeps that one on load): its update is that one's")
            continue
        for ck, key in ((base, kb), (tuned, kt)):
            if ck.dtype(key) not in FLOAT_CODES:
                raise CheckpointError(f"{ck.file_of(key)}: tensor {key!r} is {ck.dtype(key)}, not "
                                      "a float tensor; leave it out with --exclude")
        if name != stored_name:
            renamed.append((stored_name, name))
        if EMBEDDING_NAMES.search(stem):
            layout = "embedding"
        else:
            bias = f"{stem}.bias"
            blen = tuned.shape(bias)[0] if bias in tuned and len(tuned.shape(bias)) == 1 else None
            layout = "conv1d" if stored_conv1d(stem, st, blen, model_type=model_type,
                                               evidence=evidence) else "linear"
        modules.append((name, kb, kt, layout))
    if renamed:
        result.notes.append(f"{len(renamed)} module(s) named in the adapter as transformers >= 5 "
                            f"names them, e.g. {renamed[0][0]} as {renamed[0][1]} (rslora merge "
                            "accepts either name)")
    for kb in base.keys():
        if kb not in mapped_b:
            stem, param = _split(kb)
            (result.only_in_base if len(base.shape(kb)) == 2 and param == "weight"
             else result.structure_differs).append(kb)
    return modules


#: Per-expert projections (checkpoint names), which transformers >= 5 fuses into 3-D parameters
#: on load; group 1: the gate/up ones it concatenates into one gate_up_proj.
_EXPERT = re.compile(r"\.experts\.\d+\.(?:(w1|w3|gate_proj|up_proj)|\w+)$")


def _expert_notes(modules: list, rule: str) -> list:
    """What to know before loading per-expert MoE LoRA into PEFT on transformers >= 5."""
    experts = [m for m in modules if _EXPERT.search(m)]
    if not experts:
        return []
    notes = [f"{len(experts)} module(s) are per-expert MoE projections (e.g. {experts[0]!r}): "
             "transformers >= 5 fuses each layer's experts into 3-D parameters, and PEFT loads "
             "per-expert LoRA onto them only for the model types it converts (PEFT 0.21: Mixtral, "
             "Qwen3-MoE and others, not Qwen2-MoE, where it leaves them out without a word; nor "
             "can it wrap a router there); `rslora merge` applies them exactly"]
    if rule == "rslora" and any(_EXPERT.search(m)[1] for m in experts):  # type: ignore[index]
        notes.append("PEFT loads each expert's gate and up LoRA into one fused gate_up_proj LoRA "
                     "with r and lora_alpha doubled, which keeps alpha/r but scales an "
                     "alpha/sqrt(r) update by sqrt(2): extract MoE adapters with --rule standard "
                     "to use them unmerged there (merging is right either way)")
    return notes


def _same(base: Checkpoint, kb: str, tuned: Checkpoint, kt: str) -> bool:
    """Whether two tensors hold the same values (compared as stored when the dtypes agree: no
    float32 copy of a large expert tensor)."""
    if base.dtype(kb) == tuned.dtype(kt):
        return bool(np.array_equal(base.read_raw(kb)[0], tuned.read_raw(kt)[0]))
    return bool(np.array_equal(base.read(kb), tuned.read(kt)))


def extract_adapter(base, tuned, out_dir, *, rank: int | None = None, tol: float | None = None,
                    max_rank: int | None = None, rule: str = "rslora", alpha: float | None = None,
                    include: str | None = None, exclude: str | None = None,
                    dtype: str = "float32", on_missing: str = "error", force: bool = False,
                    seed: int | None = 0, progress: bool = False, prefix=None,
                    biases: bool = False, modules_to_save=None, client=None) -> ExtractResult:
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
        Regular expressions searched in module names (the adapter's names: TUNED's keys without
        ``.weight``, rewritten by ``prefix``).
    prefix : str, optional
        ``"OLD=NEW"``: TUNED's modules starting with NEW are named OLD... in the adapter (e.g.
        ``"=bert."`` for an adapter on a bare ``BertModel`` from a ``bert.``-prefixed checkpoint);
        modules outside NEW are skipped. BASE is matched to TUNED by module path either way.
    biases : bool
        Also carry TUNED's biases, whole, as PEFT's ``bias="all"`` does (every tensor whose name
        holds "bias"), so fine-tuned biases are reproduced; default: reported, not carried.
    modules_to_save : list of str, optional
        Modules saved whole, as PEFT's ``modules_to_save`` does: every tensor TUNED has under
        each (a new classification head, a fully trained ``lm_head`` or norm), written as
        ``base_model.model.<module>.<param>`` and listed in the config; LoRA factors are not
        extracted inside them. Full names, as in the adapter (PEFT selects them by name
        suffix, so ``"norm"`` would also select every ``input_layernorm``: refused).
    dtype : {"float32", "float16", "bfloat16"}
        Storage dtype of the factors.
    on_missing : {"error", "skip"}
        What to do with 2-D weights present in only one checkpoint.
    seed : int or None
        Seed of the randomized SVD (per layer, derived from it); None draws fresh entropy.
    progress : bool
        Show a progress bar over layers (on a terminal).
    client : distributed.Client, optional
        Factor the layers as tasks on this Dask cluster (see :mod:`rslora.dask.cluster`): each
        task reads its layer from the checkpoint files by path (every worker must see them at
        the same paths), at most two tasks per worker thread in flight. The adapter is the same,
        byte for byte, as one process's with as many BLAS threads as each worker thread has.
        Default: this process.

    Returns
    -------
    ExtractResult
        The config written, a :class:`LayerReport` per layer, and what was left out.

    Notes
    -----
    Layers are processed one at a time (per worker thread with ``client``), and each layer's
    factors are written to the adapter file as they arrive (:class:`.factor_stream.FactorStream`):
    peak memory is about two float32 copies of the largest weight plus one layer's factors, at
    any model size. With ``tol`` (or ranks capped unevenly and no ``alpha``), the factors wait
    in a float32 file in the output's temporary folder until every rank is known, and a layer
    that turns out unchanged has the file rebuilt without it: the disk then holds the adapter
    twice for a moment. Zero deltas (unchanged weights) are skipped and reported. Keys are
    ``base_model.model.<module>.lora_A.weight`` (r, d_in) and ``...lora_B.weight`` (d_out, r).
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
    parse_prefix(prefix)
    with Checkpoint(base) as cb, Checkpoint(tuned) as ct:
        cfg = _check_same_model(base, tuned, cb, ct, result)
        model_type = cfg.get("model_type")
        renames = module_renames(cfg, ct.keys())
        saved = _saved_keys(ct, modules_to_save, prefix, renames) \
            if modules_to_save is not None else {}
        modules = _plan(cb, ct, inc, exc, result, prefix, model_type, frozenset(saved.values()),
                        cfg, renames)
        only = [f"{len(names)} weight(s) only in {side}, e.g. {names[0]!r}" for side, names in
                (("TUNED", result.only_in_tuned), ("BASE", result.only_in_base)) if names]
        if only and on_missing == "error":
            raise CheckpointError(
                "; ".join(only) + ": pass --on-missing skip (on_missing='skip') to leave them out"
                + (", or save a new module (a head) whole with --modules-to-save (modules_to_save=)"
                   if result.only_in_tuned else ""))
        if not modules:
            raise CheckpointError("no 2-D weight to extract (is --include/--exclude too narrow?)")
        jobs = _layers(cb, ct, modules, rank, tol, max_rank, seed)
        emb = {j.module for j in jobs if j.layout == "embedding"}

        def bias_keys(kept: set) -> dict:  # and the modules saved whole
            return {**(_bias_keys(ct, kept, prefix, renames) if biases else {}), **saved}

        with atomic_output_dir(out, force, inputs=(base, tuned)) as tmp:
            stream = FactorStream(
                tmp, [(j.module, _peft_shape(j), j.module in emb,
                       None if j.rank is None else min(j.rank, *j.shape)) for j in jobs],
                dtype, rule, alpha, {k: ct.shape(key) for k, key in
                                     bias_keys({j.module for j in jobs}).items()})
            try:
                _factor_all(cb, ct, jobs, progress, result, client, stream.put)
                if not result.layers:
                    raise CheckpointError("every selected weight is unchanged between BASE and "
                                          "TUNED: nothing to extract")
                full = bias_keys(set(stream.ranks))
                ranks, a = stream.finish({k: (ct.shape(key), partial(ct.read, key))
                                          for k, key in full.items()})
            except BaseException:
                stream.discard_temporaries()
                raise
            result.changed_not_extracted = [k for k in result.changed_not_extracted
                                            if k not in full.values()]
            # PEFT sets fan_in_fan_out per module from its class on load; the flag only records
            # Conv1D.
            config = peft_config(ranks, a, rule == "rslora", base_model=base,
                                 fan_in_fan_out=any(result.layouts[m] == "conv1d" for m in ranks))
            if biases:
                config["bias"] = "all"
            if saved:
                config["modules_to_save"] = list(dict.fromkeys(rename_module(n, renames)
                                                               for n in modules_to_save))
            if not any(result.layouts[m] == "embedding" for m in ranks):
                result.notes = [n for n in result.notes if "ties lm_head" not in n]
            result.notes += _expert_notes(list(ranks), rule)
            positions = [m for m in ranks if m.endswith("embed_positions")]
            if positions:
                result.notes.append(
                    f"{', '.join(positions)}: learned positional embeddings (OPT, BART, ...) "
                    "whose forward takes no token ids: PEFT merges their LoRA but cannot run it "
                    "unmerged (leave them out with --exclude embed_positions to use the adapter "
                    "unmerged)")
            write_adapter_config(tmp, config)
    result.config = config
    return result


def _peft_shape(job) -> tuple[int, int]:
    """``(d_out, d_in)`` of the module's PEFT factors: the stored weight's shape, transposed for
    Conv1D and embeddings (stored (in, out))."""
    return tuple(job.shape) if job.layout == "linear" else tuple(job.shape[::-1])


def _bias_keys(ct: Checkpoint, kept: set, prefix, renames=None) -> dict:
    """TUNED's bias tensors under the keys PEFT's ``bias="all"`` saves, ``{PEFT key: TUNED key}``:
    every float tensor whose name holds "bias", ``<module>.base_layer.bias`` for the modules
    ``kept`` (those that carry LoRA)."""
    rewrite = parse_prefix(prefix)
    full = {}
    for key in ct.keys():
        if "bias" not in key or ct.dtype(key) not in FLOAT_CODES:
            continue
        stem, param = _split(key)
        if rewrite is not None:
            old, new = rewrite
            if not stem.startswith(new):
                continue
            stem = old + stem[len(new):]
        stem = rename_module(stem, renames or {}) if stem else stem
        full[f"{stem}.base_layer.{param}" if stem in kept else _join(stem, param)] = key
    return full


def _saved_keys(ct: Checkpoint, names, prefix, renames=None) -> dict:
    """TUNED's tensors under the modules saved whole (PEFT's ``modules_to_save``), under the keys
    PEFT saves them with, ``{<module>.<rest>: TUNED key}`` in the adapter's naming (TUNED's,
    rewritten by ``prefix``). Every name must hold float tensors in TUNED and, since PEFT picks
    these modules by name suffix (``str.endswith``), select no other module of the model."""
    if isinstance(names, str) or not all(isinstance(n, str) and n and n == n.strip(".")
                                         for n in names):
        raise ValueError("modules_to_save must be a list of module names (e.g. ['lm_head', "
                         f"'model.norm']), got {names!r}")
    rewrite = parse_prefix(prefix)
    adapter_names = {}  # adapter name -> TUNED key, every TUNED key inside --prefix
    for key in ct.keys():
        name = key
        if rewrite is not None:
            old, new = rewrite
            if not key.startswith(new):
                continue
            name = old + key[len(new):]
        adapter_names[rename_module(name, renames or {})] = key
    modules = {".".join(parts[:i]) for parts in (n.split(".") for n in adapter_names)
               for i in range(1, len(parts))}
    out = {}
    for n in dict.fromkeys(rename_module(n, renames or {}) for n in names):
        inside = {a: k for a, k in adapter_names.items() if a.startswith(n + ".")}
        if not inside:
            near = sorted(m for m in modules if m.endswith("." + n) or n.endswith("." + m))[:3]
            raise CheckpointError(f"modules_to_save: no module {n!r} in TUNED"
                                  + (f" (did you mean {', '.join(map(repr, near))}?)" if near else ""))
        others = sorted(m for m in modules if m != n and m.endswith(n))
        if others:
            raise CheckpointError(
                f"modules_to_save: PEFT selects these modules by name suffix, and {n!r} would also "
                f"select {others[0]!r}" + (f" and {len(others) - 1} more" if len(others) > 1 else "")
                + ": give the module's full name")
        for a, k in inside.items():
            if ct.dtype(k) not in FLOAT_CODES:
                raise CheckpointError(f"modules_to_save: {ct.file_of(k)}: tensor {k!r} of {n!r} is "
                                      f"{ct.dtype(k)}, not a float tensor: it cannot be saved")
        out.update(inside)
    return out


@dataclass(frozen=True)
class _Layer:
    """One layer to factor, by name: picklable, so a Dask task can read it from the files."""

    module: str
    base_file: str
    base_key: str
    tuned_file: str
    tuned_key: str
    shape: tuple
    layout: str
    rank: int | None
    tol: float | None
    max_rank: int | None
    seed: int


def _layers(cb, ct, modules, rank, tol, max_rank, seed) -> list:
    # One seed per layer, spawned in plan order: the same whichever worker or order runs it.
    seeds = np.random.SeedSequence(seed).spawn(len(modules))
    return [_Layer(m, str(cb.file_of(kb)), kb, str(ct.file_of(kt)), kt, ct.shape(kt), layout,
                   rank, tol, max_rank, int(ss.generate_state(1)[0]))
            for (m, kb, kt, layout), ss in zip(modules, seeds)]


class _ReadOpen:
    """Factor a layer read from the checkpoints this process holds open."""

    def __init__(self, cb: Checkpoint, ct: Checkpoint):
        self.cb, self.ct = cb, ct

    def __call__(self, job: _Layer):
        delta = self.ct.read(job.tuned_key)
        delta -= self.cb.read(job.base_key)
        return _factor(job, delta)


def _read_by_path(job: _Layer):
    """Factor a layer read by a Dask task: it opens the two files by path (header only) and
    reads its two tensors, after checking they are still what the client planned."""
    with Checkpoint(job.tuned_file) as ct, Checkpoint(job.base_file) as cb:
        for ck, key in ((ct, job.tuned_key), (cb, job.base_key)):
            if key not in ck or ck.shape(key) != job.shape:
                raise CheckpointError(f"{ck.path}: tensor {key!r} changed since the run began "
                                      "(or this worker sees another file at that path)")
        delta = ct.read(job.tuned_key)
        delta -= cb.read(job.base_key)
    return _factor(job, delta)


def _factor(job: _Layer, delta: np.ndarray):
    """``(A, B, LayerReport)`` for ``delta = tuned - base`` (float32, consumed), or the reason
    the layer is skipped (a string). The one computation of both paths: bit-identical results
    at equal BLAS threads."""
    import rslora

    if not np.isfinite(delta).all():
        raise CheckpointError(f"tensor {job.tuned_key!r}: the delta has NaN or Inf entries")
    if job.layout != "linear":  # stored (in, out): PEFT's factors are of the transpose
        delta = np.ascontiguousarray(delta.T)
    norm = float(np.linalg.norm(delta))
    if norm == 0.0:
        return "unchanged (zero delta)"
    if job.rank is not None:
        A, B = rslora.lora_from_delta(delta, min(job.rank, *delta.shape), seed=job.seed)
    else:
        cap = None if job.max_rank is None else min(job.max_rank, *delta.shape)  # as --rank is
        A, B = rslora.lora_from_delta(delta, tol=job.tol, max_rank=cap, seed=job.seed)
    if A.shape[0] == 0:
        return "rank 0 meets the tolerance"
    rslora.unmerge(delta, A, B, scale=1.0)  # delta becomes the residual
    err = float(np.linalg.norm(delta)) / norm
    return A, B, LayerReport(job.module, tuple(delta.shape), int(A.shape[0]),
                             max(0.0, 1.0 - err * err), err, norm)


def _factor_all(cb, ct, jobs, progress, result, client, sink) -> None:
    """Factor every layer (here, or as tasks on ``client``) and hand each layer's factors to
    ``sink(module, A, B)`` as it arrives, keeping none: the client holds the few layers in
    flight, whatever the model's size. The reports go into ``result`` in plan order."""
    from tqdm.auto import tqdm

    from .parallel import run_items

    fn = _ReadOpen(cb, ct) if client is None else _read_by_path
    done: list = [None] * len(jobs)  # per layer: its LayerReport, or why it was skipped
    with tqdm(total=len(jobs), desc="extract", unit="layer",
              disable=None if progress else True) as bar:
        for i, out in run_items(client, fn, jobs, weights=[math.prod(j.shape) for j in jobs],
                                name=lambda j: f"extract-{j.module}"):
            if isinstance(out, str):
                done[i] = out
            else:
                sink(jobs[i].module, out[0], out[1])
                done[i] = out[2]
            del out  # the factors are written: drop them now, not at the next result
            bar.update(1)
    for job, out in zip(jobs, done):  # plan order, whatever order the layers finished in
        if isinstance(out, str):
            result.skipped[job.module] = out
        else:
            result.layers.append(out)
            result.layouts[job.module] = job.layout
