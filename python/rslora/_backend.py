"""The one dispatch point: which backend runs an op, decided from where its arrays live.

An array whose DLPack device (``__dlpack_device__``) is not the host goes to the GPU backend
(``rslora.cuda``, imported only then); everything else goes to the CPU backend (``_cpu``). Both
backends have the same functions and judge their arguments by the same rules (``_validation``),
so a call is accepted or refused the same way on either. Ops with no GPU implementation refuse
device arrays here, by name, instead of failing inside a conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._validation import on_gpu

__all__ = ["on_gpu", "op", "host_only", "TWO_BACKENDS"]

# Ops both backends implement, with the same signature (the scale already resolved).
TWO_BACKENDS = ("lora_linear", "merge", "lora_linear_multi", "lora_add_multi", "rsvd")


def op(name: str, lead: object) -> Callable[..., Any]:
    """The implementation of op ``name`` for a call whose leading array is ``lead``."""
    if name not in TWO_BACKENDS:
        raise KeyError(name)
    if on_gpu(lead):
        from . import cuda

        fn: Callable[..., Any] = getattr(cuda, name)
    else:
        from . import _cpu

        fn = getattr(_cpu, name)
    return fn


def host_only(name: str, **arrays: object) -> None:
    """For an op the CPU alone implements: refuse a device array, naming it."""
    for arg, a in arrays.items():
        if on_gpu(a):
            raise TypeError(f"{name} runs on the CPU only, but {arg} is a {type(a).__name__} on "
                            "a GPU; pass NumPy arrays (e.g. tensor.cpu().numpy())")
