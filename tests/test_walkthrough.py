"""README's "A real model, end to end" section, run as written: extract, resize, convert and merge
on a tiny Llama saved by transformers, then the Python block, whose logits are checked here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import rslora  # noqa: E402
import rslora.cli  # noqa: E402

import hf_models as hm  # noqa: E402

# transformers/PEFT deprecation notices about their own internals are not ours to fail on.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(kind: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- walkthrough:{kind} -->\n```{kind}\n(.*?)```", text, re.S)
    assert m, f"README has no walkthrough {kind} block"
    return m.group(1)


def test_readme_walkthrough_runs_and_matches_the_tuned_model(tmp_path, monkeypatch, capsys):
    model = hm.build("llama")
    tuned, changed = hm.low_rank_tuned(model, r"proj", rank=2)
    hm.save(model, tmp_path / "base")
    hm.save(tuned, tmp_path / "tuned")
    monkeypatch.chdir(tmp_path)

    lines = [ln.split("#")[0].strip() for ln in _block("bash").splitlines()]
    commands = [shlex.split(ln) for ln in lines if ln]
    assert [c[:2] for c in commands] == [["rslora", "extract"], ["rslora", "resize"],
                                         ["rslora", "convert"], ["rslora", "merge"]]
    for argv in commands:
        assert rslora.cli.main(argv[1:] + ["-q"] * (argv[1] in ("extract", "resize"))) == 0, argv

    ns: dict = {}
    exec(compile(_block("python"), "README walkthrough", "exec"), ns)  # noqa: S102
    tuned_logits, merged, served = ns["tuned"], ns["merged"], ns["served"]
    base_logits = hm.outputs(model, ns["ids"])
    assert (tuned_logits - base_logits).abs().max() > 1e-2  # the fine-tune changed the model
    assert (merged - tuned_logits).abs().max() <= 1e-4
    assert (served - merged).abs().max() <= 1e-4
    assert "merged vs tuned" in capsys.readouterr().out
    # resize found the fine-tune's true rank in every module it changed
    ad = rslora.load_adapter(tmp_path / "adapter-std")
    assert len(ad.modules) == len(changed)
    assert {m.r for m in ad.modules.values()} == {2}
