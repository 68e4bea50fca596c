"""rslora: rank-stabilized LoRA kernels for NumPy.

Scaling rules (``alpha / r`` and rsLoRA's ``alpha / sqrt(r)``), a fused LoRA linear layer and
in-place merge, built on the BLAS that NumPy itself uses (one thread pool per process).
"""

from __future__ import annotations

import sys as _sys
from typing import Any as _Any

from . import _blas, _core, _kernels  # noqa: F401  (_core first: a build problem fails here)

_blas.bind()
_kernels.apply_env()  # RSLORA_CPU_KERNELS forces a SIMD kernel path
from ._kernels import kernel_path, kernel_paths, set_kernel_path, use_kernel_path  # noqa: E402

from .scaling import format_scale_table, scale, scale_table  # noqa: E402
from .linear import lora_linear, merge, unmerge  # noqa: E402
from .backward import lora_linear_backward  # noqa: E402
from .multi import lora_add_multi, lora_linear_multi  # noqa: E402
from .layer import LoRAGrads, LoRALinear  # noqa: E402
from .spectrum import Spectrum, lora_from_delta, spectrum  # noqa: E402
from .svd import RsvdTolResult, rsvd, rsvd_tol  # noqa: E402
from .adapters import (  # noqa: E402
    Checkpoint, CheckpointError, LoraAdapter, LoraModule, extract_adapter, load_adapter,
    merge_adapter, merge_checkpoint, save_adapter)
from .adapters import convert_adapter, resize_adapter  # noqa: E402
from .study import synthetic  # noqa: E402  (style/facts updates; the study in rslora.study)
from . import adapters as _adapters  # noqa: E402

# Modules that moved into subpackages keep their old import paths (`import rslora.checkpoint`).
for _old, _new in {"synthetic": synthetic, "checkpoint": _adapters.checkpoint,
                   "adapter": _adapters.peft_format, "adapter_merge": _adapters.merge,
                   "extract": _adapters.extract}.items():
    _sys.modules[f"{__name__}.{_old}"] = _new
    globals()[_old] = _new
del _old, _new

__version__ = "0.1.0"

__all__ = [
    "scale",
    "scale_table",
    "format_scale_table",
    "lora_linear",
    "merge",
    "unmerge",
    "lora_linear_backward",
    "lora_linear_multi",
    "lora_add_multi",
    "LoRALinear",
    "LoRAGrads",
    "load_adapter",
    "save_adapter",
    "merge_adapter",
    "merge_checkpoint",
    "extract_adapter",
    "convert_adapter",
    "resize_adapter",
    "LoraAdapter",
    "LoraModule",
    "Checkpoint",
    "CheckpointError",
    "show_config",
    "kernel_path",
    "kernel_paths",
    "set_kernel_path",
    "use_kernel_path",
    "rsvd",
    "rsvd_tol",
    "RsvdTolResult",
    "lora_from_delta",
    "spectrum",
    "Spectrum",
    "synthetic",
]


def show_config(print_: bool = True) -> dict[str, _Any]:
    """Which BLAS the core is bound to (and why), its threads, the SIMD kernel path, the backends.

    Returns the same facts as a dict; prints them unless ``print_=False``.
    """
    import numpy as np

    cfg = {"version": __version__, "numpy": np.__version__, "blas": _blas.config(),
           "kernels": {"path": kernel_path(), "supported": _kernels.supported_kernel_paths()}}
    from . import cuda

    try:  # loads the CUDA module (finding cuBLAS in the nvidia wheels) and asks for devices
        cfg["cuda"] = "built; devices: " + (
            ", ".join(d["name"] for d in cuda.info()["devices"]) or "none")
    except ImportError as e:
        cfg["cuda"] = f"not available ({e})"
    except RuntimeError as e:
        cfg["cuda"] = f"built; no usable GPU ({e})"
    if print_:
        b = cfg["blas"]
        print(f"rslora {cfg['version']} (numpy {cfg['numpy']})")
        print(f"  BLAS:    {b['path']}")
        print(f"  source:  {b['reason']}")
        print(f"  symbols: prefix={b['symbol_prefix']!r} suffix={b['symbol_suffix']!r} "
              f"int64={b['int64']}")
        print(f"  threads: {b['num_threads']}")
        k = cfg["kernels"]
        forced = "" if k["path"] == k["supported"][0] else f" (forced: {_kernels.ENV} or set_kernel_path)"
        print(f"  kernels: {k['path']}{forced}; this CPU runs: {', '.join(k['supported'])}")
        print(f"  CUDA:    {cfg['cuda']}")
    return cfg
