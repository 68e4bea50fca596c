"""Subcommands of the ``rslora`` command line, one module each (see rslora.cli)."""
