"""Optimal rank reduction of a LoRA adapter, per module (``rslora resize``).

The best rank-k approximation of a module's update ``B @ A`` (Eckart-Young, Frobenius and
spectral norm) comes from its SVD, which the factors give without forming the ``d_out x d_in``
matrix: with thin QRs ``B = Q_B R_B`` and ``A.T = Q_A R_A``, ``B @ A = Q_B (R_B R_A.T) Q_A.T``, so
the SVD ``R_B R_A.T = U S V.T`` of an ``r x r`` matrix gives ``B @ A = (Q_B U) S (Q_A V).T``.
Cost ``O((d_out + d_in) r^2)`` instead of ``O(d_out d_in min(d_out, d_in))`` for the SVD of the
dense delta (kohya's ``resize_lora``). All of it in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._validation import integer, number
from .atomic import atomic_output_dir, check_output_dir
from .peft_format import WEIGHTS_NAME
from .rewrite import (
    RawAdapter,
    adapter_file,
    narrow,
    open_raw_adapter,
    uniform_config,
    write_factors,
    write_folder_files,
)
from .safetensors_stream import Spill

__all__ = ["resize_adapter", "ResizeResult", "ModuleReport", "factor_svd", "choose_rank",
           "truncate"]


def factor_svd(A: np.ndarray, B: np.ndarray):
    """The thin SVD of ``B @ A`` from the factors: ``(L, S, Rt)`` with ``B @ A = L diag(S) Rt``,
    ``L (m, p)``, ``Rt (p, n)`` orthonormal, ``S`` descending, ``p = min(m, n, r)``. float64.
    Householder QR (not a Gram matrix), so rank-deficient and ill-conditioned factors are fine.
    Call it under ``threadpoolctl.threadpool_limits(1)``: BLAS threads only slow it down."""
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    Qb, Rb = np.linalg.qr(B)  # (m, min(m, r)), (min(m, r), r)
    Qa, Ra = np.linalg.qr(A.T)  # (n, min(n, r)), (min(n, r), r)
    U, S, Vt = np.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ U, S, Vt @ Qa.T


def _tail_energy(S: np.ndarray) -> np.ndarray:
    """``t[k] = sum(S[k:] ** 2)`` for k = 0..p (t[p] = 0 exactly)."""
    sq = S.astype(np.float64) ** 2
    return np.concatenate([np.cumsum(sq[::-1])[::-1], [0.0]])


def choose_rank(S: np.ndarray, *, rank=None, tol=None, energy=None, max_rank=None) -> int:
    """The new rank (>= 1) for singular values ``S``: ``rank`` as given; or the smallest with
    relative Frobenius error ``sqrt(t[k] / t[0]) <= tol``; or the smallest keeping a fraction
    ``>= energy`` of ``sum(S ** 2)``; capped by ``max_rank``."""
    if rank is not None:
        return rank
    t = _tail_energy(S)
    if t[0] == 0.0:
        k = 1
    else:
        rel = t / t[0]  # squared relative error at each k; 1 - rel is the energy kept
        ok = rel <= (tol * tol if tol is not None else 1.0 - energy)
        k = max(1, int(np.argmax(ok)))  # ok[p] is true: rel[p] = 0
    return min(k, max_rank) if max_rank is not None else k


def truncate(L, S, Rt, k: int, factor: float = 1.0):
    """New factors ``(A, B)`` of rank ``k`` with ``B @ A = factor * L[:, :k] S[:k] Rt[:k]``,
    the singular values split evenly (``sqrt``) between them; zero-padded past ``len(S)``."""
    p = min(k, S.size)
    root = np.sqrt(S[:p] * abs(factor))
    A = np.zeros((k, Rt.shape[1]))
    B = np.zeros((L.shape[0], k))
    A[:p] = root[:, None] * Rt[:p]
    B[:, :p] = L[:, :p] * (root * math.copysign(1.0, factor))
    return A, B


@dataclass(frozen=True)
class _Module:
    """One module to resize: its factors and the rule for its new rank (picklable)."""

    A: np.ndarray
    B: np.ndarray
    r: int
    rank: int | None
    tol: float | None
    energy: float | None
    max_rank: int | None


def _plan_module(job: _Module):
    """``(L, S, Rt, k)``: the SVD of ``B @ A`` and the new rank, with ``L`` and ``Rt`` cut to
    the ``k`` directions kept (None when nothing is cut: the factors are kept as they are)."""
    L, S, Rt = factor_svd(job.A, job.B)
    k = min(choose_rank(S, rank=job.rank, tol=job.tol, energy=job.energy,
                        max_rank=job.max_rank), job.r)
    if k == job.r:
        return None, S, None, k
    return L[:, :k], S, Rt[:k], k


@dataclass
class ModuleReport:
    """One module: ranks, the share of ``||B A||_F^2`` kept and the relative Frobenius error
    ``||B A - trunc_k(B A)||_F / ||B A||_F`` (exact in float64, before storage rounding)."""

    module: str
    shape: tuple  # (d_out, d_in) of the product B @ A
    old_rank: int
    new_rank: int
    energy: float
    error: float
    norm: float  # ||scale * B @ A||_F


@dataclass
class ResizeResult:
    out_dir: Path
    config: dict
    modules: list = field(default_factory=list)

    @property
    def error(self) -> float:
        """Relative Frobenius error over all modules together."""
        num = sum((m.error * m.norm) ** 2 for m in self.modules)
        den = sum(m.norm ** 2 for m in self.modules)
        return math.sqrt(num / den) if den else 0.0

    def summary(self) -> str:
        """The per-module table as aligned text."""
        w = max([len("module")] + [len(m.module) for m in self.modules])
        head = (f"{'module':<{w}}  {'old rank':>8}  {'new rank':>8}  {'energy kept':>12}  "
                f"{'rel. error':>10}")
        lines = [head, "-" * len(head)]
        for m in self.modules:
            lines.append(f"{m.module:<{w}}  {m.old_rank:>8}  {m.new_rank:>8}  {m.energy:>12.6f}  "
                         f"{m.error:>10.3e}")
        before = sum(m.old_rank * sum(m.shape) for m in self.modules)
        after = sum(m.new_rank * sum(m.shape) for m in self.modules)
        lines.append("-" * len(head))
        lines.append(f"{len(self.modules)} module(s), adapter parameters {before:,} -> {after:,}, "
                     f"overall relative error {self.error:.3e}")
        return "\n".join(lines)


def _check_int(value, name: str):
    return None if value is None else integer(value, name, 1)


def _check_fraction(value, name: str, low_open: bool, high_open: bool):
    if value is None:
        return None
    value = number(value, name)
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    if not (math.isfinite(value) and lo_ok and hi_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def resize_adapter(adapter, out_dir, *, rank: int | None = None, tol: float | None = None,
                   energy: float | None = None, max_rank: int | None = None,
                   force: bool = False, progress: bool = False, client=None) -> ResizeResult:
    """Lower the rank of every module of a PEFT LoRA adapter optimally (Eckart-Young).

    Parameters
    ----------
    adapter : str or os.PathLike
        A PEFT LoRA adapter folder (Linear, Conv1D and embedding LoRA; any dtype).
    out_dir : str or os.PathLike
        Folder to write (atomically); must not be ``adapter`` or hold it.
    rank : int, optional
        New rank of every module, capped at the module's current rank.
    tol : float in [0, 1), optional
        Per module, the smallest rank whose relative Frobenius error
        ``||dW - dW_k||_F / ||dW||_F`` is at most ``tol``.
    energy : float in (0, 1], optional
        Per module, the smallest rank keeping at least this fraction of ``||dW||_F^2``
        (the same as ``tol = sqrt(1 - energy)``).
    max_rank : int, optional
        Upper bound on the rank with ``tol`` or ``energy``.
    force : bool
        Replace ``out_dir`` if it exists.
    progress : bool
        Show a progress bar over modules (on a terminal).
    client : distributed.Client, optional
        Compute the modules' SVDs as tasks on this Dask cluster (small modules batched into one
        task; the factors travel from this process, which reads the adapter and writes the
        result: it holds the modules of the tasks in flight). Same bytes as one process's.
        Default: this process.

    Exactly one of ``rank``, ``tol``, ``energy``.

    Returns
    -------
    ResizeResult
        The config written and a :class:`ModuleReport` per module (``summary()`` is the table).

    Notes
    -----
    Each module's update becomes exactly (to one rounding to the factors' dtype) its best
    approximation of the new rank. The ranks go to ``r`` / ``rank_pattern``; ``lora_alpha`` and
    the rule stay, and the written adapter is in uniform-scale form (``alpha_pattern`` entries
    give modules of another rank the top-level scale; any remaining ratio is folded into the
    factors), so clients that ignore the patterns compute the same update as PEFT. Modules whose
    rank does not change keep their ``A`` bit for bit. Other tensors and files are copied.

    A few modules' factors are in memory at a time, not the adapter: each is read when its SVD
    is due and written at its place in the new file. With ``tol`` or ``energy`` the new ranks
    (so the config, and every module's scale) are known only at the end: the kept directions
    wait in a float64 file in the output's temporary folder meanwhile (up to twice the written
    factors' size for float32 adapters, four times for 16-bit ones), removed when done.
    """
    given = [n for n, v in (("rank", rank), ("tol", tol), ("energy", energy)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of rank, tol or energy"
                         + (f" (got {', '.join(given)})" if given else ""))
    rank, max_rank = _check_int(rank, "rank"), _check_int(max_rank, "max_rank")
    if max_rank is not None and rank is not None:
        raise ValueError("max_rank goes with tol or energy (rank is already a bound)")
    tol = _check_fraction(tol, "tol", low_open=False, high_open=True)
    energy = _check_fraction(energy, "energy", low_open=True, high_open=False)
    check_output_dir(out_dir, force, inputs=(adapter,))  # before any work
    with open_raw_adapter(adapter) as raw, \
            atomic_output_dir(out_dir, force, inputs=(raw.path,)) as tmp:
        jobs = _Jobs(raw, rank, tol, energy, max_rank)
        reports: dict = {}
        if rank is not None:
            # Every new rank is known: each module goes to its place in the file as it is done.
            ranks = {n: min(rank, m.r) for n, m in raw.modules.items()}
            config, scales = uniform_config(raw.config, ranks, float(raw.config["lora_alpha"]),
                                            raw.rule)
            with adapter_file(raw, tmp, ranks) as f:
                for name, plan in _plans(jobs, client, progress):
                    reports[name] = _report(raw, name, plan)
                    _write(raw, f, name, plan, scales[name])
                raw.copy_other(f)
        else:
            # The ranks, hence the config's common rank and every module's scale, are known only
            # when all are done: the kept directions wait in a float64 file in the output's
            # temporary folder (float64: the new factors are rounded once, as ever).
            with Spill(tmp / f".{WEIGHTS_NAME}.spill") as spill:
                ks = {}
                for name, (L, S, Rt, k) in _plans(jobs, client, progress):
                    reports[name] = _report(raw, name, (L, S, Rt, k))
                    ks[name] = k
                    if L is not None:
                        for part, x in (("L", L), ("S", S), ("Rt", Rt)):
                            spill.put((name, part), x)
                    del L, S, Rt
                ranks = {n: ks[n] for n in raw.modules}  # module order
                config, scales = uniform_config(raw.config, ranks,
                                                float(raw.config["lora_alpha"]), raw.rule)
                with adapter_file(raw, tmp, ranks) as f:
                    for name, k in ranks.items():
                        plan = (None, None, None, k) if (name, "L") not in spill.index else \
                            (*(spill.read((name, part)) for part in ("L", "S", "Rt")), k)
                        _write(raw, f, name, plan, scales[name])
                    raw.copy_other(f)
        write_folder_files(raw, tmp, config)
    result = ResizeResult(Path(out_dir), config)
    result.modules = [reports[n] for n in ranks]  # module order, whatever order they finished in
    return result


class _Jobs(Sequence):
    """The modules to resize, each read from the file as a task takes it (``jobs[i]`` or a
    slice), so only the modules in flight are in memory."""

    def __init__(self, raw: RawAdapter, rank, tol, energy, max_rank):
        self.raw, self.names = raw, list(raw.modules)
        self.rule = (rank, tol, energy, max_rank)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        name = self.names[i]  # IndexError past the end ends iteration
        A, B = self.raw.factors(name)
        return _Module(A, B, self.raw.modules[name].r, *self.rule)

    def weights(self) -> list:
        return [m.r * sum(m.shape) for m in self.raw.modules.values()]


def _plans(jobs: _Jobs, client, progress: bool):
    """Yield ``(module, _plan_module(job))`` for every module, as each is done (any order with
    ``client``)."""
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    from .parallel import run_items

    # One BLAS thread: these problems are tall-skinny QRs and r x r SVDs of a few ms, which
    # OpenBLAS's threads slow down (4096 x 64 QR: 60 ms on one thread, 1.3 s on two when the
    # cores are shared). Dask's workers run each task with their own thread count (one).
    with threadpool_limits(limits=1, user_api="blas"), \
            tqdm(total=len(jobs), desc="resize", unit="module",
                 disable=None if progress else True) as bar:
        for i, plan in run_items(client, _plan_module, jobs, weights=jobs.weights(),
                                 name=lambda j: f"resize-{j.A.shape}"):
            yield jobs.names[i], plan
            bar.update(1)


def _report(raw: RawAdapter, name: str, plan) -> ModuleReport:
    m, S, k = raw.modules[name], plan[1], plan[3]
    t = _tail_energy(S)
    rel = t[min(k, S.size)] / t[0] if t[0] > 0 else 0.0
    return ModuleReport(name, m.shape, m.r, k, 1.0 - rel, math.sqrt(rel),
                        abs(m.scale) * math.sqrt(t[0]))


def _write(raw: RawAdapter, f, name: str, plan, new_scale: float) -> None:
    """Module ``name``'s new factors, for its new scale, rounded once to their dtypes, into the
    file ``f``."""
    L, S, Rt, k = plan
    m = raw.modules[name]
    factor = m.scale / new_scale
    what = f"module {name!r}"
    if k == m.r:  # nothing to cut: keep A, fold the scale into B (as convert does)
        a, b = raw.kept(name, factor, f"{what}: B")
    else:
        A, B = truncate(L, S, Rt, k, factor)
        a, b = narrow(A, m.a_code, f"{what}: A"), narrow(B, m.b_code, f"{what}: B")
    write_factors(f, m, a, b)
