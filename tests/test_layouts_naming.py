"""Unit rules behind real-model merges: which layout a weight is stored in (Linear / Conv1D),
and how adapter names find checkpoint keys across head prefixes."""

from __future__ import annotations

import pytest

from rslora.adapters.checkpoint import CheckpointError
from rslora.adapters.layouts import conv1d_by_type, decide_conv1d, stored_conv1d
from rslora.adapters.merge import parse_size
from rslora.adapters.naming import match_modules, parse_prefix


def test_conv1d_by_model_type():
    assert conv1d_by_type("gpt2", "transformer.h.0.attn.c_proj") is True
    assert conv1d_by_type("gpt2", "lm_head") is False
    assert conv1d_by_type("llama", "model.layers.0.mlp.c_proj") is False  # Linear everywhere
    assert conv1d_by_type(None, "h.0.attn.c_attn") is None


@pytest.mark.parametrize("stored,flag,evidence,want", [
    ((8, 4), None, set(), False),            # fits Linear only
    ((4, 8), True, set(), True),             # fits Conv1D only, the flag says Conv1D exists
    ((4, 8), False, {"conv1d"}, True),       # ... or the model's biases do
    ((6, 6), False, set(), False),           # square, no Conv1D anywhere: Linear
    ((6, 6), True, {"conv1d"}, True),        # square, everything Conv1D and PEFT's flag agrees
])
def test_decide_conv1d(stored, flag, evidence, want):
    d_out, d_in = (8, 4) if stored != (6, 6) else (6, 6)
    assert decide_conv1d("m", stored, d_out, d_in, flag=flag, evidence=evidence) is want


@pytest.mark.parametrize("stored,flag,evidence,match", [
    ((4, 8), False, set(), "would fit a Conv1D"),          # transposed, nothing says Conv1D
    ((5, 8), False, set(), r"shape \(5, 8\).*shape mismatch"),
    ((6, 6), False, {"conv1d"}, "square"),                  # square and the model mixes layouts
    ((6, 6), True, {"conv1d", "linear"}, "square"),
    ((6, 6), True, set(), "square"),
])
def test_decide_conv1d_refuses(stored, flag, evidence, match):
    d_out, d_in = (8, 4) if stored != (6, 6) else (6, 6)
    with pytest.raises(CheckpointError, match=match):
        decide_conv1d("h.0.attn.c_proj", stored, d_out, d_in, flag=flag, evidence=evidence)
    # config.json's model_type decides even a square weight
    if stored == (6, 6):
        assert decide_conv1d("h.0.attn.c_proj", stored, 6, 6, model_type="gpt2", flag=flag,
                             evidence=evidence) is True


def test_stored_conv1d_for_extraction():
    assert stored_conv1d("a", (4, 8), None) is False                       # no Conv1D in model
    assert stored_conv1d("a", (4, 8), 8, evidence={"conv1d"}) is True      # bias is the out side
    assert stored_conv1d("a", (4, 8), 4, evidence={"conv1d"}) is False
    with pytest.raises(CheckpointError, match="'a'.*Conv1D"):
        stored_conv1d("a", (4, 4), 4, evidence={"conv1d"})


def test_match_modules_by_suffix_both_ways_and_prefix():
    have = {"model.layers.0.q", "model.layers.1.q", "lm_head"}
    assert match_modules(["layers.0.q", "lm_head"], have) == {"layers.0.q": "model.layers.0.q",
                                                              "lm_head": "lm_head"}
    assert match_modules(["base.model.layers.1.q"], have) == {"base.model.layers.1.q":
                                                              "model.layers.1.q"}
    assert match_modules(["layers.0.q"], have, prefix="model.") == {"layers.0.q": "model.layers.0.q"}
    assert match_modules(["x.layers.0.q"], have, prefix="x.=model.") == {"x.layers.0.q":
                                                                        "model.layers.0.q"}
    with pytest.raises(CheckpointError, match=r"have no weight in BASE, e.g. 'layers.2.q'"):
        match_modules(["layers.2.q"], have)
    with pytest.raises(CheckpointError, match="match several modules"):
        match_modules(["q"], {"a.q", "b.q"})
    assert match_modules(["q", "z"], {"a.q"}, partial=True) == ({"q": "a.q"}, ["z"])
    assert parse_prefix("a=b") == ("a", "b") and parse_prefix("b") == ("", "b")


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    for bad in ("", "5XB", "-1GB", 0):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)
