"""``rslora extract`` / :func:`rslora.extract_adapter`: accuracy against the Eckart-Young optimum,
tolerance mode, selection, outputs; and every bad input as one clear line from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import rslora
import rslora.cli
from rslora.adapters.checkpoint import save_tensors

from safetensors.numpy import save_file  # noqa: E402


def decaying(rng, m, n, decay, k=None):
    """A float32 matrix with singular values decay**i (exactly, up to float32 rounding)."""
    k = k or min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((U * decay ** np.arange(k)) @ V.T).astype(np.float32)


def make_pair(tmp_path, shapes=((40, 24), (24, 40), (32, 32)), decay=0.7, seed=0):
    rng = np.random.default_rng(seed)
    base, tuned = {}, {}
    for i, shape in enumerate(shapes):
        key = f"model.layers.{i}.proj.weight"
        base[key] = rng.standard_normal(shape).astype(np.float32)
        tuned[key] = base[key] + decaying(rng, *shape, decay)
    base["model.norm.weight"] = tuned["model.norm.weight"] = np.ones(4, np.float32)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return base, tuned


def optimal_error(delta: np.ndarray, r: int) -> float:
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    return float(np.sqrt((s[r:] ** 2).sum() / (s ** 2).sum()))


def extract(tmp_path, *args, out="adapter"):
    return rslora.cli.main(["extract", str(tmp_path / "base.safetensors"),
                            str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / out), *args])


@pytest.mark.parametrize("rule,alpha", [("rslora", None), ("standard", 3.5)])
def test_fixed_rank_is_near_optimal_and_reported(tmp_path, rule, alpha):
    base, tuned = make_pair(tmp_path)
    res = rslora.extract_adapter(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                                 tmp_path / "adapter", rank=6, rule=rule, alpha=alpha)
    ad = rslora.load_adapter(tmp_path / "adapter")
    assert res.config == ad.config and ad.config["r"] == 6
    assert ad.config["lora_alpha"] == (6 if alpha is None else alpha)
    assert [l.module for l in res.layers] == [f"model.layers.{i}.proj" for i in range(3)]
    for layer in res.layers:
        key = f"{layer.module}.weight"
        delta = tuned[key].astype(np.float64) - base[key]
        m = ad[layer.module]
        approx = m.scale * (m.B.astype(np.float64) @ m.A)
        err = np.linalg.norm(delta - approx) / np.linalg.norm(delta)
        opt = optimal_error(delta, 6)
        assert err <= opt * (1 + 1e-3) + 1e-6
        assert layer.error == pytest.approx(err, rel=1e-3, abs=1e-6)  # measured, not estimated
        assert layer.energy == pytest.approx(1 - err ** 2, abs=1e-6)
        assert layer.rank == 6 and layer.shape == delta.shape
    assert res.error == pytest.approx(np.sqrt(sum((l.error * l.norm) ** 2 for l in res.layers)
                                              / sum(l.norm ** 2 for l in res.layers)))


def test_tolerance_picks_the_smallest_rank_per_layer(tmp_path):
    base, tuned = make_pair(tmp_path, shapes=((40, 24), (30, 50)), decay=0.6)
    rng = np.random.default_rng(5)
    k = "model.layers.1.proj.weight"  # a second layer with another decay: another rank
    tuned[k] = base[k] + decaying(rng, 30, 50, 0.85)
    save_file(tuned, tmp_path / "tuned.safetensors")
    tol = 0.01
    res = rslora.extract_adapter(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                                 tmp_path / "adapter", tol=tol)
    ad = rslora.load_adapter(tmp_path / "adapter")
    ranks = {}
    for layer in res.layers:
        key = f"{layer.module}.weight"
        delta = tuned[key].astype(np.float64) - base[key]
        s = np.linalg.svd(delta, compute_uv=False)
        tail = np.sqrt(np.maximum((s ** 2).sum() - np.cumsum(s ** 2), 0) / (s ** 2).sum())
        best = int(np.argmax(tail <= tol)) + 1  # smallest rank meeting tol
        assert best <= layer.rank <= best + 1
        assert layer.error <= tol * 1.001
        ranks[layer.module] = layer.rank
    assert len(set(ranks.values())) == 2
    assert {n: m.r for n, m in ad.modules.items()} == ranks
    res2 = rslora.extract_adapter(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                                  tmp_path / "capped", tol=1e-6, max_rank=5)
    assert [l.rank for l in res2.layers] == [5, 5]


def test_rank_is_capped_zero_deltas_skipped_embeddings_as_embedding_lora(tmp_path):
    rng = np.random.default_rng(1)
    base = {"model.embed_tokens.weight": rng.standard_normal((50, 8)).astype(np.float32),
            "model.a.weight": rng.standard_normal((6, 4)).astype(np.float32),
            "model.same.weight": rng.standard_normal((6, 4)).astype(np.float32),
            "lm_head.weight": rng.standard_normal((50, 8)).astype(np.float32)}
    tuned = {k: v + 1 for k, v in base.items()}
    tuned["model.same.weight"] = base["model.same.weight"]
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    res = rslora.extract_adapter(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                                 tmp_path / "adapter", rank=16)
    assert {l.module: l.rank for l in res.layers} == {"model.a": 4, "lm_head": 8,
                                                      "model.embed_tokens": 8}
    assert res.layouts["model.embed_tokens"] == "embedding" and res.layouts["lm_head"] == "linear"
    assert "unchanged" in res.skipped["model.same"]
    for l in res.layers:  # full rank: exact up to float32 rounding
        assert l.error < 1e-5
    cfg = rslora.load_adapter(tmp_path / "adapter").config
    assert set(cfg["target_modules"]) == {"model.a", "lm_head", "model.embed_tokens"}
    assert len(cfg["rank_pattern"]) == 1


def test_include_exclude_sharded_and_summary(tmp_path, capsys):
    base, tuned = make_pair(tmp_path, shapes=((16, 12),) * 4)
    for name, w in (("base", base), ("tuned", tuned)):  # rewrite as sharded folders
        folder = tmp_path / name
        folder.mkdir()
        keys = sorted(w)
        save_file({k: w[k] for k in keys[:2]}, folder / "a.safetensors")
        save_file({k: w[k] for k in keys[2:]}, folder / "b.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: "a.safetensors" if k in keys[:2] else "b.safetensors" for k in keys}}))
    rc = rslora.cli.main(["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), "-o",
                          str(tmp_path / "out"), "--rank", "3", "--include", r"layers\.[123]\.",
                          "--exclude", "layers.2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "model.layers.1.proj" in out and "model.layers.3.proj" in out
    assert "layers.0" not in out and "layers.2" not in out
    assert "energy kept" in out and "rel. error" in out and "wrote" in out
    assert set(rslora.load_adapter(tmp_path / "out")) == {"model.layers.1.proj", "model.layers.3.proj"}


def test_changed_biases_and_norms_are_reported(tmp_path, capsys):
    base, tuned = make_pair(tmp_path)
    base["model.layers.0.proj.bias"] = np.zeros(40, np.float32)
    tuned["model.layers.0.proj.bias"] = np.full(40, 0.5, np.float32)
    tuned["model.norm.weight"] = tuned["model.norm.weight"] * 2
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    assert extract(tmp_path, "--rank", "2", "-q") == 0
    err = capsys.readouterr().err
    assert "2 tensor(s) that are not 2-D weights differ and are not in the adapter" in err
    assert "model.layers.0.proj.bias" in err and "model.norm.weight" in err


def test_same_seed_same_files_and_dtype(tmp_path):
    make_pair(tmp_path)
    assert extract(tmp_path, "--rank", "4", "-q", "--dtype", "float16", out="a") == 0
    assert extract(tmp_path, "--rank", "4", "-q", "--dtype", "float16", out="b") == 0
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    with rslora.Checkpoint(tmp_path / "a") as ck:
        assert {ck.dtype(k) for k in ck.keys()} == {"F16"}


def test_bfloat16_and_float16_checkpoints(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    base, tuned = make_pair(tmp_path)
    torch_save({k: torch.from_numpy(v).bfloat16() for k, v in base.items()}, tmp_path / "base.safetensors")
    torch_save({k: torch.from_numpy(v).half() for k, v in tuned.items()}, tmp_path / "tuned.safetensors")
    res = rslora.extract_adapter(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                                 tmp_path / "adapter", rank=5)
    ad = rslora.load_adapter(tmp_path / "adapter")
    for layer in res.layers:
        key = f"{layer.module}.weight"
        delta = (torch.from_numpy(tuned[key]).half().double()
                 - torch.from_numpy(base[key]).bfloat16().double()).numpy()
        m = ad[layer.module]
        err = np.linalg.norm(delta - m.scale * (m.B.astype(np.float64) @ m.A)) / np.linalg.norm(delta)
        assert err <= optimal_error(delta, 5) * (1 + 1e-3) + 1e-6


# -- bad input: one line on stderr, exit code 2, no traceback, no output folder -------------------
def run_cli(capsys, argv):
    rc = rslora.cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_missing_files(tmp_path, capsys):
    make_pair(tmp_path)
    err = run_cli(capsys, ["extract", str(tmp_path / "nope.safetensors"),
                           str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "o"), "--rank", "2"])
    assert "nope.safetensors: no such file or folder" in err
    err = run_cli(capsys, ["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "noadapter"),
                           "-o", str(tmp_path / "o")])
    assert "noadapter: no such folder" in err
    (tmp_path / "empty").mkdir()
    err = run_cli(capsys, ["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "empty"),
                           "-o", str(tmp_path / "o")])
    assert "no adapter_config.json" in err
    assert not (tmp_path / "o").exists()


def test_tensors_in_one_checkpoint_only(tmp_path, capsys):
    base, tuned = make_pair(tmp_path)
    tuned["model.extra.weight"] = np.ones((3, 3), np.float32)
    del tuned["model.layers.0.proj.weight"]
    save_file(tuned, tmp_path / "tuned.safetensors")
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"),
                           str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "o"), "--rank", "2"])
    assert "1 weight(s) only in BASE, e.g. 'model.layers.0.proj.weight'" in err
    assert "--on-missing skip" in err and not (tmp_path / "o").exists()
    assert extract(tmp_path, "--rank", "2", "--on-missing", "skip", "-q", out="o") == 0
    err = capsys.readouterr().err
    assert "skipped 1 weight(s) only in BASE: model.layers.0.proj.weight" in err
    assert "skipped 1 weight(s) only in TUNED: model.extra.weight" in err
    assert set(rslora.load_adapter(tmp_path / "o")) == {"model.layers.1.proj", "model.layers.2.proj"}


def test_shape_mismatch(tmp_path, capsys):
    base, tuned = make_pair(tmp_path)
    tuned["model.layers.1.proj.weight"] = np.ones((24, 41), np.float32)
    save_file(tuned, tmp_path / "tuned.safetensors")
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"),
                           str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "o"), "--rank", "2"])
    assert "'model.layers.1.proj.weight' has shape (24, 40) in" in err and "but (24, 41) in" in err


def test_non_float_tensor(tmp_path, capsys):
    base, tuned = make_pair(tmp_path)
    for name, w in (("base", base), ("tuned", tuned)):
        w["model.q.weight"] = np.ones((4, 4), np.int8)
        save_file(w, tmp_path / f"{name}.safetensors")
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"),
                           str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "o"), "--rank", "2"])
    assert "tensor 'model.q.weight' is I8, not a float tensor; leave it out with --exclude" in err
    assert extract(tmp_path, "--rank", "2", "-q", "--exclude", r"\.q$", out="o") == 0


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, capsys, damage):
    make_pair(tmp_path)
    f = tmp_path / "tuned.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) - 100], "garbage": b"\x07" * 64, "empty": b""}[damage])
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"), str(f), "-o",
                           str(tmp_path / "o"), "--rank", "2"])
    assert "tuned.safetensors: not a valid safetensors file" in err


def test_index_with_missing_shard_or_tensor(tmp_path, capsys):
    base, tuned = make_pair(tmp_path)
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({k: v for k, v in tuned.items() if "layers.0" in k}, folder / "s1.safetensors")
    index = {"weight_map": {k: "s1.safetensors" if "layers.0" in k else "s2.safetensors"
                            for k in tuned}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"), str(folder), "-o",
                           str(tmp_path / "o"), "--rank", "2"])
    assert "shard s2.safetensors is missing (it holds 3 tensor(s)" in err
    index["weight_map"] = {k: "s1.safetensors" for k in tuned}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"), str(folder), "-o",
                           str(tmp_path / "o"), "--rank", "2"])
    assert "is mapped to s1.safetensors, which does not hold it" in err
    (folder / "model.safetensors.index.json").write_text("{not json")
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"), str(folder), "-o",
                           str(tmp_path / "o"), "--rank", "2"])
    assert "not a safetensors index" in err


def test_existing_output_needs_force(tmp_path, capsys):
    make_pair(tmp_path)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"),
                           str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "o"), "--rank", "2"])
    assert "already exists; use --force" in err and (tmp_path / "o" / "keep").exists()
    # --force replaces only rslora's own output: a folder of the user's is refused, and kept.
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                           "-o", str(tmp_path / "o"), "--rank", "2", "--force"])
    assert "not written by rslora" in err and (tmp_path / "o" / "keep").read_text() == "x"
    assert extract(tmp_path, "--rank", "2", "-q", out="o2") == 0
    (tmp_path / "o2" / "notes.txt").write_text("mine")
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                           "-o", str(tmp_path / "o2"), "--rank", "2", "--force"])
    assert "notes.txt" in err and "did not write" in err
    (tmp_path / "o2" / "notes.txt").unlink()
    assert extract(tmp_path, "--rank", "2", "-q", "--force", out="o2") == 0
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == [
        ".rslora-output.json", "adapter_config.json", "adapter_model.safetensors"]
    err = run_cli(capsys, ["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "o2"),
                           "-o", str(tmp_path / "o2")])
    assert "is the input" in err


def test_bad_options(tmp_path, capsys):
    make_pair(tmp_path)
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"),
                           str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "o"),
                           "--rank", "2", "--include", "("])
    assert "include is not a valid regular expression" in err
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"),
                           str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "o"),
                           "--rank", "2", "--include", "nothing-matches"])
    assert "no 2-D weight to extract" in err
    for opt in (["--tol", "1.5"], ["--rank", "0"], ["--rank", "2", "--alpha", "-1"]):
        err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"),
                               str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "o"), *opt])
        assert opt[-1] in err
    with pytest.raises(SystemExit):  # argparse: exactly one of --rank / --tol
        rslora.cli.main(["extract", "a", "b", "-o", "c", "--rank", "2", "--tol", "0.1"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unchanged_checkpoint_and_nan_delta(tmp_path, capsys):
    base, _ = make_pair(tmp_path)
    save_file(base, tmp_path / "tuned.safetensors")
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"),
                           str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "o"), "--rank", "2"])
    assert "unchanged between BASE and TUNED" in err
    bad = dict(base)
    bad["model.layers.2.proj.weight"] = np.full((32, 32), np.nan, np.float32)
    save_file(bad, tmp_path / "tuned.safetensors")
    err = run_cli(capsys, ["extract", str(tmp_path / "base.safetensors"),
                           str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "o"), "--rank", "2"])
    assert "'model.layers.2.proj.weight': the delta has NaN or Inf" in err


def test_interrupted_extraction_leaves_nothing(tmp_path, capsys, monkeypatch):
    make_pair(tmp_path)
    calls = []

    def interrupt(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(rslora, "lora_from_delta", interrupt)
    assert extract(tmp_path, "--rank", "2", "-q", out="o") == 130
    assert calls and sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors",
                                                                    "tuned.safetensors"]


def test_bad_adapters(tmp_path, capsys):
    w = {"a.weight": np.ones((4, 4), np.float32)}
    save_file(w, tmp_path / "base.safetensors")

    def adapter(name, cfg=None, tensors=None):
        d = tmp_path / name
        d.mkdir()
        c = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
        c.update(cfg or {})
        (d / "adapter_config.json").write_text(json.dumps(c))
        if tensors is not None:
            save_tensors(d / "adapter_model.safetensors", {k: (v, "F32") for k, v in tensors.items()})
        return d

    ok = {"base_model.model.a.lora_A.weight": np.ones((2, 4), np.float32),
          "base_model.model.a.lora_B.weight": np.ones((4, 2), np.float32)}
    cases = [
        (adapter("dora", {"use_dora": True}, ok), "DoRA adapters (use_dora=true) are not supported"),
        (adapter("ia3", {"peft_type": "IA3"}, ok), "only LORA adapters are supported"),
        (adapter("nofile", {}), "no adapter_model.safetensors"),
        (adapter("rank", {"r": 3}, ok), "has lora_A (2, 4) and lora_B (4, 2), but the config gives it r=3"),
        (adapter("half", {}, {"base_model.model.a.lora_A.weight": ok["base_model.model.a.lora_A.weight"]}),
         "module 'a' has no lora_B.weight"),
        (adapter("emb", {}, {**ok, "base_model.model.e.lora_embedding_A": np.ones((2, 4), np.float32)}),
         "module 'e' has no lora_embedding_B"),
        (adapter("other", {}, {"base_model.model.b.lora_A.weight": np.ones((2, 4), np.float32),
                               "base_model.model.b.lora_B.weight": np.ones((4, 2), np.float32)}),
         "1 adapter module(s) have no weight in the base, e.g. 'b.weight'"),
        (adapter("shape", {}, {"base_model.model.a.lora_A.weight": np.ones((2, 5), np.float32),
                               "base_model.model.a.lora_B.weight": np.ones((4, 2), np.float32)}),
         "base weight 'a.weight' has shape (4, 4) but"),
    ]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"pickle")
    cases.append((tmp_path / "bin", "only adapter_model.bin (a pickle) is present"))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "adapter_config.json").write_text("{")
    cases.append((tmp_path / "badjson", "adapter_config.json: not valid JSON"))
    for path, msg in cases:
        err = run_cli(capsys, ["merge", str(tmp_path / "base.safetensors"), str(path), "-o",
                               str(tmp_path / "merged")])
        assert msg in err, (path.name, err)
        assert not (tmp_path / "merged").exists()
