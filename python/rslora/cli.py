"""The ``rslora`` command. Each subcommand is a module in ``rslora/commands/`` with a
``register(subparsers)`` function that adds its parser and sets ``func`` (a callable taking the
parsed args and returning an exit code). User errors raise :class:`UserError`: one line, exit 2,
no traceback."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .errors import UserError

__all__ = ["UserError", "build_parser", "main"]


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
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"rslora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rslora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
