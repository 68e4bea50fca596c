"""The ``rslora`` command. Each subcommand is a module in ``rslora/commands/`` with a
``register(subparsers)`` function that adds its parser and sets ``func`` (a callable taking the
parsed args and returning an exit code), and at its top ``NEEDS``: the optional modules it
imports (or a function of the parsed args that returns them), checked before any work is done.
User errors raise :class:`UserError`: one line, exit 2, no traceback."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .errors import UserError

__all__ = ["UserError", "add_cluster_args", "build_parser", "cluster_needs", "main", "require"]

# The extra of pyproject.toml that installs each optional module a command may need.
EXTRA_OF = {"tqdm": "cli", "matplotlib": "cli", "safetensors": "cli", "ml_dtypes": "cli",
            "dask": "dask", "distributed": "dask"}


def require(modules) -> None:
    """Raise :class:`UserError` naming the extra to install if any of ``modules`` fails to import.

    Imported, not only looked up, so that a broken install is caught here too, before any work."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        extras = ",".join(sorted({EXTRA_OF.get(m.split(".")[0], "cli") for m in missing}))
        raise UserError(f"needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                        f"not installed: pip install 'rslora[{extras}]'")


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """``--workers N`` / ``--scheduler ADDRESS``: where a command's independent tasks run
    (:func:`rslora.dask.cluster.cluster`); with neither, in this process."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--workers", type=int, metavar="N",
                       help="run on a local Dask cluster of N processes, one thread each "
                            "(needs rslora[dask])")
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help="run on the Dask cluster whose scheduler is at ADDRESS, e.g. "
                            "tcp://host:8786 (needs rslora[dask])")


def cluster_needs(args) -> tuple[str, ...]:
    """The modules ``--workers`` / ``--scheduler`` need, for a command's ``NEEDS``."""
    if getattr(args, "workers", None) is not None or getattr(args, "scheduler", None) is not None:
        return ("dask", "distributed")
    return ()


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    parser = _Parser(
        prog="rslora", description="Rank-stabilized LoRA tools: study, extract, merge, convert, resize.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            mod = importlib.import_module(f"{commands.__name__}.{info.name}")
            before = set(sub.choices)
            mod.register(sub)
            for name in set(sub.choices) - before:
                sub.choices[name].set_defaults(needs=getattr(mod, "NEEDS", ()))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        needs = getattr(args, "needs", ())
        require(needs(args) if callable(needs) else needs)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"rslora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rslora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
