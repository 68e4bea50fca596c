"""``adapter_config.json`` checked field by field as PEFT's ``LoraConfig`` declares them, before
rslora uses any of it, and PEFT's ``rank_pattern`` / ``alpha_pattern`` matching with a time bound.

PEFT itself trusts the JSON (a string ``"false"`` for ``use_rslora`` is true to it, ``r: 2.5``
breaks later in torch); here every field has the type and range its dataclass annotation and
the code that uses it require, and a violation is a one-line :class:`CheckpointError` that names
the field. Whether rslora supports a valid value (DoRA, other PEFT methods) is decided by the
loader afterwards. Fields rslora does not know (newer PEFT versions add some) are left alone.
"""

from __future__ import annotations

import math
import re

from .checkpoint import CheckpointError

__all__ = ["validate", "pattern_key", "check_scale", "MATCH_SECONDS"]

#: Longest a single ``rank_pattern``/``alpha_pattern`` key may take to match one module name.
MATCH_SECONDS = 1.0
_F32_MAX = float.fromhex("0x1.fffffep+127")
_BIAS = ("none", "all", "lora_only")


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _posint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _strs(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _opt(check):
    return lambda v: v is None or check(v)


# field -> (rule, what PEFT accepts); a missing field takes PEFT's default, which passes.
_RULES = {
    "r": (_posint, "a positive integer"),
    "lora_alpha": (_real, "a finite number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "use_qalora": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "bias": (lambda v: v in _BIAS, "one of 'none', 'all', 'lora_only'"),
    "lora_dropout": (lambda v: _real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "target_modules": (_opt(lambda v: isinstance(v, str) or _strs(v)),
                       "null, a regular expression or a list of module names"),
    "exclude_modules": (_opt(lambda v: isinstance(v, str) or _strs(v)),
                        "null, a regular expression or a list of module names"),
    "modules_to_save": (_opt(_strs), "null or a list of module names"),
    "layers_to_transform": (_opt(lambda v: (isinstance(v, int) and not isinstance(v, bool)
                                            and v >= 0) or (isinstance(v, list) and all(
                                                isinstance(x, int) and not isinstance(x, bool)
                                                and x >= 0 for x in v))),
                            "null, a layer index or a list of them"),
    "layers_pattern": (_opt(lambda v: isinstance(v, str) or _strs(v)),
                       "null, a string or a list of strings"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a method name"),
    "peft_type": (_opt(lambda v: isinstance(v, str)), "a PEFT method name such as 'LORA'"),
    "task_type": (_opt(lambda v: isinstance(v, str)), "null or a string"),
    "base_model_name_or_path": (_opt(lambda v: isinstance(v, str)), "null or a string"),
    "revision": (_opt(lambda v: isinstance(v, str)), "null or a string"),
    "layer_replication": (_opt(lambda v: isinstance(v, list)), "null or a list of [start, end] pairs"),
}


def validate(cfg: dict, where) -> dict:
    """Check ``cfg`` (an ``adapter_config.json`` object); raise :class:`CheckpointError`
    ``"<where>: <field> is <value>; PEFT's LoraConfig takes <what>"``. Returns ``cfg``."""
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise CheckpointError(f"{where}: missing {key!r}")
    for key, (ok, what) in _RULES.items():
        if key in cfg and not ok(cfg[key]):
            raise CheckpointError(f"{where}: {key} is {_show(cfg[key])}; PEFT's LoraConfig takes "
                                  f"{what}")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(cfg.get(key), str):
            _compile(cfg[key], where, key)
    for field, value_ok, what in (("rank_pattern", _posint, "a positive integer rank"),
                                  ("alpha_pattern", _real, "a finite alpha")):
        pat = cfg.get(field)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            raise CheckpointError(f"{where}: {field} is {_show(pat)}; PEFT's LoraConfig takes an "
                                  "object of pattern -> value")
        for k, v in pat.items():
            _compile(rf"(.*\.)?({k})$", where, f"{field} key {k!r}")
            if not value_ok(v):
                raise CheckpointError(f"{where}: {field}[{k!r}] is {_show(v)}; PEFT's LoraConfig "
                                      f"takes {what}")
    return cfg


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _compile(pattern: str, where, what: str):
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise CheckpointError(f"{where}: {what} is not a valid regular expression ({e})") from None


# -- pattern matching --------------------------------------------------------------------------------
#: Keys made of name characters and (escaped or not) dots: matched with ``re`` in linear time.
_PLAIN = re.compile(r"(?:[\w\-]|\\?\.)+")


def pattern_key(patterns, module: str) -> str | None:
    """The key of ``patterns`` that PEFT applies to ``module`` (its ``get_pattern_key`` rule:
    the first key ``k``, in order, with ``re.match(rf"(.*\\.)?({k})$", module)``), or None.

    Keys other than plain dotted names are regular expressions that could backtrack for ages
    (``(a+)+``): they are matched by the ``regex`` package with a :data:`MATCH_SECONDS` bound,
    and one that runs out is a :class:`CheckpointError`.
    """
    for k in patterns:
        full = rf"(.*\.)?({k})$"
        if _PLAIN.fullmatch(k):
            if re.match(full, module):
                return k
            continue
        try:
            import regex
        except ImportError:  # pragma: no cover - regex comes with the [cli] extra
            raise CheckpointError(f"pattern key {k!r} is a regular expression; matching it safely "
                                  "needs the 'regex' package (pip install 'rslora[cli]')") from None
        try:
            if regex.match(full, module, flags=regex.VERSION0, timeout=MATCH_SECONDS):
                return k
        except TimeoutError:
            raise CheckpointError(f"pattern key {k!r} took over {MATCH_SECONDS:g} s to match "
                                  f"module {module[:80]!r} (catastrophic backtracking); rewrite "
                                  "it without nested repetition") from None
        except regex.error as e:
            raise CheckpointError(f"pattern key {k!r} is not a valid regular expression ({e})") \
                from None
    return None


def _absmax(a) -> float:
    """max |a| without a temporary the size of ``a`` (NaN if any entry is NaN)."""
    return max(abs(float(a.max())), abs(float(a.min()))) if a.size else 0.0


def check_scale(adapter, where) -> None:
    """Refuse scales whose merged update cannot be held in float32: ``|s|`` above float32's
    range, or ``|s| * r * max|B| * max|A|`` (a bound on every entry of ``s * B @ A``) above half
    of it (the base weight must still fit beside it)."""
    for name, m in adapter.modules.items():
        s = m.scale
        amax, bmax = _absmax(m.A), _absmax(m.B)
        if not (math.isfinite(amax) and math.isfinite(bmax)):
            raise CheckpointError(f"{where}: module {name!r} has NaN or Inf in its LoRA factors")
        bound = abs(s) * m.r * amax * bmax
        if not (math.isfinite(s) and abs(s) <= _F32_MAX and bound <= _F32_MAX / 2):
            raise CheckpointError(f"{where}: lora_alpha={m.alpha!r} gives module {name!r} a scale "
                                  f"of {s:.3g}, whose update overflows float32; use a smaller "
                                  "lora_alpha")
