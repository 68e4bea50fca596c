"""Checkpoint reading (single, sharded, float16/bfloat16), safetensors writing, adapter files,
atomic output folders, and merging from disk."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import rslora
from rslora.adapters.atomic import atomic_output_dir
from rslora.adapters.peft_format import pattern_key, peft_config
from rslora.adapters.checkpoint import from_bfloat16_bits, save_tensors, to_bfloat16_bits

from safetensors.numpy import save_file  # noqa: E402


def weights(seed=0, n=3, shape=(12, 8)):
    rng = np.random.default_rng(seed)
    w = {f"layers.{i}.proj.weight": rng.standard_normal(shape).astype(np.float32) for i in range(n)}
    w["norm.weight"] = rng.standard_normal(shape[1]).astype(np.float32)
    return w


def write_sharded(folder, tensors: dict, n_shards=2):
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::n_shards]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("layout", ["file", "folder", "sharded-folder", "index"])
def test_checkpoint_layouts(tmp_path, layout):
    w = weights()
    if layout in ("file", "folder"):
        save_file(w, tmp_path / "model.safetensors")
        path = tmp_path / "model.safetensors" if layout == "file" else tmp_path
    else:
        write_sharded(tmp_path, w, 3)
        path = tmp_path if layout == "sharded-folder" else tmp_path / "model.safetensors.index.json"
    with rslora.Checkpoint(path) as ck:
        assert sorted(ck.keys()) == sorted(w) and len(ck) == len(w)
        for k, v in w.items():
            assert ck.dtype(k) == "F32" and ck.shape(k) == v.shape
            got = ck.read(k)
            np.testing.assert_array_equal(got, v)
            assert got.dtype == np.float32 and got.flags.writeable
        assert len(ck.files()) == (1 if layout in ("file", "folder") else 3)


def test_half_and_bfloat16_widen_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    t = torch.randn(9, 7, generator=torch.Generator().manual_seed(0)) * 100
    torch_save({"b": t.bfloat16(), "h": t.half(), "d": t.double(), "i": torch.arange(4)},
               tmp_path / "m.safetensors")
    with rslora.Checkpoint(tmp_path / "m.safetensors") as ck:
        assert [ck.dtype(k) for k in "bhdi"] == ["BF16", "F16", "F64", "I64"]
        np.testing.assert_array_equal(ck.read("b"), t.bfloat16().float().numpy())
        np.testing.assert_array_equal(ck.read("h"), t.half().float().numpy())
        np.testing.assert_array_equal(ck.read("d"), t.double().numpy().astype(np.float32))
        bits, code = ck.read_raw("b")
        assert code == "BF16" and bits.dtype == np.uint16
        np.testing.assert_array_equal(from_bfloat16_bits(bits), t.bfloat16().float().numpy())
        with pytest.raises(rslora.CheckpointError, match=r"tensor 'i' is I64, not a float"):
            ck.read("i")


def test_bfloat16_without_torch(tmp_path, monkeypatch):
    x = np.array([[1.0, -2.5], [3.0e-3, 65504.0]], np.float32)  # all exact in bfloat16
    save_tensors(tmp_path / "m.safetensors", {"w": (x, "BF16")})
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with rslora.Checkpoint(tmp_path / "m.safetensors") as ck:
        np.testing.assert_array_equal(ck.read("w"), from_bfloat16_bits(to_bfloat16_bits(x)))
        assert ck.read_raw("w")[0].dtype == np.uint16
        monkeypatch.setitem(__import__("sys").modules, "ml_dtypes", None)
        with pytest.raises(rslora.CheckpointError, match="bfloat16.*needs ml_dtypes"):
            ck.read("w")


def test_bfloat16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(5000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 5000),
        np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, -3.3895314e38, 1e-40, 1.0 + 2**-8,
                  1.0 + 3 * 2**-8, np.finfo(np.float32).max], np.float32),
        # exact ties between two bfloat16 values, both parities
        from_bfloat16_bits(np.arange(0x3F80, 0x3F90, dtype=np.uint16)) * np.float32(1 + 2**-8),
    ]).astype(np.float32)
    ours = to_bfloat16_bits(x)
    theirs = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    nan = to_bfloat16_bits(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(from_bfloat16_bits(nan)).all()


@pytest.mark.parametrize("code", ["F32", "F16", "BF16", "F64"])
def test_save_tensors_roundtrip(tmp_path, code):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 3)).astype(np.float32)
    f = np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32))  # any layout
    big = a.astype(">f4")  # big-endian input is stored little-endian
    save_tensors(tmp_path / "x.safetensors", {"a": (a, code), "f": (f[:, ::2], code),
                                              "big": (big, code), "i": (np.arange(3), "I64")})
    with rslora.Checkpoint(tmp_path / "x.safetensors") as ck:
        assert ck.dtype("a") == code and ck.dtype("i") == "I64"
        expect = {"F32": a, "F64": a, "F16": a.astype(np.float16).astype(np.float32),
                  "BF16": from_bfloat16_bits(to_bfloat16_bits(a))}[code]
        np.testing.assert_array_equal(ck.read("a"), expect)
        np.testing.assert_array_equal(ck.read("big"), expect)
        assert ck.read("f").shape == (4, 3)
        np.testing.assert_array_equal(ck.read_raw("i")[0], np.arange(3))


def test_pattern_key_is_pefts_rule():
    peft_other = pytest.importorskip("peft.utils.other")
    patterns = ["q_proj", r"layers\.1\.v_proj", "1.mlp.up", "layers.1.mlp", "down$"]
    names = ["model.layers.0.q_proj", "layers.1.v_proj", "xlayers.1.v_proj", "layers.1.mlp.up",
             "layers.11.mlp.up", "a.layers.1.mlp", "q_proj", "a.down", "a.updown", "zq_proj"]
    for n in names:
        theirs = peft_other.get_pattern_key(patterns, n)
        assert (pattern_key(patterns, n) or n) == theirs, n


def test_peft_config_rank_pattern_resolves_each_module_to_its_rank():
    # "h.1.q" is a dotted suffix of "x.h.1.q" and a regex matching "h_1_q": order and escaping.
    ranks = {"x.h.1.q": 3, "h.1.q": 5, "h_1_q": 7, "a.b": 7, "c": 2}
    cfg = peft_config(ranks, 4, True)
    assert cfg["r"] == 7 and cfg["use_rslora"] and cfg["peft_type"] == "LORA"
    for m, k in ranks.items():
        key = pattern_key(cfg["rank_pattern"], m)
        assert (cfg["rank_pattern"][key] if key is not None else cfg["r"]) == k, m
    assert peft_config({"a": 4, "b": 4}, 8, False)["rank_pattern"] == {}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("rule", ["rslora", "standard"])
def test_save_and_load_adapter_roundtrip(tmp_path, dtype, rule):
    rng = np.random.default_rng(2)
    factors = {"a.q": (rng.standard_normal((4, 10)), rng.standard_normal((6, 4))),
               "b.v": (rng.standard_normal((2, 6)), rng.standard_normal((10, 2))),
               "c.v": (rng.standard_normal((4, 6)), rng.standard_normal((3, 4)))}
    factors = {k: (A.astype(np.float32), B.astype(np.float32)) for k, (A, B) in factors.items()}
    out = tmp_path / "adapter"
    cfg = rslora.save_adapter(out, factors, alpha=12, rule=rule, dtype=dtype, base_model="base")
    on_disk = json.loads((out / "adapter_config.json").read_text())
    assert on_disk == cfg and cfg["r"] == 4 and cfg["rank_pattern"] == {"b.v": 2}
    assert cfg["target_modules"] == ["a.q", "b.v", "c.v"] and cfg["base_model_name_or_path"] == "base"
    ad = rslora.load_adapter(out)
    assert set(ad) == set(factors) and ad.use_rslora == (rule == "rslora")
    for name, (A, B) in factors.items():
        m = ad[name]
        r = A.shape[0]
        assert m.r == r and m.alpha == 12
        assert m.scale == (12 / math.sqrt(r) if rule == "rslora" else 12 / r)
        rt = 0 if dtype == "float32" else (2**-11 if dtype == "float16" else 2**-8)
        np.testing.assert_allclose(m.A, A, rtol=rt, atol=0)
        np.testing.assert_allclose(m.B, B, rtol=rt, atol=0)
        assert m.shape == (B.shape[0], A.shape[1])
        np.testing.assert_allclose(m.delta(), m.scale * (m.B.astype(np.float64) @ m.A), rtol=1e-5)


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "f").write_text("one")
    assert (out / "f").read_text() == "one"
    mode = os.stat(out).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask
    with pytest.raises(FileExistsError, match="already exists; use --force"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):  # a failure leaves the old folder and no temporary one
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "f").write_text("two")
            raise RuntimeError
    assert (out / "f").read_text() == "one"
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "g").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == [".rslora-output.json", "g"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        with atomic_output_dir(tmp_path / "file", force=True):
            pass


def adapter_for(tmp_path, w, names, rank=2, seed=3, **kw):
    rng = np.random.default_rng(seed)
    factors = {n: (rng.standard_normal((rank, w[f"{n}.weight"].shape[1])).astype(np.float32),
                   rng.standard_normal((w[f"{n}.weight"].shape[0], rank)).astype(np.float32))
               for n in names}
    rslora.save_adapter(tmp_path / "adapter", factors, alpha=4, **kw)
    return rslora.load_adapter(tmp_path / "adapter")


def test_merge_adapter_in_place_float32_and_float64(tmp_path):
    w = weights()
    ad = adapter_for(tmp_path, w, ["layers.0.proj", "layers.2.proj"])
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    ref = {k: v.copy() for k, v in w64.items()}
    for n, m in ad.modules.items():
        ref[f"{n}.weight"] += m.scale * (m.B.astype(np.float64) @ m.A)
    before = w["layers.0.proj.weight"]
    out = rslora.merge_adapter(w, ad)
    assert out is w and out["layers.0.proj.weight"] is before  # in place
    out64 = rslora.merge_adapter(w64, ad)
    for k in w:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out64[k], ref[k], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out["layers.1.proj.weight"], weights()["layers.1.proj.weight"])


def test_merge_adapter_fan_in_fan_out(tmp_path):
    w = weights()
    ad = adapter_for(tmp_path, w, ["layers.0.proj"])
    ad.modules["layers.0.proj"].fan_in_fan_out = True  # GPT-2 Conv1D stores W as (d_in, d_out)
    wt = {"layers.0.proj.weight": np.ascontiguousarray(w["layers.0.proj.weight"].T)}
    m = ad["layers.0.proj"]
    ref = wt["layers.0.proj.weight"] + (m.scale * (m.B.astype(np.float64) @ m.A)).T
    np.testing.assert_allclose(rslora.merge_adapter(wt, ad)["layers.0.proj.weight"], ref, rtol=1e-5,
                               atol=1e-5)


def test_merge_adapter_errors(tmp_path):
    w = weights()
    ad = adapter_for(tmp_path, w, ["layers.0.proj"])
    with pytest.raises(rslora.CheckpointError, match=r"no weight in the base.*layers.0.proj.weight"):
        rslora.merge_adapter({"other.weight": w["layers.1.proj.weight"]}, ad)
    with pytest.raises(rslora.CheckpointError, match=r"shape \(8, 12\) but .* gives \(12, 8\)"):
        rslora.merge_adapter({"layers.0.proj.weight": np.zeros((8, 12), np.float32)}, ad)
    with pytest.raises(TypeError, match="float32 or float64 NumPy array, got float16"):
        rslora.merge_adapter({"layers.0.proj.weight": np.zeros((12, 8), np.float16)}, ad)
    with pytest.raises(TypeError, match="adapter must be a LoraAdapter"):
        rslora.merge_adapter(w, 3)


@pytest.mark.parametrize("sharded", [False, True])
def test_merge_checkpoint_streams_shards(tmp_path, sharded):
    pytest.importorskip("torch")  # bfloat16 reads
    w = weights(n=4)
    w["layers.3.proj.weight"] = w["layers.3.proj.weight"].astype(np.float16)
    w["steps"] = np.arange(5, dtype=np.int64)
    if sharded:
        base = write_sharded(tmp_path / "base", w, 2)
    else:  # one untouched weight stored as bfloat16: copied bit for bit
        base = tmp_path / "model.safetensors"
        w["layers.2.proj.weight"] = from_bfloat16_bits(to_bfloat16_bits(w["layers.2.proj.weight"]))
        save_tensors(base, {k: (v, "BF16" if k == "layers.2.proj.weight" else
                                {"float32": "F32", "float16": "F16"}.get(v.dtype.name, "I64"))
                            for k, v in w.items()})
    ad = adapter_for(tmp_path, w, ["layers.1.proj", "layers.3.proj"])
    out = rslora.merge_checkpoint(base, ad, tmp_path / "merged")
    names = sorted(p.name for p in out.iterdir() if p.name != ".rslora-output.json")
    if sharded:
        assert names == sorted(os.listdir(base))
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(w) and index["metadata"]["total_size"] > 0
    else:
        assert names == ["model.safetensors"]
    expect = rslora.merge_adapter({k: (v.astype(np.float32) if v.dtype.kind == "f" else v)
                                   for k, v in w.items()}, ad)
    with rslora.Checkpoint(out) as ck:
        assert ck.dtype("layers.3.proj.weight") == "F16" and ck.dtype("steps") == "I64"
        assert ck.dtype("layers.2.proj.weight") == ("F32" if sharded else "BF16")
        for k, v in w.items():
            if k == "steps":
                np.testing.assert_array_equal(ck.read_raw(k)[0], v)
            elif k in ("layers.1.proj.weight", "layers.3.proj.weight"):
                np.testing.assert_array_equal(ck.read(k),
                                              expect[k].astype(v.dtype).astype(np.float32))
            else:
                np.testing.assert_array_equal(ck.read(k), v)  # untouched: bit for bit
    with pytest.raises(FileExistsError):
        rslora.merge_checkpoint(base, ad, tmp_path / "merged")
    rslora.merge_checkpoint(base, ad, tmp_path / "merged", dtype="bfloat16", force=True)
    with rslora.Checkpoint(tmp_path / "merged") as ck:
        # --dtype converts every float tensor (merged or not); integers stay as they are
        assert ck.dtype("layers.1.proj.weight") == "BF16" and ck.dtype("layers.0.proj.weight") == "BF16"
        assert ck.dtype("steps") == "I64"
        np.testing.assert_array_equal(
            ck.read("layers.1.proj.weight"),
            from_bfloat16_bits(to_bfloat16_bits(expect["layers.1.proj.weight"])))
