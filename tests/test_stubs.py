"""The type stubs name exactly what the compiled modules export.

stubtest (.ci/run) checks parameters and defaults too, but needs mypy; these checks run in the
normal suite, so a function added to the bindings without a stub fails here.
"""

import ast
import re
from pathlib import Path

import pytest

import rslora
import rslora._core

PKG = Path(rslora.__file__).parent
ROOT = Path(__file__).resolve().parents[1]


def _stub_params(name: str) -> dict[str, list[str]]:
    """Function name -> parameter names (with " = ..." after those that have a default), from the
    stub file installed with the package."""
    tree = ast.parse((PKG / name).read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            args = node.args.posonlyargs + node.args.args
            first_default = len(args) - len(node.args.defaults)
            out[node.name] = [a.arg + (" = ..." if i >= first_default else "") for i, a in enumerate(args)]
    return out


def _split_top(s: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch in "[(") - (ch in "])")
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()] if cur.strip() else parts


def test_core_stub_names_match_module():
    exported = {n for n in dir(rslora._core) if not n.startswith("__")}  # _hooks too
    stubbed = set(_stub_params("_core.pyi"))
    assert stubbed - exported == set(), "stubs for functions _core does not export"
    assert exported - stubbed == set(), "functions _core exports without a stub"


def test_core_stub_params_match_docstring_signatures():
    # stubtest cannot see pybind11 parameters (no __text_signature__), so they are read here from
    # the "name(arg: type = default, ...) -> ret" line pybind11 puts first in each docstring.
    # A missing py::arg shows there as a positional-only "arg0" and fails this comparison.
    for name, params in _stub_params("_core.pyi").items():
        first = getattr(rslora._core, name).__doc__.splitlines()[0]
        assert first.startswith(name + "("), first
        inner = first[len(name) + 1 : first.rindex(") -> ")]
        seen = [
            p.split(":")[0] + (" = ..." if " = " in p else "") for p in _split_top(inner)
        ]
        assert seen == params, f"{name}: module has {seen}, stub has {params}"


def _cuda_source_defs() -> dict[str, list[str]]:
    """Function name -> py::arg names, read from bind_cuda.cpp (the module needs nvcc to build)."""
    src = (ROOT / "cpp" / "src" / "cuda" / "bind_cuda.cpp").read_text()
    defs = {}
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'm\.def\(\s*"(\w+)"', src)]
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(src)
        defs[name] = re.findall(r'py::arg\("(\w+)"\)', src[pos:end])
    return defs


def test_cuda_stub_matches_bindings_source():
    source = ROOT / "cpp" / "src" / "cuda" / "bind_cuda.cpp"
    if not source.exists():  # an installed wheel without the source tree
        pytest.skip("no source tree")
    defs = _cuda_source_defs()
    assert len(defs) >= 10  # the parse found the m.def calls
    stub = {n: [p.removesuffix(" = ...") for p in ps] for n, ps in _stub_params("_cuda.pyi").items()}
    assert stub == defs
