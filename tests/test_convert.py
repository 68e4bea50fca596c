"""``rslora convert`` / ``rslora.convert_adapter`` against PEFT: the converted adapter, loaded by
PEFT (strictly), gives the same per-module updates and logits as the original; a client that
ignores rank_pattern, alpha_pattern and use_rslora gives them too; dtypes and other tensors kept."""

from __future__ import annotations

import json
import math

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
from rslora.adapters.checkpoint import from_bfloat16_bits
from rslora.adapters.rewrite import _round_to_odd_f32, module_patterns, narrow


CASES = {
    "rslora-plain": dict(r=4, lora_alpha=8, use_rslora=True),
    "standard-plain": dict(r=8, lora_alpha=16, use_rslora=False),
    "rslora-patterns": dict(r=4, lora_alpha=8, use_rslora=True,
                            rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6, "c_proj": 3},
                            alpha_pattern={"q_proj": 3, "c_attn": 5.5}),
    # fan_in_fan_out as a GPT-2 user sets it (PEFT resets it per module for Linear layers)
    "standard-patterns": dict(r=3, lora_alpha=5, use_rslora=False, fan_in_fan_out=True,
                              rank_pattern={"down_proj": 5, "wte": 2}, alpha_pattern={"v_proj": 7}),
}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rule", ["standard", "rslora"])
def test_convert_gives_peft_the_same_update(tmp_path, kind, case, rule):
    src = make_adapter(tmp_path / "in", kind, **CASES[case])
    orig = load_strict(src, kind)
    res = rslora.convert_adapter(src, tmp_path / "out", rule=rule)
    cfg = read_config(tmp_path / "out")
    assert cfg["use_rslora"] is (rule == "rslora") and res.config == cfg
    conv = load_strict(tmp_path / "out", kind)
    d0, d1 = peft_deltas(orig), peft_deltas(conv)
    assert d0.keys() == d1.keys() and len(d0) >= 5
    for m in d0:
        assert rel_diff(d1[m], d0[m]) < TOL["float32"], m
    # A server that ignores the patterns and use_rslora (top-level alpha / r for every module).
    if rule == "standard":
        u = uniform_deltas(tmp_path / "out")
        for m in d0:
            assert rel_diff(u[m], d0[m]) < TOL["float32"], m
    l0, l1 = logits(orig), logits(conv)
    assert np.abs(l1 - l0).max() <= 1e-5 * np.abs(l0).max()


def test_rslora_to_standard_default_alpha_keeps_factors(tmp_path):
    """Without --alpha and without patterns, only the config changes: lora_alpha * sqrt(r)."""
    src = make_adapter(tmp_path / "in", "llama", r=16, lora_alpha=8, use_rslora=True)
    res = rslora.convert_adapter(src, tmp_path / "out", rule="standard")
    cfg = read_config(tmp_path / "out")
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (16, 32, False)
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and res.rescaled == {}
    assert (tmp_path / "in/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "out/adapter_model.safetensors").read_bytes()
    # Served by a client that ignores use_rslora, the original is off by 1/sqrt(r); this is not.
    d0 = peft_deltas(load_strict(src, "llama"))
    u_in, u_out = uniform_deltas(src), uniform_deltas(tmp_path / "out")
    m = next(iter(d0))
    assert rel_diff(u_out[m], d0[m]) < TOL["float32"]
    u_ignoring = {k: v * (8 / 16) / (8 / 4) for k, v in u_in.items()}  # alpha/r instead of /sqrt
    assert rel_diff(u_ignoring[m], d0[m]) > 0.7


def test_round_trip_and_explicit_alpha(tmp_path):
    src = make_adapter(tmp_path / "in", "gpt2", **CASES["standard-patterns"])
    rslora.convert_adapter(src, tmp_path / "rs", rule="rslora", alpha=2.5)
    cfg = read_config(tmp_path / "rs")
    assert cfg["lora_alpha"] == 2.5 and cfg["use_rslora"] is True
    rslora.convert_adapter(tmp_path / "rs", tmp_path / "back", rule="standard", alpha=5)
    d0, d2 = peft_deltas(load_strict(src, "gpt2")), peft_deltas(load_strict(tmp_path / "back", "gpt2"))
    for m in d0:
        assert rel_diff(d2[m], d0[m]) < 2 * TOL["float32"], m


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_adapters_stay_half_and_round_once(tmp_path, dtype):
    src = make_adapter(tmp_path / "in", "llama", dtype=dtype, **CASES["rslora-patterns"])
    res = rslora.convert_adapter(src, tmp_path / "out", rule="standard")
    before, after = read_factors(src), read_factors(tmp_path / "out")
    assert before.keys() == after.keys()
    assert {c for _, c in after.values()} == {CODES[dtype]}
    cfg = read_config(tmp_path / "out")
    rescaled = 0
    for key, (b, _) in before.items():
        mod = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if ".lora_B" in key or ".lora_embedding_B" in key:
            ratio = res.rescaled.get(mod, 1.0)
            rescaled += mod in res.rescaled
            assert_nearest(b * ratio, after[key][0], dtype)  # the float64 fold, rounded once
        else:
            assert np.array_equal(after[key][0], b), key
    assert rescaled >= 2 and cfg["use_rslora"] is False
    d0, d1 = peft_deltas(load_strict(src, "llama")), peft_deltas(load_strict(tmp_path / "out", "llama"))
    for m in d0:
        assert rel_diff(d1[m], d0[m]) < TOL[dtype], m


def assert_nearest(x: np.ndarray, stored: np.ndarray, dtype: str) -> None:
    """``stored`` (float64 values of the half-precision array) is ``x`` rounded to nearest."""
    if dtype == "float16":
        up = np.nextafter(stored.astype(np.float16), np.float16(np.inf)).astype(np.float64)
        down = np.nextafter(stored.astype(np.float16), np.float16(-np.inf)).astype(np.float64)
    else:
        bits = narrow(stored, "BF16", "x")[0].astype(np.int64)
        sign = np.where(stored < 0, -1, 1)
        up = from_bfloat16_bits((bits + sign).astype(np.uint16)).astype(np.float64)
        down = from_bfloat16_bits((bits - sign).astype(np.uint16)).astype(np.float64)
    err = np.abs(x - stored)
    assert (err <= np.abs(x - up)).all() and (err <= np.abs(x - down)).all()


def test_bfloat16_rounding_is_single_from_float64():
    # 1 + 2^-8 is a bfloat16 tie; just above it rounds up. Via float32 by nearest it would land
    # on the tie and round to even (down).
    x = np.array([1 + 2.0 ** -8 + 2.0 ** -40, -(1 + 2.0 ** -8 + 2.0 ** -40), 1 + 2.0 ** -8,
                  3.0, 1e-30, 0.0])
    bits, _ = narrow(x, "BF16", "x")
    got = from_bfloat16_bits(bits).astype(np.float64)
    assert list(got[:4]) == [1 + 2.0 ** -7, -(1 + 2.0 ** -7), 1.0, 3.0]
    assert got[5] == 0.0 and abs(got[4] - 1e-30) <= 2.0 ** -8 * 1e-30
    f = _round_to_odd_f32(np.array([1 + 2.0 ** -40, 1 - 2.0 ** -40, 2.0]))
    assert list(f.view(np.uint32) & 1) == [1, 1, 0]


def test_other_tensors_and_files_are_kept(tmp_path):
    src = make_adapter(tmp_path / "in", "llama", r=4, lora_alpha=8, use_rslora=True,
                       modules_to_save=["lm_head"])
    (src / "README.md").write_text("model card\n")
    rslora.convert_adapter(src, tmp_path / "out", rule="standard")
    before, after = read_factors(src), read_factors(tmp_path / "out")
    others = [k for k in before if "lora_" not in k]
    assert any("lm_head" in k for k in others)
    for k in others:
        assert np.array_equal(before[k][0], after[k][0]) and before[k][1] == after[k][1]
    assert (tmp_path / "out/README.md").read_text() == "model card\n"
    cfg_in, cfg_out = read_config(src), read_config(tmp_path / "out")
    changed = {k for k in cfg_in if cfg_in[k] != cfg_out[k]}
    assert changed == {"lora_alpha", "use_rslora"}
    l0 = logits(load_strict(src, "llama"))
    assert np.allclose(logits(load_strict(tmp_path / "out", "llama")), l0, rtol=0, atol=1e-6)


def test_fp16_overflow_is_an_error_not_inf(tmp_path):
    src = make_adapter(tmp_path / "in", "llama", dtype="float16", scale=1e4, r=4, lora_alpha=4,
                       use_rslora=False)
    with pytest.raises(ValueError, match=r"lora_B|B times .*overflows F16"):
        rslora.convert_adapter(src, tmp_path / "out", rule="rslora", alpha=1e-3)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


# -- bad input: one line, exit 2, nothing written ---------------------------------------------
def run_cli(capsys, *argv):
    code = rslora.cli.main(["convert", *map(str, argv)])
    err = capsys.readouterr().err
    return code, err


def test_cli_converts(tmp_path, capsys):
    src = make_adapter(tmp_path / "in", "gpt2", **CASES["rslora-patterns"])
    assert rslora.cli.main(["convert", str(src), "-o", str(tmp_path / "out"), "--rule",
                            "standard"]) == 0
    assert "use_rslora=False" in capsys.readouterr().out
    d0 = peft_deltas(load_strict(src, "gpt2"))
    u = uniform_deltas(tmp_path / "out")
    assert max(rel_diff(u[m], d0[m]) for m in d0) < TOL["float32"]


@pytest.mark.parametrize("how, message", [
    ("missing", "no such folder"),
    ("no-config", "no adapter_config.json"),
    ("no-weights", "no adapter_model.safetensors"),
    ("same", "is the input"),
    ("parent", "holds the input"),
    ("exists", "already exists"),
    ("alpha0", "alpha must be a positive finite number"),
    ("alpha-nan", "alpha must be a positive finite number"),
    ("dora", "DoRA"),
    ("bad-json", "not valid JSON"),
    ("bad-shape", "but the config gives it r="),
    ("unknown-lora-tensor", "cannot rewrite exactly"),
    ("variant", "use_bdlora is set"),
])
def test_bad_input(tmp_path, capsys, how, message):
    src = make_adapter(tmp_path / "ad" / "in", "llama", r=2, lora_alpha=2, use_rslora=True)
    out = tmp_path / "ad" / "out"
    extra = []
    cfg = read_config(src)
    if how == "missing":
        src = tmp_path / "nope"
    elif how == "no-config":
        (src / "adapter_config.json").unlink()
    elif how == "no-weights":
        (src / "adapter_model.safetensors").unlink()
    elif how == "same":
        out = src
    elif how == "parent":
        out = tmp_path / "ad"
        extra = ["--force"]
    elif how == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif how == "alpha0":
        extra = ["--alpha", "0"]
    elif how == "alpha-nan":
        extra = ["--alpha", "nan"]
    elif how in ("dora", "bad-shape", "variant"):
        cfg.update({"dora": {"use_dora": True}, "bad-shape": {"r": 3},
                    "variant": {"use_bdlora": {"nblocks": 2}}}[how])
        (src / "adapter_config.json").write_text(json.dumps(cfg))
    elif how == "bad-json":
        (src / "adapter_config.json").write_text("{r: 2")
    elif how == "unknown-lora-tensor":
        from safetensors.numpy import load_file, save_file

        t = load_file(src / "adapter_model.safetensors")
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = \
            np.ones(32, np.float32)
        save_file(t, src / "adapter_model.safetensors", metadata={"format": "pt"})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, err = run_cli(capsys, src, "-o", out, "--rule", "standard", *extra)
    assert code == 2
    assert err.count("\n") == 1 and message in err and err.startswith("rslora convert: error:"), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if how == "exists":
        assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("argv", [["--rule", "lora"], [], ["--rule", "standard", "--alpha", "x"]])
def test_bad_flags(tmp_path, capsys, argv):
    src = make_adapter(tmp_path / "in", "llama", r=2, lora_alpha=2)
    with pytest.raises(SystemExit) as e:
        rslora.cli.main(["convert", str(src), "-o", str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_python_argument_errors(tmp_path):
    src = make_adapter(tmp_path / "in", "llama", r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="rule must be"):
        rslora.convert_adapter(src, tmp_path / "o", rule="rsLoRA")
    with pytest.raises(TypeError, match="alpha must be a number"):
        rslora.convert_adapter(src, tmp_path / "o", rule="standard", alpha="8")
    with pytest.raises(ValueError, match="alpha must be a positive"):
        rslora.convert_adapter(src, tmp_path / "o", rule="standard", alpha=-math.inf)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("values, default", [
    ({"a.b": 4, "x.a.b": 8, "y.a.b": 4, "a_b": 8, "m.q": 2, "n.q": 8}, 8),  # suffixes, dots
    ({"h.0.attn(x)": 2, "h.1.attn(x)": 4, "h.2.attn[0]": 4}, 4),  # regex metacharacters
    ({"q": 1.5, "k": 2.0}, 2.0),
])
def test_module_patterns_are_exact_under_peft_matching(values, default):
    from peft.utils.other import get_pattern_key

    pat = module_patterns(values, default)
    for m, v in values.items():
        key = get_pattern_key(list(pat), m)  # PEFT's own lookup
        assert pat.get(key, default) == v, (m, pat)


def test_invalid_pattern_regex_is_a_clear_error(tmp_path):
    src = make_adapter(tmp_path / "in", "llama", r=2, lora_alpha=2)
    cfg = read_config(src)
    cfg["rank_pattern"] = {"q_proj(": 3}
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        rslora.convert_adapter(src, tmp_path / "out", rule="rslora")


def test_narrow_overflow_is_named():
    with pytest.raises(ValueError, match=r"module 'm': B: a value \(1e\+39\) overflows BF16"):
        narrow(np.array([1.0, 1e39]), "BF16", "module 'm': B")
    with pytest.raises(ValueError, match="overflows F32"):
        narrow(np.array([1e39]), "F32", "x")
    assert narrow(np.array([65504.0]), "F16", "x")[0].dtype == np.float16
