"""The package's layers point one way: cli/commands -> study, adapters -> ops -> _core.

Read from the source (every import statement, also those inside functions), so a lazy import
that reaches upward fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rslora

PKG = Path(rslora.__file__).resolve().parent
# What each layer may not import (relative to the package). The package's __init__ is the public
# facade over all of them and is not a layer.
FORBIDDEN = {
    "ops": ("adapters", "study", "cli", "commands"),
    "cuda": ("adapters", "study", "cli", "commands"),
    "adapters": ("study", "cli", "commands"),
    "study": ("adapters", "cli", "commands"),
}


def _layer(path: Path) -> str | None:
    rel = path.relative_to(PKG).parts
    if rel[0] in ("adapters", "study", "cuda", "commands"):
        return rel[0] if rel[0] != "commands" else None
    if rel[0] in ("__init__.py", "__main__.py", "cli.py"):
        return None
    return "ops"


def _imports(path: Path, source: str | None = None):
    """Absolute dotted names of everything ``path`` (or ``source`` placed there) imports."""
    package = ["rslora", *path.relative_to(PKG).parent.parts]
    text = path.read_text() if source is None else source
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            for a in node.names:  # `from . import study` names a module too
                yield f"{mod}.{a.name}"


FILES = sorted(p for p in PKG.rglob("*.py") if _layer(p) is not None)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_upward_import(path):
    layer = _layer(path)
    bad = [m for m in _imports(path) for f in FORBIDDEN[layer]
           if m == f"rslora.{f}" or m.startswith(f"rslora.{f}.")]
    assert not bad, f"{path.relative_to(PKG)} ({layer}) imports {sorted(set(bad))}"


def test_the_check_sees_relative_imports():
    # A canary for the resolver: these lines inside adapters/ would reach study and cli.
    names = set(_imports(PKG / "adapters" / "checkpoint.py",
                         "from ..study import synthetic\nfrom .. import cli\n"))
    assert {"rslora.study", "rslora.cli"} <= names


def test_argument_rules_sit_below_every_op():
    # _validation is the bottom of the Python layers: it imports nothing of the package, so both
    # backends (and anything else) can use its rules without a cycle.
    own = [m for m in _imports(PKG / "_validation.py") if m.startswith("rslora")]
    assert not own, own
