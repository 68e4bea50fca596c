"""Atomic output folders for the adapter commands: the shared writer in :mod:`rslora._files`."""

from __future__ import annotations

from .._files import MANIFEST, OutputDir, atomic_output_dir, check_not_input, check_output_dir

__all__ = ["MANIFEST", "OutputDir", "atomic_output_dir", "check_not_input", "check_output_dir"]
