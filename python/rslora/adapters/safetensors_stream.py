"""Safetensors files written one tensor at a time, so a writer holds one tensor, not the file.

:class:`TensorFile` takes every tensor's name, dtype code and shape first: it writes the header,
sizes the file, and then takes each tensor, in any order, at its offset (``os.pwrite``). The bytes
are those ``safetensors``' own ``serialize_file`` writes for the same tensors (the order it
sorts them in, its compact JSON, the header padded with spaces to a multiple of 8), so a streamed
file and one saved whole are the same file. :class:`Spill` keeps arrays whose final place is not
known yet (their shapes are) in a temporary file, to be copied into a :class:`TensorFile` in
pieces later.

The format: 8 bytes little-endian N, an N-byte JSON header ``{"__metadata__": {str: str},
name: {"dtype", "shape", "data_offsets": [start, end]}, ...}`` (offsets relative to the end of
the header), then the tensors' bytes back to back, little-endian, C order.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .checkpoint import _ITEMSIZE, stored_array

__all__ = ["TensorFile", "Spill", "header_layout", "CHUNK_BYTES", "WRITABLE_CODES"]

#: safetensors sorts tensors by dtype, the dtypes of larger alignment first, then by name: the
#: codes rslora reads and writes, in that order (its ``Dtype`` enum, descending).
_DTYPE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8",
                "BOOL")
_RANK = {code: i for i, code in enumerate(_DTYPE_ORDER)}
#: The dtype codes a :class:`TensorFile` can hold.
WRITABLE_CODES = _DTYPE_ORDER

#: Bytes moved per read or write when tensors are copied or converted in pieces.
CHUNK_BYTES = 1 << 24


def header_layout(tensors: Mapping[str, tuple[str, tuple[int, ...]]],
                  metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict]:
    """The header (length prefix included) of a file holding ``{name: (code, shape)}``, and
    ``{name: (start, end)}``: each tensor's absolute byte range in the file, in file order.

    ``metadata`` is written in its own order: ``safetensors`` writes a one-key map the same way,
    but several keys in an order of its own (a hash map's)."""
    for name, (code, shape) in tensors.items():
        if code not in _RANK:
            raise ValueError(f"tensor {name!r}: dtype {code!r} cannot be written (one of "
                             f"{', '.join(_DTYPE_ORDER)})")
        if not all(isinstance(n, (int, np.integer)) and n >= 0 for n in shape):
            raise ValueError(f"tensor {name!r}: shape {tuple(shape)} is not a shape")
    order = sorted(tensors, key=lambda n: (_RANK[tensors[n][0]], n))  # as serialize_file sorts
    entries: dict = {} if metadata is None else {"__metadata__": dict(metadata)}
    sizes, pos = {}, 0
    for name in order:
        code, shape = tensors[name]
        n = math.prod(shape) * _ITEMSIZE[code]
        entries[name] = {"dtype": code, "shape": [int(s) for s in shape],
                         "data_offsets": [pos, pos + n]}
        sizes[name] = (pos, pos + n)
        pos += n
    # serde_json's compact form: no spaces, non-ASCII kept as UTF-8, controls as \uXXXX / \n.
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    return (len(text).to_bytes(8, "little") + text,
            {name: (base + s, base + e) for name, (s, e) in sizes.items()})


def _bytes(data) -> memoryview:
    """``data`` (an array, stored as it is, or bytes) as a flat view of its bytes."""
    if isinstance(data, np.ndarray):  # also empty and 0-d arrays, which memoryview cannot cast
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
    return memoryview(data).cast("B")


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = _bytes(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pread_into(fd: int, buf: np.ndarray, offset: int, what: str) -> None:
    view, pos = _bytes(buf), 0
    while pos < len(view):
        n = os.preadv(fd, [view[pos:]], offset + pos)
        if n <= 0:
            raise OSError(f"{what}: the file ended early (read {pos} of {len(view)} bytes)")
        pos += n


class _OwnedFile:
    """A file this object created and holds open (``path``, ``_fd``): closed when collected,
    removed on request."""

    path: Path
    _fd: int | None

    def _close_and_remove(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class TensorFile(_OwnedFile):
    """A safetensors file of known tensors, filled in any order (see the module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        Created (never replaced: it must not exist); removed again if the ``with`` block fails.
    tensors : mapping
        ``{name: (code, shape)}`` of every tensor the file will hold.
    metadata : mapping, optional
        ``__metadata__``; default ``{"format": "pt"}``, as :func:`.checkpoint.save_tensors`.

    Every tensor must be written exactly once before :meth:`close` (a tensor never written would
    read as zeros, so ``close`` refuses).
    """

    def __init__(self, path, tensors: Mapping[str, tuple[str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(os.fspath(path))
        self.specs = {name: (code, tuple(int(n) for n in shape))
                      for name, (code, shape) in tensors.items()}
        header, self.ranges = header_layout(self.specs,
                                            {"format": "pt"} if metadata is None else metadata)
        self.size = max((e for _, e in self.ranges.values()), default=len(header))
        self._left = set(self.specs)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL
                                       | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            free = os.statvfs(self.path.parent)
            avail = free.f_bavail * free.f_frsize
            if self.size > avail:  # say so now, not hours later at the first full block
                raise OSError(f"{self.path.parent}: {self.size / 2**30:.2f} GiB needed for "
                              f"{self.path.name}, {avail / 2**30:.2f} GiB free")
            _pwrite_all(self._fd, header, 0)
            os.ftruncate(self._fd, self.size)
        except BaseException:
            self.discard()
            raise

    def names(self) -> list[str]:
        """The tensors in file order."""
        return list(self.ranges)

    def _take(self, name: str) -> tuple[int, int, int]:
        """``(fd, start, end)`` for writing ``name``, once."""
        if name not in self._left:
            raise ValueError(f"{self.path.name}: tensor {name!r} is not in the plan"
                             if name not in self.specs else
                             f"{self.path.name}: tensor {name!r} is written twice")
        if self._fd is None:
            raise ValueError(f"{self.path.name} is closed")
        self._left.discard(name)
        return (self._fd, *self.ranges[name])

    def write(self, name: str, arr: np.ndarray) -> None:
        """Store ``arr`` as tensor ``name`` (cast to its dtype as ``save_tensors`` casts)."""
        if name in self.specs and tuple(np.shape(arr)) != self.specs[name][1]:
            raise ValueError(f"{self.path.name}: tensor {name!r} has shape {np.shape(arr)}, "
                             f"planned {self.specs[name][1]}")
        fd, start, end = self._take(name)
        code = self.specs[name][0]
        data = stored_array(np.asarray(arr), code)
        if data.nbytes != end - start:
            raise ValueError(f"{self.path.name}: tensor {name!r} is {data.dtype} ({data.nbytes} "
                             f"bytes), planned {code} ({end - start} bytes)")
        _pwrite_all(fd, data, start)

    def write_pieces(self, name: str, pieces: Iterable) -> None:
        """Store tensor ``name`` from consecutive pieces of its stored bytes (arrays of its
        dtype, or bytes), in order: for tensors copied or converted a chunk at a time."""
        fd, start, end = self._take(name)
        pos = start
        for piece in pieces:
            data = _bytes(piece)
            if pos + len(data) > end:
                raise ValueError(f"{self.path.name}: tensor {name!r} got more than its "
                                 f"{end - start} bytes")
            _pwrite_all(fd, data, pos)
            pos += len(data)
        if pos != end:
            raise ValueError(f"{self.path.name}: tensor {name!r} got {pos - start} of its "
                             f"{end - start} bytes")

    def close(self) -> None:
        """Check that every tensor was written, then close (durability is the caller's:
        :class:`rslora._files.OutputDir` fsyncs every file it commits)."""
        if self._fd is None:
            return
        if self._left:
            missing = sorted(self._left)
            raise ValueError(f"{self.path.name}: {len(missing)} tensor(s) never written, e.g. "
                             f"{missing[0]!r}")
        fd, self._fd = self._fd, None
        os.close(fd)

    def discard(self) -> None:
        """Close and remove the file, complete or not."""
        self._close_and_remove()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()


class Spill(_OwnedFile):
    """Arrays appended to a temporary file as they arrive and read back in pieces: somewhere to
    keep results whose place in the output is known only when all have arrived.

    ``path`` is created (it must not exist) and removed by :meth:`remove` or a failing ``with``
    block; put it inside the output's temporary folder, so a crash leaves it where the next run
    cleans up.
    """

    def __init__(self, path):
        self.path = Path(os.fspath(path))
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL
                                       | getattr(os, "O_CLOEXEC", 0), 0o600)
        self._end = 0
        self.index: dict = {}  # key -> (offset, dtype, shape)

    def put(self, key, arr: np.ndarray) -> None:
        """Append ``arr`` (its dtype and shape are kept) under ``key``."""
        if self._fd is None:
            raise ValueError(f"{self.path.name} is closed")
        if key in self.index:
            raise ValueError(f"{self.path.name}: {key!r} is spilled twice")
        data = np.ascontiguousarray(arr)
        _pwrite_all(self._fd, data, self._end)
        self.index[key] = (self._end, data.dtype, data.shape)
        self._end += data.nbytes

    def pieces(self, key, chunk_bytes: int = CHUNK_BYTES):
        """Yield the array spilled under ``key`` flattened (C order), in 1-D pieces of at most
        ``chunk_bytes``: the whole is never in memory."""
        if self._fd is None:
            raise ValueError(f"{self.path.name} is closed")
        offset, dtype, shape = self.index[key]
        count = math.prod(shape)
        step = max(1, chunk_bytes // dtype.itemsize)
        for first in range(0, count, step):
            buf = np.empty(min(step, count - first), dtype)
            _pread_into(self._fd, buf, offset + first * dtype.itemsize, str(self.path))
            yield buf

    def read(self, key) -> np.ndarray:
        """The array spilled under ``key``, whole (for arrays needed at once, one at a time)."""
        if self._fd is None:
            raise ValueError(f"{self.path.name} is closed")
        offset, dtype, shape = self.index[key]
        out = np.empty(shape, dtype)
        _pread_into(self._fd, out, offset, str(self.path))
        return out

    def remove(self) -> None:
        self._close_and_remove()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def copy_pieces(path, start: int, end: int, chunk_bytes: int = CHUNK_BYTES):
    """Yield the bytes ``[start, end)`` of the file ``path`` in pieces of at most
    ``chunk_bytes``."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        pos = start
        while pos < end:
            buf = np.empty(min(chunk_bytes, end - pos), np.uint8)
            _pread_into(fd, buf, pos, os.fspath(path))
            yield buf
            pos += buf.size
    finally:
        os.close(fd)
