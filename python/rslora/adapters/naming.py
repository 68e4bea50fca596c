"""Matching module names between an adapter and checkpoints saved with or without a task head.

A model with a head nests the bare model under a prefix (``model.``, ``transformer.``, ``bert.``):
the same layer is ``layers.0.mlp.up_proj`` in one file and ``model.layers.0.mlp.up_proj`` in
another. Names are matched exactly first, else by a unique dotted suffix in either direction; a
``prefix`` rewrite (``"OLD=NEW"``, or ``"NEW"`` for ``"=NEW"``) forces the mapping instead.
"""

from __future__ import annotations

from .checkpoint import CheckpointError

__all__ = ["parse_prefix", "match_modules"]


def parse_prefix(prefix) -> tuple[str, str] | None:
    """``"OLD=NEW"`` -> ("OLD", "NEW"); ``"NEW"`` -> ("", "NEW"); None stays None."""
    if prefix is None:
        return None
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string 'OLD=NEW' or 'NEW', got {type(prefix).__name__}")
    old, sep, new = prefix.partition("=")
    return (old, new) if sep else ("", old)


def _suffixes(name: str):
    """The proper dotted suffixes of ``name``, longest first: a.b.c -> b.c, c."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(1, len(parts))]


def match_modules(names, available, *, prefix=None, what="adapter module", where="BASE",
                  suffix="", partial=False):
    """Map each of ``names`` to a member of ``available`` (module paths, without ``.weight``).

    Raises CheckpointError listing what stays unmatched or matches more than one module; with
    ``partial``, returns ``(found, unmatched)`` instead of raising for unmatched names.
    """
    names, have = list(names), set(available)
    rewrite = parse_prefix(prefix)
    by_suffix: dict[str, list[str]] = {}
    for s in have:
        for suf in _suffixes(s):
            by_suffix.setdefault(suf, []).append(s)
    found, unmatched, ambiguous = {}, [], {}
    for n in names:
        if rewrite is not None:
            old, new = rewrite
            cand = [new + n[len(old):]] if n.startswith(old) and new + n[len(old):] in have else []
        elif n in have:
            cand = [n]
        else:
            # longer: n is a suffix of a checkpoint name; shorter: a checkpoint name is a suffix of n
            cand = sorted(set(by_suffix.get(n, [])) | {s for s in _suffixes(n) if s in have})
        if len(cand) == 1:
            found[n] = cand[0]
        elif cand:
            ambiguous[n] = cand
        else:
            unmatched.append(n)
    if ambiguous:
        n, cand = next(iter(ambiguous.items()))
        raise CheckpointError(f"{len(ambiguous)} {what}(s) match several modules in {where}, e.g. "
                              f"{n!r} -> {', '.join(map(repr, cand[:4]))}; pass --prefix "
                              "(prefix='OLD=NEW') to choose")
    if partial:
        return found, unmatched
    if unmatched:
        sample = sorted(have)[:3]
        hint = f"--prefix {rewrite[0]}={rewrite[1]} gives no match" if rewrite else \
            "pass --prefix OLD=NEW (prefix=) to map the names"
        raise CheckpointError(f"{len(unmatched)} {what}(s) have no weight in {where}, e.g. "
                              f"{', '.join(repr(n + suffix) for n in unmatched[:5])}"
                              f"{', ...' if len(unmatched) > 5 else ''} ({where} has e.g. "
                              f"{', '.join(repr(n + suffix) for n in sample)}); {hint}")
    return found
