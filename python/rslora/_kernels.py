"""Which SIMD kernels the compiled core runs (AVX-512, AVX2+FMA or the portable baseline).

The best path this CPU supports is chosen when the core loads. ``RSLORA_CPU_KERNELS`` (read at
import) or :func:`set_kernel_path` forces another, so that every path can be tested and timed on
one machine; a path the CPU cannot run is refused with a ``ValueError``, never emulated. The
paths agree to rounding (lane counts and FMA differ), not bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from . import _core

ENV = "RSLORA_CPU_KERNELS"
PATHS = ("avx512", "avx2", "baseline")


def kernel_path() -> str:
    """The SIMD kernel path in use: ``"avx512"``, ``"avx2"`` or ``"baseline"``."""
    return _core.kernel_path()


def kernel_paths() -> dict[str, str]:
    """Every kernel path mapped to ``""`` where this CPU can run it, else the reason it cannot."""
    return dict(_core.kernel_paths())


def supported_kernel_paths() -> list[str]:
    """The paths this CPU can run, best first."""
    why = kernel_paths()
    return [p for p in PATHS if not why[p]]


def set_kernel_path(name: str) -> None:
    """Run the SIMD kernel path ``name`` from now on (process-wide, all threads).

    Raises ``ValueError`` for an unknown name or a path this CPU cannot run (say which).
    """
    if not isinstance(name, str):
        raise TypeError(f"kernel path must be a str, got {type(name).__name__}")
    _core.set_kernel_path(name)


@contextlib.contextmanager
def use_kernel_path(name: str) -> Iterator[None]:
    """Run the block with kernel path ``name``, then restore the previous one."""
    old = kernel_path()
    set_kernel_path(name)
    try:
        yield
    finally:
        set_kernel_path(old)


def apply_env() -> None:
    """Force the path named by ``RSLORA_CPU_KERNELS`` (empty or ``auto``: keep the best)."""
    name = os.environ.get(ENV, "").strip().lower()
    if name in ("", "auto"):
        return
    try:
        set_kernel_path(name)
    except ValueError as e:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: {e}") from None
