"""``extract --modules-to-save``: modules saved whole beside the LoRA factors (a new head, a
fully trained lm_head or norm), checked against transformers + PEFT by logits."""

from __future__ import annotations

import copy
import json

import pytest

import rslora
import rslora.cli
from rslora.adapters.extract import extract_adapter

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")
import hf_models as hm  # noqa: E402

# transformers and PEFT warn about their own internals (deprecations between their versions);
# the adapter's keys are checked explicitly instead.
pytestmark = pytest.mark.filterwarnings("ignore")


def cli(*args) -> int:
    return rslora.cli.main([str(a) for a in args])


def _full_change(model, names, seed=7):
    """Move the named parameters by a full-rank amount, as training a whole module does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _keys(folder) -> set:
    with rslora.Checkpoint(folder / "adapter_model.safetensors") as ck:
        return set(ck.keys())


def test_trained_lm_head_and_norm_reproduced_by_peft_and_by_merge(tmp_path):
    base = hm.build("llama")
    hm.save(base, tmp_path / "base")
    tuned, changed = hm.low_rank_tuned(base, r"q_proj|v_proj", rank=2)
    _full_change(tuned, {"lm_head.weight", "model.norm.weight"})
    hm.save(tuned, tmp_path / "tuned", shard="30KB")
    want = hm.outputs(tuned)

    # without: the LoRA part alone misses the head and the norm (and says so)
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "lora",
               "--rank", "2", "-q") == 0
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert (hm.outputs(pm) - want).abs().max().item() > 0.05

    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad",
               "--rank", "2", "-q", "--modules-to-save", "lm_head,model.norm") == 0
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head", "model.norm"]
    assert len(cfg["target_modules"]) == len(changed) and "lm_head" not in cfg["target_modules"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    assert _keys(tmp_path / "ad") == set(peft.get_peft_model_state_dict(pm))
    assert {"base_model.model.lm_head.weight", "base_model.model.model.norm.weight"} \
        <= _keys(tmp_path / "ad")
    assert (hm.outputs(pm) - want).abs().max().item() <= 1e-4

    # merged by rslora, loaded by transformers: the saved modules replace the base's
    assert cli("merge", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "merged", "-q") == 0
    out = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (hm.outputs(out) - want).abs().max().item() <= 1e-4


def test_new_classification_head_only_in_tuned(tmp_path, capsys):
    """A classifier fine-tuned from a causal LM: ``score`` exists only in TUNED, ``lm_head`` only
    in BASE. PEFT's recipe (modules_to_save=["score"]) loaded on the base folder as a
    sequence classifier gives TUNED's logits."""
    base = hm.build("llama")
    hm.save(base, tmp_path / "base")
    torch.manual_seed(11)
    cls = tf.LlamaForSequenceClassification(hm.config("llama")).eval()
    cls.model.load_state_dict(base.model.state_dict())
    tuned, changed = hm.low_rank_tuned(cls, r"k_proj|o_proj", rank=2)
    hm.save(tuned, tmp_path / "tuned")

    capsys.readouterr()
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "x",
               "--rank", "2", "-q") == 2
    err = capsys.readouterr().err
    assert "only in" in err and "--modules-to-save" in err and not (tmp_path / "x").exists()

    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank",
               "2", "-q", "--modules-to-save", "score", "--on-missing", "skip") == 0
    assert "lm_head.weight" in capsys.readouterr().err  # reported as left out
    fresh = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "ad").eval()
    assert _keys(tmp_path / "ad") == set(peft.get_peft_model_state_dict(pm))
    d = (hm.outputs(pm) - hm.outputs(tuned)).abs().max().item()
    assert d <= 1e-4, d


def test_with_biases_on_gpt2_conv1d(tmp_path):
    """GPT-2 (Conv1D layers) with trained biases and a trained final norm (weight and bias):
    --biases and --modules-to-save name the norm's bias alike, and it is saved once."""
    base = hm.build("gpt2_untied")
    hm.save(base, tmp_path / "base")
    tuned, _ = hm.low_rank_tuned(base, r"c_attn|mlp\.c_fc", rank=2, biases=True)
    _full_change(tuned, {"transformer.ln_f.weight"})
    hm.save(tuned, tmp_path / "tuned")
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank",
               "2", "-q", "--biases", "--modules-to-save", "transformer.ln_f") == 0
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    # PEFT's bias="all" also lists the wrapper's inner copies of the saved module's bias
    # (".modules_to_save.bias", ".original_module.bias"), which its loader does not need
    wrapper = (".modules_to_save.", ".original_module.")
    assert _keys(tmp_path / "ad") == {k for k in peft.get_peft_model_state_dict(pm)
                                      if not any(w in k for w in wrapper)}
    assert "base_model.model.transformer.ln_f.bias" in _keys(tmp_path / "ad")
    d = (hm.outputs(pm) - hm.outputs(tuned)).abs().max().item()
    assert d <= 1e-4, d


def test_refusals(tmp_path, capsys):
    base = hm.build("llama")
    hm.save(base, tmp_path / "base")
    tuned, _ = hm.low_rank_tuned(base, r"q_proj", rank=2)
    hm.save(tuned, tmp_path / "tuned")
    for names, want in (("norm", "no module 'norm' in TUNED (did you mean 'model.norm'?)"),
                        ("head", "no module 'head' in TUNED"),
                        ("norm_f", "no module 'norm_f' in TUNED"),
                        ("model.norms", "no module 'model.norms' in TUNED")):
        capsys.readouterr()
        assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "x",
                   "--rank", "2", "-q", "--modules-to-save", names) == 2
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1, (names, err)
        assert not (tmp_path / "x").exists()
    # a suffix that is not a full name gets the full one suggested
    capsys.readouterr()
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "x", "--rank",
               "2", "-q", "--modules-to-save", "layers.0.mlp") == 2
    assert "did you mean 'model.layers.0.mlp'" in capsys.readouterr().err
    for bad in ("lm_head", ["lm_head", ""], [".lm_head"], [3]):
        with pytest.raises(ValueError, match="modules_to_save must be a list of module names"):
            extract_adapter(tmp_path / "base", tmp_path / "tuned", tmp_path / "x", rank=2,
                            modules_to_save=bad)
    assert not (tmp_path / "x").exists()


def test_a_name_peft_would_match_twice_is_refused(tmp_path, capsys):
    """PEFT picks modules_to_save by str.endswith: a module named like the end of another's
    name would bring that one along, so the name is refused with the other named."""
    from safetensors.numpy import save_file
    import numpy as np

    rng = np.random.default_rng(0)
    keys = {"layers.0.q.weight": (8, 8), "head.weight": (3, 8), "cls.head.weight": (3, 8)}
    for name, shift in (("base", 0.0), ("tuned", 0.5)):
        (tmp_path / name).mkdir()
        save_file({k: (rng.standard_normal(s) + shift).astype(np.float32)
                   for k, s in keys.items()}, str(tmp_path / name / "model.safetensors"))
    capsys.readouterr()
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "x", "--rank",
               "2", "-q", "--modules-to-save", "head") == 2
    err = capsys.readouterr().err
    assert "'head' would also select 'cls.head'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ok", "--rank",
               "2", "-q", "--modules-to-save", "cls.head") == 0
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["cls.head"] and "cls.head" not in cfg["target_modules"]
