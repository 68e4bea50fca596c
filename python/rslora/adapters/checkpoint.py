"""Reading and writing safetensors checkpoints one tensor at a time, weights widened to float32.

A checkpoint is a ``.safetensors`` file, a folder holding one or more of them, or a sharded model
(``model.safetensors.index.json`` with its ``weight_map``, or the folder that holds it). Files are
opened through ``safetensors.safe_open`` (memory-mapped, headers parsed by safetensors itself), so
reading a tensor costs that tensor's memory, not the model's.

NumPy has no bfloat16 of its own: ``ml_dtypes`` gives it one, which safetensors' NumPy reader
returns for BF16 tensors (widened to float32 exactly); BF16 is written as raw 16-bit patterns with
safetensors' own ``serialize_file``, rounded to nearest even as torch does. No torch needed.
"""

from __future__ import annotations

import json
from typing import Any
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["Checkpoint", "CheckpointError", "save_tensors", "FLOAT_CODES"]

#: safetensors dtype codes that hold floating-point weights rslora can widen to float32.
FLOAT_CODES = ("F64", "F32", "F16", "BF16")

# Output dtypes by name -> safetensors code.
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


class CheckpointError(ValueError):
    """A checkpoint or adapter file that cannot be used as asked (one-line message)."""


def _safetensors():
    try:
        import safetensors
    except ImportError as e:  # pragma: no cover - safetensors is in the cli extra
        raise ImportError("reading checkpoints needs safetensors: pip install 'rslora[cli]'") from e
    return safetensors


def _open(path: Path, framework: str = "numpy"):
    st = _safetensors()
    try:
        handle = st.safe_open(str(path), framework=framework)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except st.SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({_one_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    return _File(path, handle, _header(path)) if framework == "numpy" else handle


def _one_line(e) -> str:
    return " ".join(str(e).split())


# -- the header, checked beyond what safetensors checks ---------------------------------------------
#: Bytes per element of the codes a tensor can be read as.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100_000_000  # safetensors' own limit


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise CheckpointError(f"tensor or field {k!r} appears twice in the header")
        d[k] = v
    return d


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path`` (a config or an index), strictly: a key written twice is an
    error, since Python's json would silently keep the last value and other readers may not."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {str(e).replace(' in the header', '')}") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _header(path: Path) -> dict:
    """``{name: (code, shape, start, end)}`` with absolute file offsets, after checks that
    safetensors leaves out: a name given twice (JSON keeps the last silently), and every byte
    range against the file's real size."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header length {n} does not fit in the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({_one_line(e)})") from None
    base, out, ranges = 8 + n, {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            count = math.prod(shape)
            ok = all(type(v) is int and v >= 0 for v in (*shape, start, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or not start <= end <= size - base:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed entry or a byte range "
                                  f"outside the file")
        if code in _ITEMSIZE and count * _ITEMSIZE[code] != end - start:
            raise CheckpointError(f"{path}: tensor {name!r} is {code} {list(shape)} "
                                  f"({count * _ITEMSIZE[code]} bytes) but holds {end - start} bytes")
        ranges.append((start, end, name))
        out[name] = (code, shape, base + start, base + end)
    ranges.sort()
    for (s0, e0, a), (s1, e1, b) in zip(ranges, ranges[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the file")
    return out


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class _File:
    """A safetensors file open for reading: safetensors' handle for the header, and tensors read
    straight from the file into one new, writable array (memory-mapped reads through safetensors
    cost two copies: a 1 GiB tensor took 2 GiB)."""

    def __init__(self, path: Path, handle, header: dict):
        self.path, self._handle, self._header = path, handle, header
        # One descriptor for the file's life: reads see the file whose header was checked, even if
        # the path is replaced meanwhile. A raw descriptor: nothing to warn about if never closed.
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def __del__(self):
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, key):
        return self._handle.get_slice(key)

    def metadata(self):
        return self._handle.metadata()

    def get_tensor(self, key):
        code, shape, start, end = self._header[key]
        dtype = _numpy_dtype(code)
        if dtype is None:  # not a NumPy dtype here: safetensors says so (TypeError)
            return self._handle.get_tensor(key)
        avail = _available_memory()
        if avail is not None and end - start > avail:
            raise CheckpointError(f"{self.path}: tensor {key!r} needs {(end - start) / 2**30:.2f} "
                                  f"GiB of memory, more than the {avail / 2**30:.2f} GiB available")
        arr = np.empty(math.prod(shape), dtype=dtype)
        buf, pos = memoryview(arr.view(np.uint8)), 0
        while pos < len(buf):
            got = os.preadv(self._fd, [buf[pos: pos + (1 << 30)]], start + pos)
            if got <= 0:
                raise CheckpointError(f"{self.path}: tensor {key!r}: the file is shorter than its "
                                      f"header says (read {pos} of {end - start} bytes)")
            pos += got
        return arr.reshape(shape)


def _numpy_dtype(code: str):
    if code == "BF16":
        try:
            import ml_dtypes
        except ImportError:
            return None
        return np.dtype(ml_dtypes.bfloat16)
    name = _NUMPY_NAMES.get(code)
    return None if name is None else np.dtype("<" + np.dtype(name).str[1:])  # files are little-endian


def _read_index(index: Path) -> dict[str, Path]:
    try:
        data = json.loads(index.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except FileNotFoundError:
        raise FileNotFoundError(f"{index}: no such file") from None
    except CheckpointError as e:
        raise CheckpointError(f"{index}: {e}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map' of tensor -> "
                              "shard file)") from None
    return {key: _shard_path(index, name) for key, name in weight_map.items()}


def _shard_path(index: Path, name) -> Path:
    """The shard ``name`` of ``index``: a plain ``*.safetensors`` file name in the index's folder
    (no folder part, no ``..``, not absolute, no symbolic link leading out of the folder), so
    that a merge writes every shard under a name of its own."""
    if not (isinstance(name, str) and name.endswith(".safetensors") and "/" not in name
            and "\\" not in name and "\0" not in name):
        raise CheckpointError(f"{index}: shard {name!r} is not a .safetensors file name in the "
                              "index's folder")
    folder = index.parent
    real = Path(os.path.realpath(folder / name))
    # A link may lead next to the index's own target: the Hugging Face cache links every file
    # of a snapshot to blobs/ (snapshots/REV/model.safetensors -> ../../blobs/HASH).
    if real.parent not in (Path(os.path.realpath(folder)), Path(os.path.realpath(index)).parent):
        raise CheckpointError(f"{index}: shard {name!r} resolves to {real}, outside {folder}")
    return folder / name


class Checkpoint:
    """A safetensors checkpoint, read lazily.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.safetensors`` file; an index ``*.safetensors.index.json``; or a folder holding an
        index, or else its ``*.safetensors`` files (a tensor may appear in only one of them).

    Notes
    -----
    Every file is opened (headers only, memory-mapped) when the checkpoint is opened, so a
    missing shard, a corrupt header or an index naming a tensor its shard lacks is reported
    before any work starts. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path):
        self.path = Path(os.fspath(path))
        self._where: dict[str, Path] = {}  # tensor -> file
        self._handles: dict[Path, Any] = {}  # safetensors safe_open handles
        p = self.path
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        if p.is_dir():
            indexes = sorted(p.glob("*.safetensors.index.json"))
            if len(indexes) > 1:
                raise CheckpointError(f"{p}: several index files ({', '.join(i.name for i in indexes)}); "
                                      "pass the one to use")
            files = sorted(p.glob("*.safetensors"))
            if indexes:
                self._load_index(indexes[0])
            elif files:
                self._load_files(files)
            else:
                raise CheckpointError(f"{p}: folder holds no .safetensors file")
        elif p.name.endswith(".json"):
            self._load_index(p)
        else:
            self._load_files([p])

    def _load_files(self, files) -> None:
        for f in files:
            h = self._handles[f] = _open(f)
            for key in h.keys():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} is in both {self._where[key]} and {f}")
                self._where[key] = f

    def _load_index(self, index: Path) -> None:
        weight_map = _read_index(index)
        for shard in sorted(set(weight_map.values())):
            if not shard.is_file():
                held = [k for k, v in weight_map.items() if v == shard]
                raise CheckpointError(f"{index}: shard {shard.name} is missing (it holds "
                                      f"{len(held)} tensor(s), e.g. {held[0]!r})")
            self._handles[shard] = _open(shard)
        present = {shard: set(h.keys()) for shard, h in self._handles.items()}
        for key, shard in weight_map.items():
            if key not in present[shard]:
                raise CheckpointError(f"{index}: tensor {key!r} is mapped to {shard.name}, "
                                      "which does not hold it")
            self._where[key] = shard

    # -- what is in it -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def file_of(self, key: str) -> Path:
        """The file holding ``key``."""
        return self._where[self._check(key)]

    def files(self) -> list[Path]:
        """The safetensors files, in order."""
        return list(self._handles)

    def _check(self, key: str) -> str:
        if key not in self._where:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        return key

    def dtype(self, key: str) -> str:
        """The safetensors dtype code of ``key`` ("F32", "BF16", "I64", ...)."""
        return self._handles[self.file_of(key)].get_slice(key).get_dtype()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of(key)].get_slice(key).get_shape())

    # -- reading -------------------------------------------------------------------------------
    def read(self, key: str) -> np.ndarray:
        """``key`` as a new, writable float32 array (F64/F32/F16/BF16 widened or rounded to
        float32). Non-float tensors raise :class:`CheckpointError`."""
        code = self.dtype(key)
        if code not in FLOAT_CODES:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} is {code}, not a float "
                                  "tensor (float16/bfloat16/float32/float64)")
        arr = self._get(key, code)
        if arr.dtype != np.float32 or not arr.flags.writeable:
            arr = arr.astype(np.float32)
        return arr

    def read_raw(self, key: str) -> tuple[np.ndarray, str]:
        """``key`` in its stored dtype, with its code. BF16 comes back as its uint16 bit patterns."""
        code = self.dtype(key)
        arr = self._get(key, code)
        return (arr.view(np.uint16) if code == "BF16" else arr), code

    def _get(self, key: str, code: str) -> np.ndarray:
        if code == "BF16":
            try:
                import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy for safetensors)
            except ImportError:
                raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} is bfloat16; reading "
                                      "it needs ml_dtypes (pip install 'rslora[cli]')") from None
        try:
            return self._handles[self.file_of(key)].get_tensor(key)
        except TypeError:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} has dtype {code}, which "
                                  "NumPy cannot hold") from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors in {len(self._handles)} file(s))"


# -- writing -----------------------------------------------------------------------------------
def to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even (ml_dtypes' cast, as
    torch's); NaN stays NaN. Wider inputs are rounded once, straight to bfloat16."""
    import ml_dtypes

    return np.ascontiguousarray(np.asarray(a).astype(ml_dtypes.bfloat16)).view(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


_NUMPY_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
                "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}


def stored_array(arr: np.ndarray, code: str) -> np.ndarray:
    """``arr`` as the contiguous little-endian array whose bytes are stored for safetensors dtype
    ``code``: a float array cast to it ("BF16" via :func:`to_bfloat16_bits`; a uint16 array with
    code "BF16" is taken as bit patterns already); other arrays as they are. Element by element,
    so any slice of ``arr`` converts to the same bytes as that slice of the whole."""
    if code == "BF16":
        arr = arr if arr.dtype == np.uint16 else to_bfloat16_bits(arr)
    elif code in ("F32", "F16", "F64") and arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)  # exact; then cast once to the code below
    if code in ("F32", "F16", "F64"):
        arr = np.asarray(arr, dtype=_NUMPY_NAMES[code])
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
    return arr


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``{name: (array, code)}`` to one safetensors file.

    ``code`` is the safetensors dtype to store (see :func:`stored_array`). ``metadata`` defaults
    to ``{"format": "pt"}``, which transformers and PEFT require to load the file.
    """
    st = _safetensors()
    keep, specs = [], {}
    for name, (arr, code) in tensors.items():
        arr = stored_array(arr, code)
        keep.append(arr)  # serialize_file reads the raw pointers: keep the buffers alive
        specs[name] = st.TensorSpec(dtype=_NUMPY_NAMES.get(code, arr.dtype.name), shape=arr.shape,
                                    data_ptr=arr.ctypes.data, data_len=arr.nbytes)
    st.serialize_file(specs, str(path), metadata={"format": "pt"} if metadata is None else metadata)
