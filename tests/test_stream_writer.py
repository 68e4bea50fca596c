"""Streamed safetensors writing: :class:`TensorFile` / :class:`Spill`, and ``extract`` writing each
layer's factors as it arrives. Every file must be the one safetensors writes from all tensors at
once, byte for byte; memory must not grow with the number of layers; a failure or a kill
mid-write leaves the previous output and nothing else."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save, save_file
from testutil import CLI_MAIN, KILL_AT_THIRD_WRITE

import rslora
import rslora.adapters.extract as extract_mod
import rslora.adapters.parallel as parallel
from rslora.adapters.checkpoint import save_tensors
from rslora.adapters.peft_format import common_rank, write_adapter_files
from rslora.adapters.safetensors_stream import Spill, TensorFile, header_layout
from rslora.scaling import scale

CODES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
         "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
         "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}


def random_tensors(rng, n, codes=tuple(CODES)):
    names = ["w", "a.b", "z\u00e9\"q\\", "emb\n\x01", "x" * 40, "0", "A", "lora_B.weight"]
    out = {}
    for i in range(n):
        code = codes[rng.integers(len(codes))]
        shape = tuple(int(s) for s in rng.integers(0, 5, size=rng.integers(0, 4)))
        vals = np.asarray(rng.standard_normal(shape) * 100)
        out[f"{names[i % len(names)]}{i}"] = vals.astype(CODES[code]) if code != "BOOL" \
            else np.asarray(vals > 0)
    return out


def stream(path, tensors, order, metadata=None):
    with TensorFile(path, {k: (code_of(v), v.shape) for k, v in tensors.items()}, metadata) as f:
        for k in order:
            f.write(k, tensors[k])


def code_of(arr):
    return {np.dtype(v): k for k, v in CODES.items()}[arr.dtype]


@pytest.mark.parametrize("seed", range(6))
def test_tensor_file_is_what_safetensors_writes_in_any_order(tmp_path, seed):
    rng = np.random.default_rng(seed)
    tensors = random_tensors(rng, 1 + seed * 5)
    order = list(rng.permutation(list(tensors)))
    stream(tmp_path / "s.safetensors", tensors, order)
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(tmp_path / "s.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert back[k].tobytes() == v.tobytes()


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"k": "v\u00e9\x02"}])
def test_header_and_metadata_as_safetensors(metadata):
    tensors = {"b": np.zeros((2, 3), np.float16), "a": np.ones(5, np.float64)}
    ref = save(tensors, metadata=metadata)
    head, ranges = header_layout({k: (code_of(v), v.shape) for k, v in tensors.items()}, metadata)
    assert ref[: len(head)] == head and len(ref) == max(e for _, e in ranges.values())
    assert list(ranges) == ["a", "b"]  # F64 before F16, as serialize_file sorts
    assert save({}, metadata={"format": "pt"}) == header_layout({}, {"format": "pt"})[0]


@pytest.mark.parametrize("code", ["F32", "F16", "BF16"])
def test_casts_as_save_tensors(tmp_path, code):
    rng = np.random.default_rng(1)
    x = {"a": rng.standard_normal((7, 5)).astype(np.float32) * 1e3,
         "b": rng.standard_normal(9).astype(np.float32),
         "c": np.array([np.inf, -0.0, 1e-40, 65504.0, 6e-8, np.nan], np.float32)}
    save_tensors(tmp_path / "ref.safetensors", {k: (v, code) for k, v in x.items()})
    with TensorFile(tmp_path / "s.safetensors", {k: (code, v.shape) for k, v in x.items()}) as f:
        for k in ("c", "a", "b"):
            f.write(k, x[k])
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_tensor_file_refuses_and_removes_itself(tmp_path):
    specs = {"a": ("F32", (2, 2)), "b": ("F16", (3,))}
    p = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match="1 tensor\\(s\\) never written, e.g. 'b'"):
        with TensorFile(p, specs) as f:
            f.write("a", np.zeros((2, 2)))
    assert not p.exists()
    with pytest.raises(ValueError, match="has shape \\(2, 3\\), planned \\(2, 2\\)"):
        with TensorFile(p, specs) as f:
            f.write("a", np.zeros((2, 3)))
    assert not p.exists()
    with pytest.raises(ValueError, match="written twice"), TensorFile(p, specs) as f:
        f.write("a", np.zeros((2, 2)))
        f.write("a", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not in the plan"), TensorFile(p, specs) as f:
        f.write("c", np.zeros(1))
    with pytest.raises(ValueError, match="got 4 of its 6 bytes"), TensorFile(p, specs) as f:
        f.write_pieces("b", [np.zeros(2, np.float16)])
    assert not p.exists()
    p.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        TensorFile(p, specs)
    assert p.read_bytes() == b"keep"  # never replaced
    with pytest.raises(ValueError, match="dtype 'F8_E4M3' cannot be written"):
        TensorFile(tmp_path / "u.safetensors", {"x": ("F8_E4M3", (1,))})


def test_spill_pieces_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {k: rng.standard_normal(shape).astype(dt) for k, shape, dt in
              [("a", (13, 7), np.float32), ("b", (0, 3), np.float32), ("c", (101,), np.float16)]}
    with Spill(tmp_path / "spill") as s:
        for k, v in arrays.items():
            s.put(k, v.T if v.ndim == 2 else v)  # non-contiguous views are copied
        for k, v in arrays.items():
            want = (v.T if v.ndim == 2 else v).ravel()
            pieces = list(s.pieces(k, chunk_bytes=24))
            assert all(p.nbytes <= 24 for p in pieces)
            got = np.concatenate(pieces) if pieces else np.zeros(0, v.dtype)
            assert got.dtype == v.dtype and np.array_equal(got, want)
    assert not (tmp_path / "spill").exists()


# -- extract -----------------------------------------------------------------------------------
def decaying(rng, m, n, decay):
    k = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((U * decay ** np.arange(k)) @ V.T).astype(np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Layers of two widths (ranks capped differently), an unchanged layer, biases on kept and
    skipped modules, an embedding, a norm."""
    d = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    shapes = [(30, 20), (30, 20), (24, 36), (30, 26), (30, 26)]
    base, tuned = {}, {}
    for i, shape in enumerate(shapes):
        key = f"model.layers.{i}.proj"
        base[f"{key}.weight"] = rng.standard_normal(shape).astype(np.float32)
        tuned[f"{key}.weight"] = base[f"{key}.weight"] + (0 if i == 4 else
                                                          decaying(rng, *shape, 0.75))
        if i in (0, 4):
            base[f"{key}.bias"] = rng.standard_normal(shape[0]).astype(np.float32)
            tuned[f"{key}.bias"] = base[f"{key}.bias"] + 1
    base["model.embed_tokens.weight"] = rng.standard_normal((40, 12)).astype(np.float32)
    tuned["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + decaying(
        rng, 40, 12, 0.5)
    base["model.norm.weight"] = tuned["model.norm.weight"] = np.ones(4, np.float32)
    save_file(base, d / "base.safetensors")
    save_file(tuned, d / "tuned.safetensors")
    return d


class AllAtOnce:
    """The writer extract had before streaming: keep every layer's factors, then scale them by
    the adapter's alpha and write the whole file with ``write_adapter_files``."""

    def __init__(self, folder, plan, dtype, rule, alpha, full):
        self.folder, self.dtype, self.rule, self.alpha = folder, dtype, rule, alpha
        self.emb = {m for m, _, e, _ in plan if e}
        self.order = [m for m, *_ in plan]
        self.factors = {}
        self.ranks = {}

    def put(self, module, A, B):
        self.factors[module] = (A.copy(), B.copy())
        self.ranks[module] = A.shape[0]

    def finish(self, full):
        factors = {m: self.factors[m] for m in self.order if m in self.factors}
        ranks = {m: A.shape[0] for m, (A, B) in factors.items()}
        a = float(common_rank(ranks)) if self.alpha is None else float(self.alpha)
        for A, B in factors.values():
            root = np.float32(math.sqrt(scale(a, A.shape[0], self.rule)))
            A /= root
            B /= root
        write_adapter_files(self.folder, factors, {}, self.dtype, embeddings=self.emb,
                            full={k: read() for k, (_, read) in full.items()})
        os.remove(self.folder / "adapter_config.json")
        return ranks, a

    def discard_temporaries(self):
        pass


def run_extract(pair, out, **kw):
    kw.setdefault("progress", False)
    return rslora.extract_adapter(pair / "base.safetensors", pair / "tuned.safetensors", out, **kw)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


CASES = {
    "rank": dict(rank=6),  # every rank 6: factors written at their offsets, the skip compacts
    "rank-f16-standard": dict(rank=6, dtype="float16", rule="standard"),
    "rank-bf16-biases": dict(rank=6, dtype="bfloat16", biases=True),
    "capped": dict(rank=24),  # ranks 12, 20, 24: alpha from the common rank, after the skip
    "capped-alpha": dict(rank=24, alpha=3.0, biases=True),
    "tol": dict(tol=0.05),
    "tol-bf16-max": dict(tol=0.01, max_rank=9, dtype="bfloat16", biases=True),
    "tol-f16-alpha": dict(tol=0.05, alpha=2.0, dtype="float16"),
    "one-of-each": dict(rank=6, include="layers.[03]", biases=True),  # no skip: the preallocated file as is
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arrival", ["plan order", "reversed"])
def test_extract_streams_the_same_bytes(tmp_path, pair, monkeypatch, case, arrival):
    kw = CASES[case]
    if arrival == "reversed":
        run = parallel.run_items

        def reversed_items(client, fn, items, **k):
            yield from reversed(list(run(client, fn, items, **k)))

        monkeypatch.setattr(parallel, "run_items", reversed_items)
    res = run_extract(pair, tmp_path / "streamed", **kw)
    assert res.skipped == ({} if "include" in kw else {"model.layers.4.proj":
                                                       "unchanged (zero delta)"})
    monkeypatch.setattr(extract_mod, "FactorStream", AllAtOnce)
    ref = run_extract(pair, tmp_path / "whole", **kw)
    assert res.config == ref.config and res.layers == ref.layers
    got, want = files(tmp_path / "streamed"), files(tmp_path / "whole")
    assert got == want  # adapter_model.safetensors, adapter_config.json and the manifest
    if kw.get("biases"):
        assert "base_model.model.model.layers.4.proj.bias" in load_file(
            tmp_path / "streamed" / "adapter_model.safetensors")


def test_extract_keeps_a_few_layers_in_memory(tmp_path):
    """Peak traced memory (NumPy's allocations are traced) of extracting 4 and 16 layers: the
    same within a fraction of one layer's factors with the streaming writer; growing by the 12
    extra layers' factors with every factor kept (which shows the measure can tell)."""
    d, rank = 256, 64
    layer_factors = 2 * rank * d * 4

    def peak(layers, whole):
        folder = tmp_path / f"{layers}-{whole}"
        folder.mkdir()
        rng = np.random.default_rng(0)
        base = {f"layers.{i}.proj.weight": rng.standard_normal((d, d)).astype(np.float32)
                for i in range(layers)}
        tuned = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
        save_file(base, folder / "base.safetensors")
        save_file(tuned, folder / "tuned.safetensors")
        del base, tuned
        run_extract(folder, folder / "warm", rank=rank)  # imports, caches
        tracemalloc.start()
        try:
            run_extract(folder, folder / "out", rank=rank)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak(16, False) - peak(4, False) < layer_factors / 2
    mp = pytest.MonkeyPatch()
    mp.setattr(extract_mod, "FactorStream", AllAtOnce)
    try:
        assert peak(16, True) - peak(4, True) > 10 * layer_factors
    finally:
        mp.undo()


def test_failure_mid_stream_leaves_the_previous_output(tmp_path, pair, monkeypatch):
    out = tmp_path / "out"
    run_extract(pair, out, rank=4)
    before = files(out)
    calls = []
    real = rslora.lora_from_delta

    def fail_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(rslora, "lora_from_delta", fail_third)
    for kw in (dict(rank=6), dict(tol=0.05)):  # the preallocated file; the spill
        calls.clear()
        with pytest.raises(RuntimeError, match="boom"):
            run_extract(pair, out, force=True, **kw)
        assert files(out) == before
        assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("mode", [["--rank", "6"], ["--tol", "0.05"]])
def test_killed_mid_stream(tmp_path, pair, mode):
    out = tmp_path / "out"
    run_extract(pair, out, rank=4)
    before = files(out)
    args = ["extract", str(pair / "base.safetensors"), str(pair / "tuned.safetensors"), "-o",
            str(out), "-q", "--force", *mode]
    code = KILL_AT_THIRD_WRITE + CLI_MAIN
    env = {k: v for k, v in os.environ.items() if k != "RSLORA_CRASH_AT"}
    p = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                       text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert files(out) == before
    left = [n for n in os.listdir(tmp_path) if n != "out"]
    assert len(left) == 1 and left[0].startswith(".out.tmp-")  # the killed run's, complete or not
    assert any(n.startswith(".adapter_model") for n in os.listdir(tmp_path / left[0]))
    p = subprocess.run([sys.executable, "-c", CLI_MAIN, *args],
                       env=env, capture_output=True, text=True)  # cleans up, writes the new output
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"] and files(out) != before


# -- merge -------------------------------------------------------------------------------------
def merge_case(folder, layers, d=192, r=8):
    """A one-file model (float32 and bfloat16 weights, an int64 buffer) and a LoRA adapter."""
    rng = np.random.default_rng(1)
    model = {f"layers.{i}.proj.weight": (rng.standard_normal((d, d)).astype(np.float32),
                                         "BF16" if i % 2 else "F32") for i in range(layers)}
    model["position_ids"] = (np.arange(7, dtype=np.int64), "I64")
    save_tensors(folder / "model.safetensors", model)
    rslora.save_adapter(folder / "adapter", {
        f"layers.{i}.proj": (rng.standard_normal((r, d)).astype(np.float32),
                             rng.standard_normal((d, r)).astype(np.float32))
        for i in range(0, layers, 2)}, alpha=r)


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_merge_streams_the_bytes_safetensors_writes(tmp_path, dtype):
    merge_case(tmp_path, 3, d=16)
    out = rslora.merge_checkpoint(tmp_path / "model.safetensors", tmp_path / "adapter",
                                  tmp_path / "out", dtype=dtype)
    got = load_file(out / "model.safetensors")
    assert got["position_ids"].dtype == np.int64
    save_file(got, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_merge_keeps_a_tensor_in_memory_not_the_file(tmp_path):
    """A one-file model of 4 and of 16 weights: the peak traced memory of merging it does not
    grow with the file (it grew by every weight when the file was written at once)."""
    d = 192

    def peak(layers):
        folder = tmp_path / str(layers)
        folder.mkdir()
        merge_case(folder, layers, d)
        rslora.merge_checkpoint(folder / "model.safetensors", folder / "adapter", folder / "w")
        tracemalloc.start()
        try:
            rslora.merge_checkpoint(folder / "model.safetensors", folder / "adapter",
                                    folder / "out")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # the adapter (loaded whole, as merge does) grows by 6 modules x 2 x r x d floats: 74 KB
    assert peak(16) - peak(4) < 6 * 2 * 8 * d * 4 + d * d * 4 / 2
