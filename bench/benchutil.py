"""Shared helpers for the benchmark suites (import as ``from benchutil import set_case``).
Each benchmark also asserts correctness, so ``pytest bench --benchmark-disable`` runs them as tests."""

from __future__ import annotations


def set_case(benchmark, group: str, role: str, **info) -> None:
    """Name the side-by-side group and this entry's role in it (see bench/report.py)."""
    benchmark.group = group
    benchmark.extra_info["role"] = role
    benchmark.extra_info.update(info)
