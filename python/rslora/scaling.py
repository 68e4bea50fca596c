"""The two LoRA scaling rules and how every op resolves its scale."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ._validation import integer, real

RULES = ("rslora", "standard")


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be 'rslora' or 'standard', got {rule!r}")


def scale(alpha: float, r: int, rule: str = "rslora") -> float:
    """The LoRA scaling factor.

    Parameters
    ----------
    alpha : float
        ``lora_alpha``.
    r : int
        The adapter rank, >= 1.
    rule : {"rslora", "standard"}
        ``"rslora"`` gives ``alpha / sqrt(r)`` (Kalajdzievski 2023, PEFT's ``use_rslora=True``);
        ``"standard"`` gives ``alpha / r`` (Hu et al. 2021, PEFT's default).

    Returns
    -------
    float
        Computed in float64 exactly as PEFT does (``alpha / math.sqrt(r)`` or ``alpha / r``).
    """
    _check_rule(rule)
    alpha = real(alpha, "alpha")
    r = integer(r, "r", 1)
    return alpha / math.sqrt(r) if rule == "rslora" else alpha / r


def resolve(scale_: float | None, alpha: float | None, rule: str, r: int) -> float:
    """The scale an op uses: ``scale=`` as given, or ``alpha=`` with ``rule=``; never both.

    With r == 0 the LoRA term is an empty sum, so the scale does not matter (0.0 is returned).
    """
    _check_rule(rule)
    if scale_ is not None and alpha is not None:
        raise ValueError("give either scale= or alpha= (with rule=), not both")
    if scale_ is None and alpha is None:
        raise ValueError("give scale= or alpha= (with rule=)")
    if scale_ is not None:
        return real(scale_, "scale")
    if r == 0:
        real(alpha, "alpha")
        return 0.0
    return scale(alpha, r, rule)  # type: ignore[arg-type]  # alpha is not None here


def scale_table(alpha: float = 16.0,
                ranks: Iterable[int] = (1, 4, 8, 16, 32, 64)) -> list[dict[str, float]]:
    """Rows of ``{"r", "standard", "rslora"}`` for the given ranks (the rsLoRA paper's table)."""
    return [{"r": r, "standard": scale(alpha, r, "standard"), "rslora": scale(alpha, r, "rslora")}
            for r in ranks]


def format_scale_table(alpha: float = 16.0, ranks: Iterable[int] = (1, 4, 8, 16, 32, 64)) -> str:
    """The scale table as aligned text, values printed with full float64 precision (repr)."""
    rows = scale_table(alpha, ranks)
    head = f"{'r':>5}  {'alpha/r':>20}  {'alpha/sqrt(r)':>20}"
    lines = [f"alpha = {alpha:g}", head, "-" * len(head)]
    lines += [f"{row['r']:>5}  {row['standard']!r:>20}  {row['rslora']!r:>20}" for row in rows]
    return "\n".join(lines)
