"""Every reader against broken files: safetensors (single and sharded), the index, the adapter's
config and weights. Each bad file must give one CheckpointError (a ValueError) with a one-line
message, and the command line exit 2 with one line: never a traceback, a crash or a hang.

Fuzzed cases run a few hundred examples by default; RSLORA_FUZZ_EXAMPLES=N runs N.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rslora
import rslora.cli
from rslora.adapters import checkpoint as ckmod
from rslora.adapters.checkpoint import Checkpoint, CheckpointError
from rslora.adapters.lora_config import validate
from safetensors.numpy import save_file

EXAMPLES = int(os.environ.get("RSLORA_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def raw_file(header, data=b"", raw=None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def F32(shape, start, end):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [start, end]}


def read_all(path):
    with Checkpoint(path) as ck:
        return {k: ck.read_raw(k)[0] for k in ck.keys()}


def assert_one_line(e: BaseException):
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg


def cli_fails(capsys, argv):
    rc = rslora.cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# -- one safetensors file ----------------------------------------------------------------------------

BAD_FILES = {
    "truncated data": raw_file({"a": F32([2], 0, 8)}, b"\0" * 4),
    "trailing bytes": raw_file({"a": F32([2], 0, 8)}, b"\0" * 12),
    "header length past the end": struct.pack("<Q", 1000) + b"{}",
    "header length 2**63": struct.pack("<Q", 2**63) + b"{}",
    "header length 0": struct.pack("<Q", 0),
    "no header length": b"\x01\x00",
    "empty file": b"",
    "header not JSON": raw_file(None, raw=b"{nope"),
    "header a JSON list": raw_file(None, raw=b"[1, 2]"),
    "header not UTF-8": raw_file(None, raw=b'{"\xff\xfe": 1}'),
    "tensor name not UTF-8": raw_file(None, b"\0" * 8,
                                      raw=b'{"a\xc3": {"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
    "offsets past the end": raw_file({"a": F32([4], 0, 16)}, b"\0" * 8),
    "offsets reversed": raw_file({"a": F32([0], 8, 0)}, b"\0" * 8),
    "offsets overlap": raw_file({"a": F32([2], 0, 8), "b": F32([2], 0, 8)}, b"\0" * 8),
    "offsets leave a gap": raw_file({"a": F32([1], 4, 8)}, b"\0" * 8),
    "shape and byte count disagree": raw_file({"a": F32([3], 0, 8)}, b"\0" * 8),
    "dtype and byte count disagree": raw_file({"a": {"dtype": "F64", "shape": [2],
                                                     "data_offsets": [0, 8]}}, b"\0" * 8),
    "unknown dtype": raw_file({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "negative shape": raw_file({"a": F32([-2], 0, 8)}, b"\0" * 8),
    "float shape": raw_file({"a": F32([2.0], 0, 8)}, b"\0" * 8),
    "shape overflows": raw_file({"a": F32([2**40, 2**40], 0, 8)}, b"\0" * 8),
    "missing data_offsets": raw_file({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
    "duplicate tensor name": raw_file(None, b"\0" * 8, raw=b'{"a": {"dtype":"F32","shape":[2],'
                                      b'"data_offsets":[0,8]}, "a": {"dtype":"F32","shape":[2],'
                                      b'"data_offsets":[0,8]}}'),
    "metadata not strings": raw_file({"__metadata__": {"a": 1}}),
    "deeply nested header": raw_file(None, raw=b"[" * 100000 + b"]" * 100000),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_safetensors_file(tmp_path, capsys, case):
    p = tmp_path / "model.safetensors"
    p.write_bytes(BAD_FILES[case])
    with pytest.raises(CheckpointError) as e:
        read_all(p)
    assert_one_line(e.value)
    assert str(p) in str(e.value)
    err = cli_fails(capsys, ["merge", str(p), str(adapter_folder(tmp_path)), "-o", str(tmp_path / "o")])
    assert "model.safetensors" in err and not (tmp_path / "o").exists()


def good_file(tmp_path) -> bytes:
    rng = np.random.default_rng(0)
    save_file({"w": rng.standard_normal((3, 4)).astype(np.float32),
               "b": rng.standard_normal(5).astype(np.float16),
               "i": np.arange(3, dtype=np.int64)}, tmp_path / "good.safetensors")
    return (tmp_path / "good.safetensors").read_bytes()


def test_every_truncation_is_an_error(tmp_path):
    data = good_file(tmp_path)
    p = tmp_path / "t.safetensors"
    for n in range(len(data)):
        p.write_bytes(data[:n])
        with pytest.raises(CheckpointError) as e:
            read_all(p)
        assert_one_line(e.value)


@FUZZ
@given(st.data())
def test_random_corruption_reads_or_fails_cleanly(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("fuzz")
    good = good_file(tmp)
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    p = tmp / "f.safetensors"
    p.write_bytes(bytes(raw))
    try:
        got = read_all(p)
    except CheckpointError as e:
        assert_one_line(e)
        return
    n = int.from_bytes(raw[:8], "little")
    for name, arr in got.items():  # what reads must be what the (checked) header says is there
        code, shape, start, end = ckmod._header(p)[name]
        assert arr.shape == tuple(shape) and arr.nbytes == end - start
        assert arr.tobytes() == bytes(raw[start:end]) and start >= 8 + n


# -- sharded checkpoints and their index ---------------------------------------------------------------

def sharded(tmp_path, weight_map=None, index_text=None):
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    save_file({"a.weight": rng.standard_normal((8, 6)).astype(np.float32)},
              d / "model-00001-of-00002.safetensors")
    save_file({"b.weight": rng.standard_normal((8, 6)).astype(np.float32)},
              d / "model-00002-of-00002.safetensors")
    wm = weight_map or {"a.weight": "model-00001-of-00002.safetensors",
                        "b.weight": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(
        index_text if index_text is not None else json.dumps({"weight_map": wm}))
    return d


def adapter_folder(tmp_path, module="a", d_in=6, d_out=8, cfg=None, name="ad"):
    out = tmp_path / name
    if not out.exists():
        rng = np.random.default_rng(2)
        rslora.save_adapter(out, {module: (rng.standard_normal((2, d_in)).astype(np.float32),
                                           rng.standard_normal((d_out, 2)).astype(np.float32))},
                            alpha=4)
    if cfg:
        c = json.loads((out / "adapter_config.json").read_text())
        c.update(cfg)
        (out / "adapter_config.json").write_text(json.dumps(c))
    return out


def outside_shard(tmp_path):
    (tmp_path / "outside").mkdir(exist_ok=True)
    save_file({"b.weight": np.full((8, 6), 7, np.float32)}, tmp_path / "outside" / "x.safetensors")
    return tmp_path / "outside" / "x.safetensors"


BAD_INDEXES = {
    "not JSON": dict(index_text="{"),
    "not UTF-8": dict(index_text="\udcff"),
    "no weight_map": dict(index_text='{"metadata": {}}'),
    "weight_map a list": dict(index_text='{"weight_map": ["a"]}'),
    "a JSON string": dict(index_text='"x"'),
    "shard name not a string": dict(weight_map={"a.weight": 3}),
    "duplicate key": dict(index_text='{"weight_map": {"a.weight": "model-00001-of-00002.safetensors",'
                                     ' "a.weight": "model-00002-of-00002.safetensors"}}'),
    "parent traversal (item 7)": dict(weight_map={"a.weight": "model-00001-of-00002.safetensors",
                                                  "b.weight": "../outside/x.safetensors"}),
    "absolute path (item 7)": dict(weight_map={"a.weight": "model-00001-of-00002.safetensors",
                                               "b.weight": "ABSOLUTE"}),
    "a subfolder (item 6)": dict(weight_map={"a.weight": "a/model.safetensors",
                                             "b.weight": "b/model.safetensors"}),
    "shard named like the index (item 6)": dict(
        weight_map={"a.weight": "model-00001-of-00002.safetensors",
                    "b.weight": "model.safetensors.index.json"}),
    "missing shard": dict(weight_map={"a.weight": "model-00001-of-00002.safetensors",
                                      "b.weight": "model-00003-of-00002.safetensors"}),
    "shard without the tensor": dict(weight_map={"a.weight": "model-00002-of-00002.safetensors",
                                                 "b.weight": "model-00002-of-00002.safetensors"}),
}


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_bad_index(tmp_path, capsys, case):
    kw = dict(BAD_INDEXES[case])
    outside = outside_shard(tmp_path)
    if "weight_map" in kw:
        kw["weight_map"] = {k: (str(outside) if v == "ABSOLUTE" else v) for k, v in kw["weight_map"].items()}
    if kw.get("index_text") == "\udcff":
        d = sharded(tmp_path)
        (d / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff": 1}}')
    else:
        d = sharded(tmp_path, **kw)
    if "subfolder" in case:  # two shards with one base name in two folders
        for sub, key in (("a", "a.weight"), ("b", "b.weight")):
            (d / sub).mkdir()
            save_file({key: np.ones((8, 6), np.float32)}, d / sub / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        read_all(d)
    assert_one_line(e.value)
    ad = adapter_folder(tmp_path)
    cli_fails(capsys, ["merge", str(d), str(ad), "-o", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()  # nothing copied from outside, nothing half-written
    assert sorted(os.listdir(tmp_path)) == ["ad", "model", "outside"]


def test_symlink_escaping_the_folder_is_refused(tmp_path, capsys):
    outside = outside_shard(tmp_path)
    d = sharded(tmp_path)
    os.remove(d / "model-00002-of-00002.safetensors")
    os.symlink(outside, d / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="outside"):
        read_all(d)


def test_hugging_face_cache_layout_is_accepted(tmp_path):
    """snapshots/REV/* are links into blobs/: allowed, as they lead next to the index's target."""
    src = sharded(tmp_path)
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(src))):
        os.rename(src / f, blobs / f"hash{i}")
        os.symlink(f"../../blobs/hash{i}", snap / f)
    got = read_all(snap)
    assert sorted(got) == ["a.weight", "b.weight"]


def test_valid_sharded_merge_still_works(tmp_path):
    d = sharded(tmp_path)
    ad = adapter_folder(tmp_path)
    assert rslora.cli.main(["merge", str(d), str(ad), "-o", str(tmp_path / "m"), "-q"]) == 0
    assert "model-00001-of-00002.safetensors" in os.listdir(tmp_path / "m")


# -- adapter_config.json -----------------------------------------------------------------------------

BAD_CONFIGS = {
    "lora_alpha 1e308 overflows (item 9)": ({"lora_alpha": 1e308}, "overflows float32"),
    "lora_alpha 1e38 overflows the update": ({"lora_alpha": 1e38}, "overflows float32"),
    "lora_alpha NaN": ({"lora_alpha": float("nan")}, "lora_alpha is nan"),
    "lora_alpha Infinity": ({"lora_alpha": float("inf")}, "lora_alpha is inf"),
    "lora_alpha a string": ({"lora_alpha": "4"}, "lora_alpha is '4'"),
    "r 2.5": ({"r": 2.5}, "r is 2.5; PEFT's LoraConfig takes a positive integer"),
    "r null": ({"r": None}, "r is None"),
    "r 0": ({"r": 0}, "r is 0"),
    "r true": ({"r": True}, "r is True"),
    "r missing": ({"r": "DELETE"}, "missing 'r'"),
    "use_rslora a string": ({"use_rslora": "false"}, "use_rslora is 'false'"),
    "fan_in_fan_out 1": ({"fan_in_fan_out": 1}, "fan_in_fan_out is 1"),
    "bias bogus": ({"bias": "some"}, "bias is 'some'"),
    "rank_pattern a list": ({"rank_pattern": ["a"]}, "rank_pattern is ['a']"),
    "rank_pattern bad regex": ({"rank_pattern": {"(": 2}}, "rank_pattern key '('"),
    "rank_pattern rank 2.0": ({"rank_pattern": {"a": 2.0}}, "rank_pattern['a'] is 2.0"),
    "alpha_pattern NaN": ({"alpha_pattern": {"a": float("nan")}}, "alpha_pattern['a'] is nan"),
    "target_modules a number": ({"target_modules": 3}, "target_modules is 3"),
    "target_modules bad regex": ({"target_modules": "a("}, "target_modules is not a valid"),
    "lora_dropout 2": ({"lora_dropout": 2}, "lora_dropout is 2"),
    "use_dora a string": ({"use_dora": "no"}, "use_dora is 'no'"),
    "peft_type a number": ({"peft_type": 5}, "peft_type is 5"),
    "layers_to_transform negative": ({"layers_to_transform": [-1]}, "layers_to_transform is [-1]"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_adapter_config(tmp_path, capsys, case):
    cfg, msg = BAD_CONFIGS[case]
    ad = adapter_folder(tmp_path)
    c = json.loads((ad / "adapter_config.json").read_text())
    c.update({k: v for k, v in cfg.items() if v != "DELETE"})
    for k in [k for k, v in cfg.items() if v == "DELETE"]:
        del c[k]
    (ad / "adapter_config.json").write_text(json.dumps(c))  # NaN/Infinity as Python's json writes
    with pytest.raises(CheckpointError) as e:
        rslora.load_adapter(ad)
    assert_one_line(e.value)
    assert msg in str(e.value), str(e.value)
    d = sharded(tmp_path)
    err = cli_fails(capsys, ["merge", str(d), str(ad), "-o", str(tmp_path / "m")])
    assert msg in err and not (tmp_path / "m").exists()


def test_valid_values_still_load(tmp_path):
    ad = adapter_folder(tmp_path, cfg={"lora_alpha": 1e4, "use_rslora": False, "r": 2,
                                       "rank_pattern": {"a": 2}, "alpha_pattern": {"a": 3},
                                       "target_modules": ["a"], "lora_dropout": 0.1})
    m = rslora.load_adapter(ad)["a"]
    assert m.alpha == 3 and m.scale == 1.5


@pytest.mark.parametrize("key", ["(a+)+", "(a|aa)+", "(a|a)+$", "((a+)+)+b"])
def test_catastrophic_backtracking_key_does_not_stall(tmp_path, key):
    """Python's re takes minutes on these against 40 a's and a '!'; the match is time-bounded:
    the key either matches as PEFT's rule says or is refused with one line, within seconds."""
    name = "a" * 40 + "!"
    ad = adapter_folder(tmp_path, module=name, cfg={"rank_pattern": {key: 3}})
    t0 = time.perf_counter()
    try:
        rslora.load_adapter(ad)  # no key matches '...!': the config's r = 2 applies
    except CheckpointError as e:
        assert "catastrophic backtracking" in str(e) and key in str(e)
        assert_one_line(e)
    assert time.perf_counter() - t0 < 15


def test_regex_pattern_keys_match_as_in_peft(tmp_path):
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key

    from rslora.adapters.lora_config import pattern_key

    keys = [r"layers\.\d+\.q", "v", "model.layers.1.k", r"(k|o)_proj", "q"]
    for module in ["model.layers.3.q", "model.layers.1.k", "x.v", "x.k_proj", "x.o_proj", "q",
                   "xq", "model.layers.1.kk", "a.b"]:
        ours = pattern_key(keys, module)
        theirs = get_pattern_key(keys, module)
        assert (ours if ours is not None else module) == theirs, module
    ad = adapter_folder(tmp_path, module="model.layers.3.q", cfg={"r": 4, "rank_pattern": {r"layers\.\d+\.q": 2}})
    assert rslora.load_adapter(ad)["model.layers.3.q"].r == 2


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
FIELDS = ["r", "lora_alpha", "use_rslora", "fan_in_fan_out", "bias", "rank_pattern", "alpha_pattern",
          "target_modules", "peft_type", "use_dora", "lora_dropout", "modules_to_save",
          "layers_to_transform", "init_lora_weights", "layer_replication"]


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), JSONISH, min_size=1, max_size=4))
def test_fuzzed_configs_validate_or_fail_cleanly(fields):
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **fields}
    try:
        validate(cfg, "adapter_config.json")
    except CheckpointError as e:
        assert_one_line(e)
        return
    # what passes is what PEFT's LoraConfig declares
    assert type(cfg["r"]) is int and cfg["r"] > 0
    assert type(cfg["lora_alpha"]) in (int, float) and math.isfinite(cfg["lora_alpha"])
    for k in ("use_rslora", "fan_in_fan_out", "use_dora"):
        assert k not in cfg or type(cfg[k]) is bool
    for k in ("rank_pattern", "alpha_pattern"):
        assert cfg.get(k) is None or isinstance(cfg[k], dict)


@settings(max_examples=max(20, EXAMPLES // 10), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(FIELDS), JSONISH, min_size=1, max_size=3))
def test_fuzzed_configs_through_the_loader(tmp_path_factory, fields):
    ad = adapter_folder(tmp_path_factory.mktemp("cfg"))
    c = json.loads((ad / "adapter_config.json").read_text())
    c.update(fields)
    (ad / "adapter_config.json").write_text(json.dumps(c))
    try:
        m = rslora.load_adapter(ad)
    except (CheckpointError, FileNotFoundError) as e:
        assert_one_line(e)
        return
    for mod in m.modules.values():
        assert math.isfinite(mod.scale) and type(mod.r) is int


# -- adapter weights ---------------------------------------------------------------------------------

def test_bad_adapter_weights(tmp_path, capsys):
    ad = adapter_folder(tmp_path)
    good = (ad / "adapter_model.safetensors").read_bytes()
    for bad in (good[:-3], good[:20], b"", raw_file(None, raw=b"{nope")):
        (ad / "adapter_model.safetensors").write_bytes(bad)
        with pytest.raises(CheckpointError) as e:
            rslora.load_adapter(ad)
        assert_one_line(e.value)
    # NaN in a factor: refused rather than merged into NaN weights
    A = np.ones((2, 6), np.float32)
    A[0, 0] = np.nan
    save_file({"base_model.model.a.lora_A.weight": A,
               "base_model.model.a.lora_B.weight": np.ones((8, 2), np.float32)},
              ad / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        rslora.load_adapter(ad)


def sparse_adapter(folder, n_mib):
    """An adapter whose lora_B is ``n_mib`` MiB of zeros left as a hole in the file."""
    folder.mkdir()
    r, d_in = 2, 8
    d_out = n_mib * 2**20 // (4 * r)
    header = {"base_model.model.a.lora_A.weight": F32([r, d_in], 0, 4 * r * d_in),
              "base_model.model.a.lora_B.weight": F32([d_out, r], 4 * r * d_in, 4 * r * d_in + 4 * d_out * r),
              "__metadata__": {"format": "pt"}}
    h = json.dumps(header).encode()
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + np.ones(r * d_in, np.float32).tobytes())
        f.truncate(8 + len(h) + 4 * r * d_in + 4 * d_out * r)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 4}))


def test_sparse_adapter_loads_in_one_copy_of_memory(tmp_path):
    """Item 10: a 1 GiB sparse adapter took 2.1 GB; tensors are now read straight into one array."""
    sparse_adapter(tmp_path / "ad", 128)
    code = ("import resource, rslora; a = rslora.load_adapter({!r}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, a['a'].B.nbytes)")
    base = subprocess.run([sys.executable, "-c", "import resource, rslora; "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                          capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", code.format(str(tmp_path / "ad"))],
                         capture_output=True, text=True, check=True)
    peak_kib, nbytes = map(int, out.stdout.split())
    extra = peak_kib * 1024 - int(base.stdout) * 1024
    assert nbytes == 128 * 2**20
    assert extra < 1.4 * nbytes, (extra / nbytes)


def test_tensor_larger_than_memory_is_refused(tmp_path, monkeypatch):
    sparse_adapter(tmp_path / "ad", 4)
    monkeypatch.setattr(ckmod, "_available_memory", lambda: 2**20)
    with pytest.raises(CheckpointError, match="GiB of memory") as e:
        rslora.load_adapter(tmp_path / "ad")
    assert_one_line(e.value)


# -- item 10: --max-rank on layers smaller than it ----------------------------------------------------

def test_max_rank_is_capped_per_layer(tmp_path):
    rng = np.random.default_rng(3)
    base = {f"l{i}.weight": rng.standard_normal(s).astype(np.float32)
            for i, s in enumerate([(16, 12), (40, 24)])}
    tuned = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    assert rslora.cli.main(["extract", str(tmp_path / "base.safetensors"),
                            str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "ad"),
                            "--tol", "0.05", "--max-rank", "256", "-q"]) == 0
    ad = rslora.load_adapter(tmp_path / "ad")
    assert ad["l0"].r <= 12 and ad["l1"].r <= 24
    mode = os.stat(tmp_path / "ad" / "adapter_model.safetensors").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # item 10: not 0600


@pytest.mark.parametrize("text,msg", [
    (b"{", "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    (b'{"r": 2, "lora_alpha": 4, "\xff": 1}', "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"r": 2, "lora_alpha": NaN}', "lora_alpha is nan"),
    (b'{"r": 2, "lora_alpha": -Infinity}', "lora_alpha is -inf"),
    (b'{"r": 1e400, "lora_alpha": 4}', "r is inf"),
    # json keeps the last of two values silently: which r would a server use? Refused, named.
    (b'{"r": 2, "lora_alpha": 4, "r": 8}', "'r' appears twice"),
    (b'{"r": 2, "lora_alpha": 4, "rank_pattern": {"a": 1, "a": 3}}', "'a' appears twice"),
], ids=["truncated", "nested-100000-deep", "not-utf8", "a-list", "alpha-NaN", "alpha-minus-inf",
        "r-1e400", "r-twice", "pattern-key-twice"])
def test_unparsable_adapter_config(tmp_path, text, msg):
    ad = adapter_folder(tmp_path)
    (ad / "adapter_config.json").write_bytes(text)
    with pytest.raises(CheckpointError) as e:
        rslora.load_adapter(ad)
    assert_one_line(e.value)
    assert msg in str(e.value)


def test_model_config_with_a_key_twice_is_refused(tmp_path):
    """config.json decides a folder's layout (GPT-2 Conv1D, tied embeddings): a key written
    twice is refused with its name rather than read as whichever value json keeps."""
    from rslora.adapters.layouts import model_config

    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "model_type": "llama"}')
    with pytest.raises(CheckpointError, match="'model_type' appears twice") as e:
        model_config(tmp_path)
    assert_one_line(e.value)
    (tmp_path / "config.json").write_text('["gpt2"]')
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        model_config(tmp_path)
