"""The exceptions rslora raises beyond Python's own (``ValueError``, ``TypeError``, ...).

Library code raises these; only the command line (``cli.py``) turns them into one-line messages.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in a command line or in the files it names, reported as one line (exit 2)."""
