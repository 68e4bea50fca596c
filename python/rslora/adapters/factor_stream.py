"""``adapter_model.safetensors`` of an extraction, written as each layer's factors arrive, so
the process holds a few layers' factors at any model size (see :class:`FactorStream`).

The file is the one :func:`.peft_format.write_adapter_files` writes from all factors at once,
byte for byte: each factor is divided by ``sqrt(scale(alpha, r))`` (the scale split evenly
over A and B) in float32, then cast to the storage dtype, element by element either way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ..scaling import scale
from .checkpoint import DTYPE_CODES, stored_array
from .peft_format import PREFIX, WEIGHTS_NAME, common_rank, factor_keys
from .safetensors_stream import Spill, TensorFile, copy_pieces

__all__ = ["FactorStream"]


class FactorStream:
    """Writes ``folder/adapter_model.safetensors`` from factors handed over one layer at a time,
    in any order.

    Parameters
    ----------
    folder : Path
        The output's temporary folder (see :func:`rslora._files.atomic_output_dir`): the
        partial and spill files live there, so a killed run leaves them only where the next run
        removes them.
    plan : list of (module, (d_out, d_in), embedding, rank)
        Every module that may get factors, in plan order; ``rank`` is the rank it will have
        (fixed rank, capped by its shape), or None when known only from its SVD (``tol``).
    dtype : {"float32", "float16", "bfloat16"}
    rule : {"rslora", "standard"}
    alpha : float or None
        ``lora_alpha``; None: the most common rank of the modules written.
    full : mapping
        ``{key in the PEFT model: shape}`` of the tensors saved whole (biases) if every
        planned module gets factors.

    Notes
    -----
    When every factor's bytes are known as it arrives (each module's rank is fixed, and so is
    alpha: given, or the one rank all modules share), the factors go straight to their offsets in
    a preallocated file. Otherwise (``tol``; ranks that differ with alpha left to their most
    common value) they are spilled to a temporary file in float32 as computed, then scaled and
    cast into the final file a piece at a time. Layers that turn out unchanged (no factors)
    shift every offset: the file is then rebuilt from the preallocated one by streaming copies.
    """

    def __init__(self, folder: Path, plan: list, dtype: str, rule: str, alpha: float | None,
                 full: Mapping[str, tuple[int, ...]]):
        self.folder, self.code, self.rule = Path(folder), DTYPE_CODES[dtype], rule
        self.alpha = None if alpha is None else float(alpha)
        self.plan = {m: (tuple(shape), bool(emb), rank) for m, shape, emb, rank in plan}
        self.full_planned = {f"{PREFIX}{k}": tuple(s) for k, s in full.items()}
        self.ranks: dict[str, int] = {}
        self.path = self.folder / WEIGHTS_NAME
        ranks = [rank for _, _, rank in self.plan.values()]
        self._file: TensorFile | None = None
        self._spill: Spill | None = None
        if all(r is not None for r in ranks) and (alpha is not None or len(set(ranks)) <= 1):
            self.a = self.alpha if self.alpha is not None else float(
                common_rank(dict(enumerate(ranks))))
            self._file = TensorFile(self._partial(), {**self._specs(self.plan), **{
                key: (self.code, shape) for key, shape in self.full_planned.items()}})
        else:
            self._spill = Spill(self.folder / f".{WEIGHTS_NAME}.spill")

    def _partial(self) -> Path:
        return self.folder / f".{WEIGHTS_NAME}.partial"

    def _specs(self, modules) -> dict:
        specs = {}
        for m in modules:
            (d_out, d_in), emb, rank = self.plan[m]
            r = self.ranks.get(m, rank)
            ka, kb = factor_keys(m, emb)
            specs[ka], specs[kb] = (self.code, (r, d_in)), (self.code, (d_out, r))
        return specs

    def _root(self, a: float, r: int) -> np.float32:
        return np.float32(math.sqrt(scale(a, r, self.rule)))

    def put(self, module: str, A: np.ndarray, B: np.ndarray) -> None:
        """Take a layer's float32 factors for scale 1 (``B @ A = delta_r``); ``A`` and ``B``
        may be scaled in place."""
        (d_out, d_in), emb, rank = self.plan[module]
        r = A.shape[0]
        if A.shape != (r, d_in) or B.shape != (d_out, r) or rank is not None and r != rank:
            raise ValueError(f"module {module!r}: factors {A.shape}, {B.shape} do not fit its "
                             f"plan ({d_out}, {d_in}) at rank {rank}")
        if module in self.ranks:
            raise ValueError(f"module {module!r} got factors twice")
        ka, kb = factor_keys(module, emb)
        if self._file is not None:
            root = self._root(self.a, r)
            A /= root
            B /= root
            self._file.write(ka, A)
            self._file.write(kb, B)
        else:
            assert self._spill is not None
            self._spill.put(ka, A)
            self._spill.put(kb, B)
        self.ranks[module] = r

    def finish(self, full: Mapping[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]
               ) -> tuple[dict, float]:
        """Write the tensors saved whole (``{key in the PEFT model: (shape, read)}``: ``read()``
        gives the array) and complete the file. Returns ``({module: rank}`` in plan order,
        ``alpha)``."""
        ranks = {m: self.ranks[m] for m in self.plan if m in self.ranks}
        a = float(common_rank(ranks)) if self.alpha is None else self.alpha
        full = {f"{PREFIX}{k}": (tuple(s), read) for k, (s, read) in full.items()}
        f = self._file
        if f is not None and len(ranks) == len(self.plan) and \
                {k: s for k, (s, _) in full.items()} == self.full_planned:
            assert a == self.a
            for key, (_, read) in full.items():
                f.write(key, read())
            f.close()
            os.replace(f.path, self.path)
            return ranks, a
        sources: dict[str, Callable] = {}
        for m in ranks:
            r = ranks[m]
            root = self._root(a, r)
            for key in factor_keys(m, self.plan[m][1]):
                if f is not None:  # the bytes are final: copy them
                    start, end = f.ranges[key]
                    sources[key] = lambda s=start, e=end, p=f.path: copy_pieces(p, s, e)
                else:
                    sources[key] = lambda k=key, root=root: self._scaled(k, root)
        for key, (_, read) in full.items():
            sources[key] = lambda read=read: [stored_array(read(), self.code)]
        specs = {**self._specs(ranks), **{k: (self.code, s) for k, (s, _) in full.items()}}
        with TensorFile(self.path, specs) as out:
            for key in out.names():  # file order: the writes go forward through the file
                out.write_pieces(key, sources[key]())
        self.discard_temporaries()
        return ranks, a

    def _scaled(self, key: str, root: np.float32):
        assert self._spill is not None
        for piece in self._spill.pieces(key):
            piece /= root
            yield stored_array(piece, self.code)

    def discard_temporaries(self) -> None:
        """Remove the partial and spill files (also after a failure: the folder is removed
        whole then anyway, but a spill can be as large as the adapter)."""
        if self._file is not None:
            self._file.discard()
        if self._spill is not None:
            self._spill.remove()
