import math

import pytest

import rslora
from rslora.scaling import resolve


@pytest.mark.parametrize("r", [1, 4, 8, 16, 32, 64, 3, 1000])
@pytest.mark.parametrize("alpha", [16, 8.0, 1.5, 32])
def test_scale_rules_are_exact(alpha, r):
    # Bit-for-bit the float64 values PEFT computes (lora_alpha / r, lora_alpha / math.sqrt(r)).
    assert rslora.scale(alpha, r, "standard") == alpha / r
    assert rslora.scale(alpha, r, "rslora") == alpha / math.sqrt(r)
    assert rslora.scale(alpha, r) == alpha / math.sqrt(r)  # rslora is the default


def test_scale_table_alpha16():
    rows = rslora.scale_table(16, (1, 4, 8, 16, 32, 64))
    assert [row["r"] for row in rows] == [1, 4, 8, 16, 32, 64]
    for row in rows:
        assert row["standard"] == 16 / row["r"]
        assert row["rslora"] == 16 / math.sqrt(row["r"])
    text = rslora.format_scale_table(16)
    assert repr(16 / math.sqrt(8)) in text and "0.25" in text


def test_rslora_scale_is_rank_stable_in_the_sense_of_the_paper():
    # s(r) * sqrt(r) is constant for rslora; s(r) * r is constant for standard.
    for r in (1, 7, 64, 4096):
        assert math.isclose(rslora.scale(16, r) * math.sqrt(r), 16)
        assert math.isclose(rslora.scale(16, r, "standard") * r, 16)


@pytest.mark.parametrize("bad_r", [0, -3])
def test_scale_rejects_nonpositive_rank(bad_r):
    with pytest.raises(ValueError, match="r must be >= 1"):
        rslora.scale(16, bad_r)


@pytest.mark.parametrize("bad_r", [2.0, "4", True, None])
def test_scale_rejects_non_integer_rank(bad_r):
    with pytest.raises(TypeError, match="r must be an integer"):
        rslora.scale(16, bad_r)


def test_scale_rejects_bad_rule_and_alpha():
    with pytest.raises(ValueError, match="rule must be"):
        rslora.scale(16, 4, "sqrt")
    with pytest.raises(TypeError, match="alpha"):
        rslora.scale("16", 4)
    with pytest.raises(ValueError, match="alpha must be finite"):
        rslora.scale(float("nan"), 4)


def test_resolve_scale_or_alpha_never_both():
    assert resolve(0.5, None, "rslora", 8) == 0.5
    assert resolve(None, 16, "standard", 8) == 2.0
    with pytest.raises(ValueError, match="not both"):
        resolve(0.5, 16, "rslora", 8)
    with pytest.raises(ValueError, match="give scale= or alpha="):
        resolve(None, None, "rslora", 8)
    assert resolve(None, 16, "rslora", 0) == 0.0  # r = 0: the LoRA term is empty
