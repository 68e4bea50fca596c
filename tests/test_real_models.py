"""rslora on real Hugging Face model folders and PEFT adapters, checked by logits both ways:
PEFT adapters merged by ``rslora merge`` vs PEFT's ``merge_and_unload``; adapters written by
``rslora extract`` loaded by ``PeftModel.from_pretrained`` vs the tuned model; merged folders
loaded by ``from_pretrained``. Tiny models built from configs (tests/hf_models.py): no downloads."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest

import rslora
from rslora._files import MANIFEST
import rslora.cli

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")
import hf_models as hm  # noqa: E402

# PEFT and transformers warn about things these tests do on purpose (fan_in_fan_out flips, tied
# targets); missing/unexpected keys are checked explicitly instead of through warnings.
pytestmark = pytest.mark.filterwarnings("ignore")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
GPT2_ALL = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]

# id -> (arch, LoraConfig kwargs, save kwargs, where the adapter is made: "head" | "bare")
MERGE_CASES = {
    "llama-rslora-patterns": ("llama", dict(target_modules=ATTN + MLP, r=4, lora_alpha=8,
                              use_rslora=True, rank_pattern={"k_proj": 2, "layers.1.up_proj": 6},
                              alpha_pattern={"down_proj": 3}), {}, "head"),
    "llama-lm_head-embed-mts-sharded": ("llama", dict(target_modules=["q_proj", "lm_head",
                                        "embed_tokens"], modules_to_save=["v_proj"], r=4,
                                        lora_alpha=16), dict(shard="40KB"), "head"),
    "llama_tied-lm_head-embed": ("llama_tied", dict(target_modules=["o_proj", "lm_head",
                                 "embed_tokens"], r=3, lora_alpha=6, use_rslora=True), {}, "head"),
    "llama_tied-lm_head-only": ("llama_tied", dict(target_modules=["lm_head", "up_proj"], r=2,
                                lora_alpha=4), dict(shard="30KB"), "head"),
    "qwen2-bias_lora_only-sharded": ("qwen2", dict(target_modules=ATTN, bias="lora_only", r=4,
                                     lora_alpha=8), dict(shard="30KB"), "head"),
    "qwen2-fp16": ("qwen2", dict(target_modules=ATTN + MLP, r=4, lora_alpha=8, use_rslora=True),
                   dict(dtype=torch.float16), "head"),
    "gpt2-conv1d+lm_head+wte-bias_all": ("gpt2", dict(target_modules=GPT2_ALL + ["lm_head", "wte"],
                                         bias="all", r=4, lora_alpha=8), dict(shard="40KB"), "head"),
    "gpt2_untied-square_conv_only": ("gpt2_untied", dict(target_modules=["attn.c_proj"], r=4,
                                     lora_alpha=8, use_rslora=True), {}, "head"),
    "gpt2-bare-adapter-on-head-folder": ("gpt2", dict(target_modules=GPT2_ALL, r=2, lora_alpha=2,
                                         modules_to_save=["ln_f"]), {}, "bare"),
    "bert-bare-adapter-on-hub-folder": ("bert", dict(target_modules=["query", "value", "dense",
                                        "word_embeddings"], r=4, lora_alpha=4, bias="all"), {},
                                        "bare"),
    "gpt2-patterns-rslora": ("gpt2", dict(target_modules=GPT2_ALL, r=4, lora_alpha=8,
                             use_rslora=True, rank_pattern={"c_fc": 2, "h.1.attn.c_attn": 6},
                             alpha_pattern={r"h\.0\.mlp\.c_proj": 5}), {}, "head"),
    "bert-mts-fp16": ("bert", dict(target_modules=["query", "key", "intermediate.dense"],
                      modules_to_save=["cls.predictions.transform.dense"], r=2, lora_alpha=8),
                      dict(dtype=torch.float16), "head"),
    "qwen2-bias_all-mts-lm_head": ("qwen2", dict(target_modules=["v_proj", "down_proj"],
                                   modules_to_save=["lm_head"], bias="all", r=4, lora_alpha=4,
                                   use_rslora=True), dict(shard="20KB"), "head"),
    "llama-bf16": ("llama", dict(target_modules=ATTN + MLP + ["lm_head"], r=4, lora_alpha=8,
                   use_rslora=True), dict(dtype=torch.bfloat16), "head"),
    "gpt2-bf16": ("gpt2", dict(target_modules=GPT2_ALL, r=4, lora_alpha=8),
                  dict(dtype=torch.bfloat16, shard="20KB"), "head"),
}

#: measured maxima, printed by the last test (pytest -s) for the report
MEASURED: dict = {}


def cli(*args) -> int:
    return rslora.cli.main([str(a) for a in args])


def _peft_merge(arch, lora_kwargs, save_kwargs, where, tmp_path):
    """Base folder, PEFT adapter folder, and PEFT's merge_and_unload output for the case."""
    model = hm.build(arch)
    dtype = save_kwargs.get("dtype")
    if dtype is not None:
        model = model.to(dtype)
    hm.save(model, tmp_path / "base", shard=save_kwargs.get("shard"))
    target = model if where == "head" else model.base_model
    lcfg = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    pm = peft.get_peft_model(copy.deepcopy(target) if where == "head" else target, lcfg)
    hm.perturb_trained(pm)
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload()
    reference = merged if where == "head" else model  # the bare part was merged in place
    return reference


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_peft_adapter_merged_by_rslora_matches_merge_and_unload(case, tmp_path, capsys):
    arch, lora_kwargs, save_kwargs, where = MERGE_CASES[case]
    reference = _peft_merge(arch, lora_kwargs, save_kwargs, where, tmp_path)
    capsys.readouterr()
    assert cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", "-q") == 0
    tied_target = hm.config(arch).tie_word_embeddings and "lm_head" in lora_kwargs["target_modules"]
    assert ("tied to" in capsys.readouterr().err) == tied_target  # said when it happens
    base_files = sorted(os.listdir(tmp_path / "base"))
    # config, tokenizer, shards, index; plus the manifest of what rslora wrote (for --force)
    assert sorted(set(os.listdir(tmp_path / "out")) - {MANIFEST}) == base_files
    out = hm.head_class(arch).from_pretrained(tmp_path / "out").eval()
    dtype = save_kwargs.get("dtype") or torch.float32
    assert next(out.parameters()).dtype == dtype
    # every tensor against PEFT's merged model
    ref_sd = reference.state_dict()
    worst_w = 0.0
    for k, v in out.state_dict().items():
        r = ref_sd[k]
        diff = (v.float() - r.float()).abs()
        if dtype == torch.float32:
            tol = 1e-5 * (1 + r.abs())
        else:  # PEFT rounds the delta to 16 bits and then the sum; rslora rounds the sum once
            ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
            tol = ulp * r.float().abs() + 1e-6
        assert (diff <= tol).all(), (k, diff.max().item())
        worst_w = max(worst_w, diff.max().item())
    if dtype == torch.float32:
        got, want = hm.outputs(out), hm.outputs(reference)
    else:  # both 16-bit merges saved and read back the same way, run in float32
        reference.save_pretrained(tmp_path / "ref")
        load32 = lambda d: hm.head_class(arch).from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
        got, want = hm.outputs(load32(tmp_path / "out")), hm.outputs(load32(tmp_path / "ref"))
    base = hm.head_class(arch).from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    moved = (hm.outputs(base) - want).abs().max().item()
    d = (got - want).abs().max().item()
    MEASURED[f"merge {case}"] = (d, worst_w)
    assert moved > 0.01, moved  # the adapter really changes the model
    assert d <= (1e-4 if dtype == torch.float32 else 0.02 * moved), (d, moved)


def test_tied_checkpoint_that_stores_both_lm_head_and_embedding(tmp_path, capsys):
    """Older tied checkpoints store lm_head.weight too; transformers re-ties on load, so the
    lm_head update must reach the embedding as well (PEFT changes the shared weight)."""
    from safetensors.torch import load_file, save_file

    reference = _peft_merge("llama_tied", dict(target_modules=["lm_head", "q_proj"], r=2,
                                               lora_alpha=4), {}, "head", tmp_path)
    f = tmp_path / "base" / "model.safetensors"
    sd = load_file(f)
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, f, metadata={"format": "pt"})
    capsys.readouterr()
    assert cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", "-q") == 0
    assert "tied to model.embed_tokens" in capsys.readouterr().err
    out = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (hm.outputs(out) - hm.outputs(reference)).abs().max().item() <= 1e-4


def test_merge_prefix_forced_and_bare_base_folder(tmp_path):
    """An adapter made on LlamaForCausalLM (model.layers...) merged into a bare LlamaModel
    folder (layers...): found by suffix, or forced with --prefix; a wrong --prefix is refused."""
    model = hm.build("llama")
    hm.save(model.model, tmp_path / "base")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        target_modules=ATTN, r=2, lora_alpha=4, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    want = hm.outputs(pm.merge_and_unload().model)
    for i, extra in enumerate([[], ["--prefix", "model.="]]):
        assert cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / f"o{i}", "-q",
                   *extra) == 0
        out = tf.AutoModel.from_pretrained(tmp_path / f"o{i}").eval()
        assert (hm.outputs(out) - want).abs().max().item() <= 1e-4
    assert cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "bad", "-q",
               "--prefix", "transformer.=") == 2
    assert not (tmp_path / "bad").exists()


def test_merge_dtype_and_reshard_convert_every_tensor(tmp_path):
    reference = _peft_merge("qwen2", dict(target_modules=ATTN, r=4, lora_alpha=8), {}, "head",
                            tmp_path)
    assert cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", "-q",
               "--dtype", "bfloat16", "--max-shard-size", "8KB") == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with rslora.Checkpoint(tmp_path / "out") as ck:
        assert {ck.dtype(k) for k in ck.keys()} == {"BF16"}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    out = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert next(out.parameters()).dtype == torch.bfloat16
    ref = copy.deepcopy(reference).to(torch.bfloat16).state_dict()
    for k, v in out.state_dict().items():  # merged in float32, rounded once
        assert ((v.float() - ref[k].float()).abs() <= 2.0 ** -8 * ref[k].float().abs() + 1e-6).all()


# -- extraction: adapters rslora writes, loaded by PEFT ------------------------------------------
# id -> (arch, weights to move (regex on parameter names), tuned saved bare?, extra CLI args)
EXTRACT_CASES = {
    "llama-all-linear-embed-lm_head": ("llama", r"proj|embed_tokens|lm_head", False, []),
    "qwen2-attn": ("qwen2", r"self_attn", False, ["--rule", "standard", "--alpha", "16"]),
    "gpt2_untied-conv1d-wpe-lm_head": ("gpt2_untied", r"c_attn|c_proj|c_fc|wpe|lm_head", False, []),
    "gpt2-tied-conv1d": ("gpt2", r"c_attn|c_fc", False, ["--dtype", "float32"]),
    "gpt2-conv1d-trained-biases": ("gpt2", r"c_attn|mlp.c_proj", False, ["--biases"]),
    "qwen2-trained-biases": ("qwen2", r"q_proj|k_proj|down_proj", False, ["--biases"]),
    "bert-hub-base-vs-bare-tuned": ("bert", r"query|value|attention.output.dense|word_emb", True,
                                    ["--on-missing", "skip"]),
}


def _peft_keys(model) -> set:
    """The keys PEFT saves for this adapter (LoRA factors; not the full base embedding copies
    that save_embedding_layers adds, which an extracted adapter has no need of)."""
    return set(peft.get_peft_model_state_dict(model, save_embedding_layers=False))


@pytest.mark.parametrize("case", list(EXTRACT_CASES))
def test_extracted_adapter_loads_in_peft_and_reproduces_tuned(case, tmp_path):
    arch, pattern, bare_tuned, extra = EXTRACT_CASES[case]
    base = hm.build(arch)
    hm.save(base, tmp_path / "base")
    base_part = base.base_model if bare_tuned else base
    tuned, changed = hm.low_rank_tuned(base_part, pattern, rank=2, biases="--biases" in extra)
    hm.save(tuned, tmp_path / "tuned", shard="30KB")
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad",
               "--rank", "2", "-q", *extra) == 0
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert len(cfg["target_modules"]) == len(changed)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base_part), tmp_path / "ad").eval()
    with rslora.Checkpoint(tmp_path / "ad" / "adapter_model.safetensors") as ck:
        assert set(ck.keys()) == _peft_keys(pm)  # no missing, no unexpected keys
    layers = [m for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)
              and ("default" in m.lora_A or "default" in m.lora_embedding_A)]
    assert len(layers) == len(changed)
    want = hm.outputs(tuned)
    d_peft = (hm.outputs(pm) - want).abs().max().item()
    moved = (hm.outputs(base_part) - want).abs().max().item()
    # merged by rslora, loaded by transformers
    assert cli("merge", tmp_path / ("tuned" if bare_tuned else "base"), tmp_path / "ad", "-o",
               tmp_path / "merged", "-q") == 0 if not bare_tuned else True
    MEASURED[f"extract {case}"] = (d_peft, moved)
    assert moved > 0.05  # the tuned model is really different
    assert d_peft <= 1e-4, (d_peft, moved)
    if not bare_tuned:
        out = hm.head_class(arch).from_pretrained(tmp_path / "merged").eval()
        d_merged = (hm.outputs(out) - want).abs().max().item()
        assert d_merged <= 1e-4, d_merged


def test_extract_with_prefix_targets_the_bare_model(tmp_path):
    """A hub-layout BERT (``bert.`` keys) tuned and saved with its head; ``--prefix =bert.``
    writes an adapter for a bare BertModel."""
    base = hm.build("bert")
    tuned, changed = hm.low_rank_tuned(base, r"bert\..*(query|key)", rank=2)
    hm.save(base, tmp_path / "base")
    hm.save(tuned, tmp_path / "tuned")
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank",
               "2", "-q", "--prefix", "=bert.") == 0
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base.bert), tmp_path / "ad").eval()
    with rslora.Checkpoint(tmp_path / "ad" / "adapter_model.safetensors") as ck:
        assert set(ck.keys()) == _peft_keys(pm) and len(ck.keys()) == 2 * len(changed)
    d = (hm.outputs(pm) - hm.outputs(tuned.bert)).abs().max().item()
    assert d <= 1e-4


# -- refusals: one line, exit 2, no output ---------------------------------------------------------
def test_refusals(tmp_path, capsys):
    llama, qwen = hm.build("llama"), hm.build("qwen2")
    hm.save(llama, tmp_path / "llama")
    hm.save(qwen, tmp_path / "qwen2")
    capsys.readouterr()
    assert cli("extract", tmp_path / "llama", tmp_path / "qwen2", "-o", tmp_path / "x", "--rank",
               "2", "-q") == 2
    err = capsys.readouterr().err
    assert "'llama' model and TUNED a 'qwen2' model" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()

    # DoRA
    pm = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(target_modules=["q_proj"],
                                                                   use_dora=True))
    pm.save_pretrained(tmp_path / "dora")
    capsys.readouterr()
    assert cli("merge", tmp_path / "llama", tmp_path / "dora", "-o", tmp_path / "x", "-q") == 2
    assert "DoRA" in capsys.readouterr().err and not (tmp_path / "x").exists()

    # adapter for another model size: shape mismatch names the module
    gpt = hm.build("gpt2")
    hm.save(gpt, tmp_path / "gpt2")
    pm = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "llama_ad")
    capsys.readouterr()
    assert cli("merge", tmp_path / "gpt2", tmp_path / "llama_ad", "-o", tmp_path / "x", "-q") == 2
    err = capsys.readouterr().err
    assert "no weight in the base" in err and "q_proj" in err and not (tmp_path / "x").exists()

    # square Conv1D without config.json: cannot be decided, so refused (not guessed)
    pm = peft.get_peft_model(copy.deepcopy(gpt), peft.LoraConfig(target_modules=["attn.c_proj",
                                                                                  "lm_head"]))
    pm.save_pretrained(tmp_path / "gpt_ad")
    (tmp_path / "weights_only").mkdir()
    shutil.copyfile(tmp_path / "gpt2" / "model.safetensors",
                    tmp_path / "weights_only" / "model.safetensors")
    capsys.readouterr()
    assert cli("merge", tmp_path / "weights_only" / "model.safetensors", tmp_path / "gpt_ad", "-o",
               tmp_path / "x", "-q") == 2
    err = capsys.readouterr().err
    assert "attn.c_proj" in err and "square" in err and not (tmp_path / "x").exists()
    # ... and with config.json beside it (model_type gpt2), PEFT's choice is known
    assert cli("merge", tmp_path / "gpt2" / "model.safetensors", tmp_path / "gpt_ad", "-o",
               tmp_path / "x", "-q") == 0


def test_zz_report_measured():
    """Prints the maxima measured above (run with -s), for the record."""
    for k, (d, other) in sorted(MEASURED.items()):
        print(f"{k:50s} max|logit diff| {d:.3e}   ({'max|w diff|' if k.startswith('merge') else 'tuned-base'} {other:.3e})")


def test_merge_adapter_in_memory_gpt2_state_dict(tmp_path):
    """The in-memory API on a GPT-2 state dict: non-square Conv1D weights are recognised from
    their biases; the square attn.c_proj needs model_type (config=) and is refused without it."""
    model = hm.build("gpt2_untied")
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        target_modules=["c_attn", "c_fc", "lm_head"], r=3, lora_alpha=6, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "a1")
    want = pm.merge_and_unload().state_dict()
    got = rslora.merge_adapter({k: v.copy() for k, v in sd.items()}, tmp_path / "a1")
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        target_modules=["attn.c_proj", "lm_head"], r=3, lora_alpha=6, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "a2")
    want = pm.merge_and_unload().state_dict()
    with pytest.raises(rslora.CheckpointError, match="attn.c_proj.*square"):
        rslora.merge_adapter({k: v.copy() for k, v in sd.items()}, tmp_path / "a2")
    got = rslora.merge_adapter({k: v.copy() for k, v in sd.items()}, tmp_path / "a2",
                               config={"model_type": "gpt2"})
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
