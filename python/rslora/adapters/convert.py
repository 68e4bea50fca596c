"""Conversion of a LoRA adapter between scaling rules with the same update (``rslora convert``).

Serving stacks have ignored ``use_rslora`` (vLLM, SGLang and TensorRT-LLM issue trackers), so an
rsLoRA adapter served there is scaled by ``alpha / r`` instead of ``alpha / sqrt(r)``: off by
``1 / sqrt(r)``. Converted to the standard rule, it is right in every client.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from ..scaling import RULES
from .atomic import atomic_output_dir, check_output_dir
from .rewrite import (
    adapter_file,
    open_raw_adapter,
    uniform_config,
    write_factors,
    write_folder_files,
)

__all__ = ["convert_adapter", "ConvertResult"]


@dataclass
class ConvertResult:
    out_dir: Path
    config: dict
    #: module -> the factor lora_B was multiplied by (modules left bit for bit unchanged omitted)
    rescaled: dict = field(default_factory=dict)
    modules: int = 0


def _rule_factor(r: int, old: str, new: str) -> float:
    """``f_new(r) / f_old(r)`` for ``f = r`` (standard) or ``sqrt(r)`` (rslora): the factor that
    keeps ``alpha / f(r)`` when the rule changes."""
    if old == new:
        return 1.0
    return math.sqrt(r) if new == "standard" else 1.0 / math.sqrt(r)


def convert_adapter(adapter, out_dir, *, rule: str, alpha: float | None = None,
                    force: bool = False) -> ConvertResult:
    """Rewrite a PEFT LoRA adapter for another scaling rule with exactly the same update.

    Parameters
    ----------
    adapter : str or os.PathLike
        A PEFT LoRA adapter folder (Linear, Conv1D and embedding LoRA; any dtype; rank_pattern
        and alpha_pattern honoured).
    out_dir : str or os.PathLike
        Folder to write (atomically); must not be ``adapter`` or hold it.
    rule : {"standard", "rslora"}
        The rule the written adapter uses: ``alpha / r`` (``use_rslora: false``) or
        ``alpha / sqrt(r)``.
    alpha : float, optional
        ``lora_alpha`` to write. By default the one that keeps the scale of the modules at the
        config's ``r``: ``lora_alpha * sqrt(r)`` for rslora -> standard, ``lora_alpha / sqrt(r)``
        for standard -> rslora, unchanged for the same rule; their ``lora_B`` stays bit for bit.
    force : bool
        Replace ``out_dir`` if it exists.

    Returns
    -------
    ConvertResult

    Notes
    -----
    The written adapter is in uniform-scale form (every module's scale is the top-level
    ``lora_alpha / r`` or ``/ sqrt(r)``; ``alpha_pattern`` entries compensate ``rank_pattern``),
    so clients that ignore the patterns compute the same update as PEFT. Each module's remaining
    scale ratio is folded into ``lora_B`` (``lora_embedding_B``) in float64 and rounded once to
    the factor's own dtype. Other tensors and files are copied unchanged. One module's factors
    (or one other tensor) are in memory at a time: each is read, converted and written at its
    place in the new file, so memory does not grow with the adapter.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be 'standard' or 'rslora', got {rule!r}")
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    check_output_dir(out_dir, force, inputs=(adapter,))  # before any work
    with open_raw_adapter(adapter) as raw:
        cfg = raw.config
        if alpha is None:
            alpha = cfg["lora_alpha"] * _rule_factor(cfg["r"], raw.rule, rule)
        ranks = {name: m.r for name, m in raw.modules.items()}
        config, scales = uniform_config(cfg, ranks, float(alpha), rule)
        result = ConvertResult(Path(out_dir), config, modules=len(ranks))
        with atomic_output_dir(out_dir, force, inputs=(raw.path,)) as tmp:
            # One module's factors in memory at a time: read, rescaled, written at its offset.
            with adapter_file(raw, tmp, ranks) as f:
                for name, m in raw.modules.items():
                    ratio = m.scale / scales[name]
                    a, b = raw.kept(name, ratio,
                                    f"module {name!r}: B times {ratio:.4g} (pick another alpha)")
                    if not math.isclose(ratio, 1.0, rel_tol=1e-12, abs_tol=0.0):  # else B is kept
                        result.rescaled[name] = ratio
                    write_factors(f, m, a, b)
                    del a, b
                raw.copy_other(f)
            write_folder_files(raw, tmp, config)
    return result
