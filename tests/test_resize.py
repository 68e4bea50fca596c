"""``rslora resize`` / ``rslora.resize_adapter`` against float64 references: the SVD of each dense
update (the Eckart-Young optimum), PEFT loading the written adapter strictly and computing the
truncated updates, and the per-module ranks that --tol / --energy must pick."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rslora
import rslora.cli
from lora_models import (
    CODES,
    TOL,
    load_strict,
    logits,
    make_adapter,
    peft_deltas,
    read_config,
    read_factors,
    rel_diff,
    uniform_deltas,
)
from rslora.adapters.resize import choose_rank, factor_svd, truncate

CASES = {
    "rslora": dict(r=8, lora_alpha=8, use_rslora=True,
                   rank_pattern={"v_proj": 3, "c_proj": 6}, alpha_pattern={"q_proj": 3}),
    "standard": dict(r=6, lora_alpha=12, use_rslora=False, fan_in_fan_out=True,
                     rank_pattern={"down_proj": 8, "wte": 2}, alpha_pattern={"c_attn": 5}),
}


def best(delta: np.ndarray, k: int):
    """The rank-k truncation of ``delta`` and its relative error, from numpy's dense SVD."""
    U, S, Vt = np.linalg.svd(delta, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vt[:k], float(np.sqrt((S[k:] ** 2).sum() / (S ** 2).sum()))


# -- the small-problem kernel ------------------------------------------------------------------
@pytest.mark.parametrize("m, n, r", [(40, 30, 8), (5, 30, 8), (40, 3, 8), (64, 64, 1), (7, 9, 7)])
def test_factor_svd_is_the_svd_of_the_product(rng, m, n, r):
    A = rng.standard_normal((r, n)) * rng.uniform(0.1, 10)
    B = rng.standard_normal((m, r)) @ np.diag(np.logspace(0, -6, r))
    L, S, Rt = factor_svd(A, B)
    p = min(m, n, r)
    assert L.shape == (m, p) and S.shape == (p,) and Rt.shape == (p, n)
    ref = np.linalg.svd(B @ A, compute_uv=False)[:p]
    assert np.allclose(S, ref, rtol=1e-12, atol=1e-14 * ref[0])
    assert np.allclose(L.T @ L, np.eye(p), atol=1e-13) and np.allclose(Rt @ Rt.T, np.eye(p), atol=1e-13)
    assert np.allclose((L * S) @ Rt, B @ A, rtol=0, atol=1e-13 * np.abs(B @ A).max())
    for k in range(1, p + 1):
        a, b = truncate(L, S, Rt, k, factor=-2.5)
        ref_k, _ = best(B @ A, k)
        assert np.allclose(b @ a, -2.5 * ref_k, rtol=0, atol=1e-12 * np.abs(B @ A).max())
        # singular values split evenly: A A^T and B^T B have the same diagonal
        assert np.allclose(np.diag(a @ a.T), np.diag(b.T @ b), rtol=1e-10)
    a, b = truncate(L, S, Rt, p + 2)  # past the product's rank: zero padded, same product
    assert a.shape == (p + 2, n) and b.shape == (m, p + 2) and not a[p:].any()


def test_choose_rank_rules():
    S = np.array([4.0, 2.0, 1.0, 0.5, 0.0])
    t = np.array([21.25, 5.25, 1.25, 0.25, 0.0, 0.0])  # tail energies
    for tol in (0.0, 0.1, 0.2, 0.3, 0.5, 0.9, 0.99):
        k = choose_rank(S, tol=tol)
        assert np.sqrt(t[k] / t[0]) <= tol and (k == 1 or np.sqrt(t[k - 1] / t[0]) > tol)
    assert choose_rank(S, tol=0.0) == 4  # exact zeros go
    assert choose_rank(S, energy=1.0) == 4
    assert choose_rank(S, energy=0.5) == 1 and choose_rank(S, energy=0.94) == 2 \
        and choose_rank(S, energy=0.95) == 3
    assert choose_rank(S, tol=0.0, max_rank=2) == 2
    assert choose_rank(np.zeros(3), tol=0.1) == 1 and choose_rank(np.zeros(3), energy=0.9) == 1


# -- whole adapters against PEFT ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_fixed_rank_is_the_eckart_young_optimum_in_peft(tmp_path, kind, case):
    src = make_adapter(tmp_path / "in", kind, **CASES[case])
    d0 = peft_deltas(load_strict(src, kind))
    res = rslora.resize_adapter(src, tmp_path / "out", rank=4)
    cfg = read_config(tmp_path / "out")
    assert cfg["use_rslora"] == CASES[case]["use_rslora"]
    assert cfg["lora_alpha"] == CASES[case]["lora_alpha"]
    d1 = peft_deltas(load_strict(tmp_path / "out", kind))
    assert d1.keys() == d0.keys()
    report = {m.module: m for m in res.modules}
    old = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]: v[0].shape[0]
           for k, v in read_factors(src).items() if "lora_A" in k or "lora_embedding_A" in k}
    new = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]: v[0].shape[0]
           for k, v in read_factors(tmp_path / "out").items()
           if "lora_A" in k or "lora_embedding_A" in k}
    for m in d0:
        k = min(4, old[m])
        ref, err = best(d0[m], k)
        assert new[m] == k and report[m].new_rank == k and report[m].old_rank == old[m]
        assert rel_diff(d1[m], ref) < 4 * TOL["float32"], m
        assert abs(report[m].error - err) <= 1e-10 and abs(report[m].energy - (1 - err ** 2)) <= 1e-10
        assert abs(np.linalg.norm(d1[m] - d0[m]) / np.linalg.norm(d0[m]) - err) < 1e-5
    u = uniform_deltas(tmp_path / "out")  # a client ignoring rank/alpha patterns
    for m in d1:
        assert rel_diff(u[m], d1[m]) < 4 * TOL["float32"], m
    assert np.isfinite(logits(load_strict(tmp_path / "out", kind))).all()


@pytest.mark.parametrize("mode", ["tol", "energy"])
def test_dynamic_ranks_are_the_smallest_that_meet_the_target(tmp_path, mode):
    # Spectra that decay at different speeds per module, so the ranks differ.
    src = make_adapter(tmp_path / "in", "llama", r=8, lora_alpha=4, use_rslora=True)
    from safetensors.numpy import load_file, save_file

    t = load_file(src / "adapter_model.safetensors")
    for i, key in enumerate(k for k in t if k.endswith(("lora_B.weight", "embedding_B"))):
        t[key] = (t[key] * np.logspace(0, -(i % 4 + 1), 8)).astype(np.float32)
    save_file(t, src / "adapter_model.safetensors", metadata={"format": "pt"})
    d0 = peft_deltas(load_strict(src, "llama"))
    target = 0.05
    kw = {"tol": target} if mode == "tol" else {"energy": 1 - target ** 2}
    res = rslora.resize_adapter(src, tmp_path / "out", **kw)
    cfg = read_config(tmp_path / "out")
    ranks = {m.module: m.new_rank for m in res.modules}
    assert len(set(ranks.values())) >= 3 and cfg["rank_pattern"]
    d1 = peft_deltas(load_strict(tmp_path / "out", "llama"))
    for m, k in ranks.items():
        ref, err = best(d0[m], k)
        assert err <= target * (1 + 1e-9) and best(d0[m], k - 1)[1] > target, m
        assert rel_diff(d1[m], ref) < 4 * TOL["float32"], m
    u = uniform_deltas(tmp_path / "out")
    assert max(rel_diff(u[m], d1[m]) for m in d1) < 4 * TOL["float32"]
    capped = rslora.resize_adapter(src, tmp_path / "capped", max_rank=2, **kw)
    assert max(m.new_rank for m in capped.modules) == 2
    assert all(m.new_rank == min(2, ranks[m.module]) for m in capped.modules)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_adapters(tmp_path, dtype):
    src = make_adapter(tmp_path / "in", "gpt2", dtype=dtype, **CASES["rslora"])
    d0 = peft_deltas(load_strict(src, "gpt2"))
    rslora.resize_adapter(src, tmp_path / "out", rank=3)
    assert {c for _, c in read_factors(tmp_path / "out").values()} == {CODES[dtype]}
    d1 = peft_deltas(load_strict(tmp_path / "out", "gpt2"))
    for m in d0:
        assert rel_diff(d1[m], best(d0[m], 3)[0]) < 2 * TOL[dtype], m


def test_modules_that_keep_their_rank_keep_their_factors(tmp_path):
    plain = make_adapter(tmp_path / "plain", "llama", r=4, lora_alpha=8, use_rslora=True)
    rslora.resize_adapter(plain, tmp_path / "out", rank=64)  # caps at each module's rank
    assert (plain / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "out/adapter_model.safetensors").read_bytes()
    assert read_config(tmp_path / "out") == read_config(plain)
    # rank 2: v_proj (already 2, same scale at the new r = 2) keeps A and B; lm_head
    # (modules_to_save) is copied bit for bit
    src = make_adapter(tmp_path / "in", "llama", r=4, lora_alpha=8, use_rslora=True,
                       rank_pattern={"v_proj": 2}, modules_to_save=["lm_head"])
    rslora.resize_adapter(src, tmp_path / "r2", rank=2)
    before, after = read_factors(src), read_factors(tmp_path / "r2")
    for k in before:
        if "v_proj.lora_" in k or "lora_" not in k:
            assert np.array_equal(before[k][0], after[k][0]), k
    assert read_config(tmp_path / "r2")["rank_pattern"] == {}
    assert read_config(tmp_path / "r2")["r"] == 2


def test_zero_update_module(tmp_path):
    src = make_adapter(tmp_path / "in", "llama", r=4, lora_alpha=8)
    from safetensors.numpy import load_file, save_file

    t = load_file(src / "adapter_model.safetensors")
    zero = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
    t[zero][:] = 0
    save_file(t, src / "adapter_model.safetensors", metadata={"format": "pt"})
    res = rslora.resize_adapter(src, tmp_path / "out", tol=0.1)
    mod = zero.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
    rep = next(m for m in res.modules if m.module == mod)
    assert rep.new_rank == 1 and rep.error == 0.0
    d1 = peft_deltas(load_strict(tmp_path / "out", "llama"))
    assert not d1[mod].any() and all(np.isfinite(v).all() for v in d1.values())


# -- command line and bad input ----------------------------------------------------------------
def test_cli_prints_the_table(tmp_path, capsys):
    src = make_adapter(tmp_path / "in", "gpt2", **CASES["standard"])
    assert rslora.cli.main(["resize", str(src), "-o", str(tmp_path / "out"), "--energy", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "old rank" in out and "energy kept" in out and "transformer.wte" in out
    assert "wrote" in out.splitlines()[-1]
    load_strict(tmp_path / "out", "gpt2")


@pytest.mark.parametrize("argv, message", [
    (["--rank", "0"], "--rank must be >= 1, got 0"),
    (["--rank", "-3"], "--rank must be >= 1"),
    (["--tol", "1"], "--tol must be in [0, 1), got 1.0"),
    (["--tol", "-0.1"], "--tol must be in [0, 1)"),
    (["--tol", "nan"], "--tol must be in [0, 1)"),
    (["--energy", "0"], "--energy must be in (0, 1]"),
    (["--energy", "1.5"], "--energy must be in (0, 1]"),
    (["--rank", "2", "--max-rank", "3"], "--max-rank goes with tol or energy"),
    (["--tol", "0.1", "--max-rank", "0"], "--max-rank must be >= 1"),
    (["--rank", "2", "--same"], "is the input"),
    (["--rank", "2", "--dora"], "DoRA"),
    (["--rank", "2", "--missing"], "no such folder"),
])
def test_bad_input(tmp_path, capsys, argv, message):
    src = make_adapter(tmp_path / "in", "llama", r=4, lora_alpha=4)
    out = tmp_path / "out"
    if "--same" in argv:
        out = src
    if "--dora" in argv:
        cfg = read_config(src)
        cfg["use_dora"] = True
        (src / "adapter_config.json").write_text(json.dumps(cfg))
    if "--missing" in argv:
        src = tmp_path / "gone"
    argv = [a for a in argv if a not in ("--same", "--dora", "--missing")]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = rslora.cli.main(["resize", str(src), "-o", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("argv", [[], ["--rank", "2", "--tol", "0.1"], ["--rank", "two"]])
def test_bad_flags(tmp_path, capsys, argv):
    src = make_adapter(tmp_path / "in", "llama", r=4, lora_alpha=4)
    with pytest.raises(SystemExit) as e:
        rslora.cli.main(["resize", str(src), "-o", str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_python_argument_errors(tmp_path):
    src = make_adapter(tmp_path / "in", "llama", r=4, lora_alpha=4)
    with pytest.raises(ValueError, match="exactly one of rank, tol or energy"):
        rslora.resize_adapter(src, tmp_path / "o")
    with pytest.raises(ValueError, match=r"got rank, tol"):
        rslora.resize_adapter(src, tmp_path / "o", rank=2, tol=0.1)
    with pytest.raises(TypeError, match="rank must be an integer"):
        rslora.resize_adapter(src, tmp_path / "o", rank=2.0)
    with pytest.raises(TypeError, match="rank must be an integer"):
        rslora.resize_adapter(src, tmp_path / "o", rank=True)
    assert not (tmp_path / "o").exists()
