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
        return st.safe_open(str(path), framework=framework)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except st.SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


def _read_index(index: Path) -> dict[str, Path]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except FileNotFoundError:
        raise FileNotFoundError(f"{index}: no such file") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map' of tensor -> "
                              "shard file)") from None
    return {key: index.parent / name for key, name in weight_map.items()}


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
        self._handles: dict[Path, object] = {}
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
        held = {shard: set(h.keys()) for shard, h in self._handles.items()}
        for key, shard in weight_map.items():
            if key not in held[shard]:
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


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``{name: (array, code)}`` to one safetensors file.

    ``code`` is the safetensors dtype to store: a float array is cast to it ("BF16" via
    :func:`to_bfloat16_bits`; a uint16 array with code "BF16" is taken as bit patterns already);
    other arrays are stored as they are. ``metadata`` defaults to ``{"format": "pt"}``, which
    transformers and PEFT require to load the file.
    """
    st = _safetensors()
    keep, specs = [], {}
    for name, (arr, code) in tensors.items():
        if code == "BF16":
            arr = arr if arr.dtype == np.uint16 else to_bfloat16_bits(arr)
        elif code in ("F32", "F16", "F64") and arr.dtype.name == "bfloat16":
            arr = arr.astype(np.float32)  # exact; then cast once to the code below
        elif code in ("F32", "F16", "F64"):
            arr = np.asarray(arr, dtype=_NUMPY_NAMES[code])
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
        keep.append(arr)  # serialize_file reads the raw pointers: keep the buffers alive
        specs[name] = st.TensorSpec(dtype=_NUMPY_NAMES.get(code, arr.dtype.name), shape=arr.shape,
                                    data_ptr=arr.ctypes.data, data_len=arr.nbytes)
    st.serialize_file(specs, str(path), metadata={"format": "pt"} if metadata is None else metadata)
