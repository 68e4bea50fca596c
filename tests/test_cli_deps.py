"""Every command checks its optional dependencies before doing any work: one line naming the extra
to install, exit 2, nothing written (issue 11)."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import subprocess
import sys

import pytest

from rslora import cli, commands

# A command line for each command that would do real work if the check let it through.
ARGV = {
    "study": lambda out: ["study", "--out", out, "--quick"],
    "extract": lambda out: ["extract", "base.safetensors", "tuned.safetensors", "-o", out,
                            "--rank", "4"],
    "merge": lambda out: ["merge", "base.safetensors", "adapter", "-o", out],
    "convert": lambda out: ["convert", "adapter", "-o", out, "--rule", "standard"],
    "resize": lambda out: ["resize", "adapter", "-o", out, "--rank", "2"],
}


def _needs(command):
    return importlib.import_module(f"rslora.commands.{command}").NEEDS


def test_every_command_declares_its_needs():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(ARGV) | {"config"} == set(sub.choices)  # a new command gets a case here
    for name, p in sub.choices.items():
        needs = _needs(name)
        assert p.get_default("needs") is needs
        assert isinstance(needs, tuple) or callable(needs)


@pytest.mark.parametrize("command", sorted(ARGV))
def test_missing_module_stops_before_any_work(command, monkeypatch, tmp_path, capsys):
    mod = importlib.import_module(f"rslora.commands.{command}")
    monkeypatch.setattr(mod, "run", lambda args: pytest.fail(f"{command} ran without its needs"))
    out = tmp_path / "out"
    needs = _needs(command)
    if callable(needs):  # needs that depend on the options: those of this command line
        needs = needs(cli.build_parser().parse_args(ARGV[command](str(out))))
    for missing in needs:
        monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
        assert cli.main(ARGV[command](str(out))) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"rslora {command}: error: needs {missing}")
        assert f"pip install 'rslora[{cli.EXTRA_OF[missing]}]'" in err
        assert not out.exists()
        monkeypatch.delitem(sys.modules, missing)


def test_all_missing_are_named_together(monkeypatch, capsys):
    for m in ("tqdm", "matplotlib"):
        monkeypatch.setitem(sys.modules, m, None)
    assert cli.main(["study", "--out", "never-written"]) == 2
    err = capsys.readouterr().err
    assert "needs tqdm, matplotlib, which are not installed: pip install 'rslora[cli]'" in err


def test_needs_may_depend_on_the_arguments(monkeypatch, capsys):
    # A command whose needs depend on its options (e.g. --workers needs dask) gives a function.
    mod = importlib.import_module("rslora.commands.config")
    seen = []
    monkeypatch.setattr(mod, "NEEDS", lambda args: seen.append(args.command) or ("json",))
    assert cli.main(["config"]) == 0
    assert seen == ["config"]
    monkeypatch.setattr(mod, "NEEDS", lambda args: ("rslora_no_such_module",))
    monkeypatch.setattr(mod, "run", lambda args: pytest.fail("config ran without its needs"))
    capsys.readouterr()
    assert cli.main(["config"]) == 2
    assert "needs rslora_no_such_module" in capsys.readouterr().err


def test_extras_named_exist():
    """The extra that the message names is one the installed package provides."""
    provided = set(importlib.metadata.metadata("rslora").get_all("Provides-Extra") or ())
    for info in pkgutil.iter_modules(commands.__path__):
        needs = _needs(info.name)
        for m in needs if isinstance(needs, tuple) else ():
            assert cli.EXTRA_OF[m.split(".")[0]] in provided, (info.name, m)


def test_real_entry_point_without_matplotlib(tmp_path):
    """`python -m rslora study` in a process where matplotlib cannot be imported: exit 2 at once."""
    code = ("import sys; sys.modules['matplotlib'] = None; sys.argv[0] = 'rslora';"
            "import runpy; runpy.run_module('rslora', run_name='__main__')")
    out = tmp_path / "study"
    p = subprocess.run([sys.executable, "-c", code, "study", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert p.returncode == 2, p.stderr
    assert p.stderr == ("rslora study: error: needs matplotlib, which is not installed: "
                        "pip install 'rslora[cli]'\n")
    assert not out.exists()
