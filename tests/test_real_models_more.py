"""rslora's adapter tools on more transformers architectures than test_real_models.py: fused
projections (Phi-3, GPT-NeoX, Falcon, Bloom), tied and scaled embeddings (Gemma, Gemma2, Gemma3,
OPT), encoder-decoders (T5, BART), MoE (Mixtral, Qwen2-MoE, Qwen3-MoE, whose experts
transformers 5 fuses into 3-D parameters on load and splits again on save), in float32, float16
and bfloat16, sharded. Checked by logits against transformers + PEFT and a float64 rank-r reference; tiny
models built from configs (nothing downloaded)."""

from __future__ import annotations

import copy
import json

import pytest

import rslora.cli

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")
import hf_models as hm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

V = 64
SEQ2SEQ = ("t5", "bart")
TIED = ("falcon", "bloom", "gemma", "gemma2", "opt", "t5", "bart")  # lm_head shares the embedding
# Learned positional embeddings whose forward takes no token ids: PEFT cannot run their LoRA
# unmerged (it merges them fine).
POSITIONAL = ("opt", "bart")
_CONFIGS = {
    "phi3": ("Phi3Config", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                num_key_value_heads=2, num_hidden_layers=1, pad_token_id=0,
                                max_position_embeddings=32, original_max_position_embeddings=32)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                       num_hidden_layers=1, max_position_embeddings=32)),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                                    num_hidden_layers=1, new_decoder_architecture=True)),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_head=4, n_layer=1)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, num_hidden_layers=1,
                                  max_position_embeddings=32)),
    "gemma2": ("Gemma2Config", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
                                    max_position_embeddings=32)),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=32, intermediate_size=48,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        num_hidden_layers=2, max_position_embeddings=32,
                                        tie_word_embeddings=False)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=48, num_attention_heads=4, num_hidden_layers=1,
                              word_embed_proj_dim=32, max_position_embeddings=32)),
    "t5": ("T5Config", dict(d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1,
                            num_heads=4, decoder_start_token_id=0)),
    "bart": ("BartConfig", dict(d_model=32, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=4, decoder_attention_heads=4,
                                encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)),
    "mixtral": ("MixtralConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=1,
                                      num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=32, intermediate_size=48,
                                         moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=1, num_experts=4,
                                         num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=32, intermediate_size=48,
                                         moe_intermediate_size=16, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=1, num_experts=4,
                                         num_experts_per_tok=2, head_dim=8)),
}


def config(arch):
    name, kw = _CONFIGS[arch]
    if not hasattr(tf, name):
        pytest.skip(f"transformers {tf.__version__} has no {name}")
    return getattr(tf, name)(vocab_size=V, **kw)


def head(arch):
    return tf.AutoModelForSeq2SeqLM if arch in SEQ2SEQ else tf.AutoModelForCausalLM


def build(arch, dtype=None):
    torch.manual_seed(0)
    model = head(arch).from_config(config(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model if dtype is None else model.to(dtype)


def load(arch, folder):
    return head(arch).from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, arch):
    x = hm.ids()
    kw = {"decoder_input_ids": x[:, :5]} if arch in SEQ2SEQ else {}
    return model(input_ids=x, **kw).logits.float()


def cli(*args) -> int:
    return rslora.cli.main([str(a) for a in args])


def _blocks(name, p):
    """The 2-D matrices a checkpoint stores for parameter ``p``: itself, or per expert of a fused
    3-D expert parameter (gate_up_proj in its two halves, gate and up)."""
    if p.ndim == 2:
        return [p]
    per_expert = list(p)
    if name.endswith("gate_up_proj"):
        return [h for e in per_expert for h in e.chunk(2, dim=0)]
    return per_expert


def tune(model, seed=5):
    """(tuned, reference): every weight moved by a rank-2 update plus a small full-rank change,
    as fine-tuning does; the reference keeps, per stored matrix, the float64 best rank-2 part of
    the change (what a rank-2 adapter should give)."""
    g = torch.Generator().manual_seed(seed)
    tuned, ref = copy.deepcopy(model), copy.deepcopy(model)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.ndim < 2:
                continue
            for w, r in zip(_blocks(name, p), _blocks(name, ref_params[name])):
                u = torch.randn(w.shape[0], 2, generator=g)
                v = torch.randn(2, w.shape[1], generator=g)
                d = 0.3 * (u @ v) / w.shape[1] ** 0.5 + 1e-3 * torch.randn(w.shape, generator=g)
                w.add_(d)
                U, S, Vh = torch.linalg.svd(d.double(), full_matrices=False)
                r.add_(((U[:, :2] * S[:2]) @ Vh[:2]).float())
    return tuned, ref


# -- rslora extract, loaded by PEFT -------------------------------------------------------------
# id -> (arch, save dtype, max_shard_size, extra CLI args)
EXTRACT = {
    "phi3-fused-qkv-gate_up": ("phi3", None, None, []),
    "gpt_neox-embed_out": ("gpt_neox", None, None, []),
    "falcon-fused-tied": ("falcon", None, "20KB", []),
    "bloom-fused-tied-bf16": ("bloom", torch.bfloat16, None, []),
    "gemma-scaled-tied-fp16-sharded": ("gemma", torch.float16, "20KB", []),
    "gemma2-tied": ("gemma2", None, None, ["--rule", "standard", "--alpha", "4"]),
    "gemma3-scaled-embedding-untied": ("gemma3", None, None, []),  # PEFT scales its LoRA too
    "opt-positions-tied": ("opt", None, None, []),
    "t5-relative_attention_bias": ("t5", None, "30KB", []),
    "bart-positions-tied": ("bart", None, None, []),
    # PEFT fuses per-expert LoRA into the 3-D experts with r and lora_alpha doubled: right for
    # alpha/r only (see test_moe_rslora_note)
    "mixtral-experts-router": ("mixtral", None, "40KB", ["--rule", "standard"]),
    "qwen3_moe-experts-bf16": ("qwen3_moe", torch.bfloat16, None, ["--rule", "standard"]),
}


@pytest.mark.parametrize("case", list(EXTRACT))
def test_extract_loaded_by_peft_and_merged(case, tmp_path, capsys):
    arch, dtype, shard, extra = EXTRACT[case]
    kw = {} if shard is None else {"max_shard_size": shard}
    build(arch, dtype).save_pretrained(tmp_path / "base", **kw)
    base = load(arch, tmp_path / "base")
    tuned, ref = tune(base)
    (tuned if dtype is None else copy.deepcopy(tuned).to(dtype)).save_pretrained(
        tmp_path / "tuned", **kw)
    if dtype is not None:  # what TUNED holds, and its rank-2 part, after rounding
        tuned16 = load(arch, tmp_path / "tuned")
        base_sd, ref_sd = base.state_dict(), ref.state_dict()
        with torch.no_grad():
            for k, v in tuned16.state_dict().items():
                if v.ndim >= 2:
                    ref_sd[k].copy_(base_sd[k] + _rank2(k, v - base_sd[k]))
        tuned = tuned16
    capsys.readouterr()
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank",
               "2", "-q", *extra) == 0
    err = capsys.readouterr().err
    assert ("cannot run it unmerged" in err) == (arch in POSITIONAL)
    assert ("embed_out as lm_head" in err) == (arch == "gpt_neox")  # transformers 5's name
    want = logits(ref, arch)
    moved = (logits(base, arch) - want).abs().max().item()
    assert moved > 0.05
    scale = want.abs().max().item()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    n_lora = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules())
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert n_lora >= len(cfg["target_modules"]) or "mixtral" in arch or "moe" in arch
    if arch not in TIED and arch not in POSITIONAL:  # PEFT can apply it unmerged
        d = (logits(pm, arch) - want).abs().max().item()
        assert d <= 1e-4 * scale, (d, moved)
    d = (logits(pm.merge_and_unload(), arch) - want).abs().max().item()
    assert d <= 1e-4 * scale, (d, moved)
    # rslora merge of the same adapter, read back by transformers
    assert cli("merge", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "m", "-q") == 0
    merged = load(arch, tmp_path / "m")
    tol = 1e-4 * scale if dtype is None else 0.02 * moved
    d = (logits(merged, arch) - want).abs().max().item()
    assert d <= tol, (d, moved)


def _rank2(name, d):
    out = d.clone()
    for blk, o in zip(_blocks(name, d), _blocks(name, out)):
        U, S, Vh = torch.linalg.svd(blk.double(), full_matrices=False)
        o.copy_(((U[:, :2] * S[:2]) @ Vh[:2]).float())
    return out


@pytest.mark.parametrize("arch,pattern,extra", [
    ("bart", r"proj|fc", ["--biases"]),  # final_logits_bias: a top-level tensor, no module path
    ("bloom", r"query_key_value|dense", ["--biases"]),
    ("gpt_neox", r"query_key_value|dense|lm_head", ["--biases", "--modules-to-save", "embed_out"]),
    ("gpt_neox", r"query_key_value|lm_head", ["--modules-to-save", "lm_head", "--biases"]),
])
def test_extract_biases_and_modules_to_save(arch, pattern, extra, tmp_path, capsys):
    build(arch).save_pretrained(tmp_path / "base")
    base = load(arch, tmp_path / "base")
    tuned, _ = hm.low_rank_tuned(base, pattern, rank=2, biases=True)
    tuned.save_pretrained(tmp_path / "tuned")
    capsys.readouterr()
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank",
               "2", "-q", *extra) == 0
    assert "same model" not in capsys.readouterr().err  # no tensor taken for a stranger's
    if "--modules-to-save" in extra:  # as PEFT names the module on transformers 5
        cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
        assert cfg["modules_to_save"] == ["lm_head"] and "lm_head" not in cfg["target_modules"]
    want = logits(tuned, arch)
    scale = want.abs().max().item()
    assert (logits(base, arch) - want).abs().max().item() > 0.05
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    assert (logits(pm.merge_and_unload(), arch) - want).abs().max().item() <= 1e-4 * scale
    assert cli("merge", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "m", "-q") == 0
    assert (logits(load(arch, tmp_path / "m"), arch) - want).abs().max().item() <= 1e-4 * scale


# -- PEFT adapters: rslora merge vs merge_and_unload; resize, convert vs PEFT --------------------
ALL_LINEAR = dict(
    phi3=["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head", "embed_tokens"],
    gpt_neox=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head", "embed_in"],
    falcon=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    bloom=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "word_embeddings"],
    gemma=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "embed_tokens", "lm_head"],
    opt=["q_proj", "v_proj", "out_proj", "fc1", "fc2", "embed_tokens", "lm_head"],
    t5=["q", "k", "v", "o", "wi", "wo", "relative_attention_bias", "shared"],
    bart=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
)
# id -> (arch, LoraConfig kwargs, save dtype[, max_shard_size])
PEFT_CASES = {
    "phi3-fused-patterns-rslora": ("phi3", dict(target_modules=ALL_LINEAR["phi3"], use_rslora=True,
                                   rank_pattern={"qkv_proj": 2}, alpha_pattern={"gate_up_proj": 3}),
                                   None),
    "gpt_neox-lm_head-bias_all": ("gpt_neox", dict(target_modules=ALL_LINEAR["gpt_neox"],
                                  bias="all"), None),
    "gpt_neox-mts-lm_head-sharded": ("gpt_neox", dict(target_modules=["query_key_value"],
                                     modules_to_save=["lm_head"]), None, "20KB"),
    "falcon-bias_lora_only-rslora": ("falcon", dict(target_modules=ALL_LINEAR["falcon"],
                                     bias="lora_only", use_rslora=True), None),
    "bloom-embed-bias_all-bf16": ("bloom", dict(target_modules=ALL_LINEAR["bloom"], bias="all"),
                                  torch.bfloat16),
    "gemma-tied-lm_head-embed-rslora": ("gemma", dict(target_modules=ALL_LINEAR["gemma"],
                                        use_rslora=True), None),
    "gemma2-patterns-fp16": ("gemma2", dict(target_modules=["q_proj", "down_proj", "lm_head"],
                             rank_pattern={"layers.1.q_proj": 2}), torch.float16),
    "opt-tied-bias_lora_only": ("opt", dict(target_modules=ALL_LINEAR["opt"], bias="lora_only"),
                                None),
    "t5-relative_attention_bias-shared": ("t5", dict(target_modules=ALL_LINEAR["t5"],
                                          use_rslora=True), None),
    "bart-bias_all": ("bart", dict(target_modules=ALL_LINEAR["bart"], bias="all"), None),
    # both stacks' embed_tokens are the one `shared` weight, saved once under that name
    "t5-embed_tokens-both-stacks": ("t5", dict(target_modules=["embed_tokens", "q"]), None),
    "bart-embed_tokens-lm_head-sharded": ("bart", dict(target_modules=["embed_tokens", "q_proj",
                                          "lm_head"], use_rslora=True), None, "30KB"),
    "qwen2_moe-shared_expert": ("qwen2_moe", dict(target_modules=[
        "q_proj", "shared_expert.up_proj", "shared_expert_gate"], use_rslora=True), None),
    "mixtral-attention": ("mixtral", dict(target_modules=["q_proj", "o_proj"]), None),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_merged_resized_converted(case, tmp_path):
    arch, lora_kwargs, dtype, *shard = PEFT_CASES[case]
    model = build(arch, dtype)
    model.save_pretrained(tmp_path / "base", **({"max_shard_size": shard[0]} if shard else {}))
    lcfg = peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, **lora_kwargs)
    pm = peft.get_peft_model(copy.deepcopy(model), lcfg)
    hm.perturb_trained(pm)
    pm.save_pretrained(tmp_path / "ad")
    base = load(arch, tmp_path / "base")
    unmerged = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval(),
                      arch)
    pm.merge_and_unload().save_pretrained(tmp_path / "ref")
    want = logits(load(arch, tmp_path / "ref"), arch)
    moved = (logits(base, arch) - want).abs().max().item()
    assert moved > 0.01
    scale = want.abs().max().item()
    assert cli("merge", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "m", "-q") == 0
    d = (logits(load(arch, tmp_path / "m"), arch) - want).abs().max().item()
    # PEFT rounds its 16-bit merge twice (delta, then sum); rslora once
    assert d <= (1e-4 * scale if dtype is None else 0.02 * moved), (d, moved)
    for name, args in (("rs", ["resize", tmp_path / "ad", "-o", tmp_path / "rs", "--rank", "4",
                               "-q"]),
                       ("cv", ["convert", tmp_path / "ad", "-o", tmp_path / "cv", "--rule",
                               "standard" if lcfg.use_rslora else "rslora"])):
        assert cli(*args) == 0
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval()
        d = (logits(again, arch) - unmerged).abs().max().item()
        assert d <= 1e-4 * unmerged.abs().max().item(), (name, d)
    # resized to a lower rank: each update's float64 best rank-2 part, applied by PEFT
    assert cli("resize", tmp_path / "ad", "-o", tmp_path / "r2", "--rank", "2", "-q") == 0
    want = logits(_truncate_in_peft(peft.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "ad").eval(), 2), arch)
    got = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r2").eval(), arch)
    assert (want - unmerged).abs().max().item() > 1e-3  # rank 2 is a real truncation
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@torch.no_grad()
def _truncate_in_peft(pm, rank):
    """PEFT's own model with every LoRA update s B A replaced by its float64 best rank-``rank``
    part (factors zero-padded in place: shapes and scale stay PEFT's)."""
    for m in pm.modules():
        if not isinstance(m, peft.tuners.lora.LoraLayer):
            continue
        if "default" in m.lora_A:
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
        else:
            A, B = m.lora_embedding_A["default"], m.lora_embedding_B["default"]
        U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
        k = min(rank, S.numel())
        A.zero_()
        B.zero_()
        A[:k] = Vh[:k].float()
        B[:, :k] = (U[:, :k] * S[:k]).float()
    return pm


@pytest.mark.parametrize("targets", [["embed_tokens", "q"], ["shared", "lm_head", "o"]])
def test_t5_checkpoint_storing_every_tied_copy(targets, tmp_path, capsys):
    """Older T5 checkpoints store shared, both stacks' embed_tokens and lm_head; transformers
    re-ties them on load from ``shared``, so an update of any must reach every copy."""
    model = build("t5")
    _save_with_copies(model, tmp_path / "base", "shared.weight", [
        "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"])
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        target_modules=targets, r=2, lora_alpha=4, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    want = logits(pm.merge_and_unload(), "t5")
    capsys.readouterr()
    assert cli("merge", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "m", "-q") == 0
    assert "tied to shared" in capsys.readouterr().err
    moved = (logits(model, "t5") - want).abs().max().item()
    d = (logits(load("t5", tmp_path / "m"), "t5") - want).abs().max().item()
    assert moved > 1 and d <= 1e-4 * want.abs().max().item(), (d, moved)


def _save_with_copies(model, folder, source, copies):
    """save_pretrained, then the tied copies stored too, as older checkpoints have them."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    sd = load_file(folder / "model.safetensors")
    for k in copies:
        assert k not in sd
        sd[k] = sd[source].clone()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("arch,source,copies", [
    ("t5", "shared.weight", ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                             "lm_head.weight"]),
    ("gemma", "model.embed_tokens.weight", ["lm_head.weight"]),
])
def test_extract_from_checkpoints_storing_tied_copies(arch, source, copies, tmp_path):
    """Tied weights stored once per copy in BASE and TUNED: one LoRA, on the weight transformers
    keeps (a LoRA per copy would add the update once per copy to the one shared weight)."""
    model = build(arch)
    _save_with_copies(model, tmp_path / "base", source, copies)
    tuned, _ = hm.low_rank_tuned(model, r"", rank=2)
    _save_with_copies(tuned, tmp_path / "tuned", source, copies)
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank",
               "2", "-q") == 0
    targets = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["target_modules"]
    assert source[: -len(".weight")] in targets
    assert not {k[: -len(".weight")] for k in copies} & set(targets)
    want = logits(tuned, arch)
    scale = want.abs().max().item()
    assert (logits(model, arch) - want).abs().max().item() > 0.05
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ad").eval()
    assert (logits(pm.merge_and_unload(), arch) - want).abs().max().item() <= 1e-4 * scale
    assert cli("merge", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "m", "-q") == 0
    assert (logits(load(arch, tmp_path / "m"), arch) - want).abs().max().item() <= 1e-4 * scale


def test_mamba_embeddings_and_parameters_no_lora_carries(tmp_path, capsys):
    """Mamba: its nn.Embedding is ``embeddings`` (an embedding LoRA, or PEFT loads none of it);
    a change of A_log (2-D, not a .weight) or conv1d (3-D) is refused by name, not dropped."""
    if not hasattr(tf, "MambaConfig"):
        pytest.skip(f"transformers {tf.__version__} has no MambaConfig")
    torch.manual_seed(0)
    cfg = tf.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, state_size=4)
    model = tf.MambaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    # (PEFT refuses LoRA on Mamba's out_proj: left unchanged here)
    tuned, changed = hm.low_rank_tuned(model, r"(embeddings|in_proj|x_proj|dt_proj)\.weight$", rank=2)
    assert "backbone.embeddings.weight" in changed
    tuned.save_pretrained(tmp_path / "tuned")
    more = copy.deepcopy(tuned)
    with torch.no_grad():
        more.backbone.layers[0].mixer.A_log.add_(0.1)
    more.save_pretrained(tmp_path / "more")
    capsys.readouterr()
    assert cli("extract", tmp_path / "base", tmp_path / "more", "-o", tmp_path / "x", "--rank",
               "2", "-q") == 2
    err = capsys.readouterr().err
    assert "A_log" in err and "--exclude 'mixer$'" in err and not (tmp_path / "x").exists(), err
    assert cli("extract", tmp_path / "base", tmp_path / "more", "-o", tmp_path / "x", "--rank",
               "2", "-q", "--exclude", "mixer$") == 0
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank",
               "2", "-q") == 0
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ad").eval()
    assert any(m.lora_embedding_A for m in pm.modules()
               if isinstance(m, peft.tuners.lora.LoraLayer))
    x = hm.ids()
    want = tuned(input_ids=x).logits
    assert (model(input_ids=x).logits - want).abs().max().item() > 0.05
    got = pm.merge_and_unload()(input_ids=x).logits  # tied lm_head: compared merged
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def _vlm(arch):
    """A tiny vision-language model (text-only inputs run its language model)."""
    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                num_key_value_heads=2, num_hidden_layers=1, max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  image_size=28, patch_size=14)
    if arch == "gemma3":
        cfg = tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**text, head_dim=8),
                              vision_config=tf.SiglipVisionConfig(**vision), mm_tokens_per_image=4,
                              image_token_index=299, boi_token_index=297, eoi_token_index=298)
        return tf.Gemma3ForConditionalGeneration(cfg).eval()
    cfg = tf.LlavaConfig(text_config=tf.LlamaConfig(**text), image_token_index=299,
                         vision_config=tf.CLIPVisionConfig(**vision, projection_dim=32))
    return tf.LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("arch", ["gemma3", "llava"])
def test_vision_language_models_renamed_by_transformers(arch, tmp_path):
    """transformers 5 saves these checkpoints as language_model.model.*, vision_tower.*, and
    names the modules model.language_model.*, model.vision_tower.*: extracted adapters must say
    the latter (PEFT did not find language_model.model.* and dropped it), and merge takes both."""
    model = _vlm(arch)
    model.save_pretrained(tmp_path / "base")
    tuned, _ = hm.low_rank_tuned(model, r"(q_proj|v_proj|o_proj|down_proj|fc1|linear_1|out_proj|"
                                 r"lm_head)\.weight$", rank=2)
    tuned.save_pretrained(tmp_path / "tuned")
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank",
               "2", "-q") == 0
    x = torch.randint(3, 200, (1, 7))
    want = tuned(input_ids=x).logits
    scale = want.abs().max().item()
    assert (model(input_ids=x).logits - want).abs().max().item() > 0.1 * scale
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ad").eval()
    assert (pm(input_ids=x).logits - want).abs().max().item() <= 1e-4 * scale
    assert cli("merge", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "m", "-q") == 0
    merged = type(model).from_pretrained(tmp_path / "m").eval()
    assert (merged(input_ids=x).logits - want).abs().max().item() <= 1e-4 * scale
    # a PEFT adapter made on the model (its names) merged into the checkpoint (its names)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        target_modules=["q_proj", "v_proj", "lm_head"], r=2, lora_alpha=4, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "pa")
    want = pm.merge_and_unload()(input_ids=x).logits
    assert cli("merge", tmp_path / "base", tmp_path / "pa", "-o", tmp_path / "m2", "-q") == 0
    merged = type(model).from_pretrained(tmp_path / "m2").eval()
    assert (merged(input_ids=x).logits - want).abs().max().item() <= 1e-4 * want.abs().max().item()


# -- MoE: experts fused into 3-D parameters ------------------------------------------------------
def test_changed_3d_experts_are_refused_not_dropped(tmp_path, capsys):
    """A checkpoint in transformers 5's in-memory layout (3-D fused experts): a LoRA adapter
    cannot carry a change of them, so extraction stops and names the tensor; --exclude leaves
    them out on purpose; unchanged, they are no obstacle."""
    from safetensors.torch import save_file

    model = build("mixtral")
    for name, m in (("base", model), ("tuned", tune(model)[0]), ("same", copy.deepcopy(model))):
        (tmp_path / name).mkdir()
        sd = {k: v.contiguous() for k, v in m.state_dict().items()}
        if name == "same":  # only attention moved
            sd["model.layers.0.self_attn.q_proj.weight"] += 0.1
        save_file(sd, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        model.config.to_json_file(tmp_path / name / "config.json")
    capsys.readouterr()
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "x", "--rank",
               "2", "-q") == 2
    err = capsys.readouterr().err
    assert "experts.down_proj" in err or "experts.gate_up_proj" in err, err
    assert "3-D" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "x", "--rank",
               "2", "-q", "--exclude", "experts") == 0
    assert cli("extract", tmp_path / "base", tmp_path / "same", "-o", tmp_path / "y", "--rank",
               "2", "-q") == 0


def test_peft_target_parameters_adapter_is_refused(tmp_path, capsys):
    """PEFT's LoRA on 3-D expert parameters (target_parameters): refused by every tool, one line."""
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        target_modules=["q_proj"], target_parameters=["experts.down_proj"], r=2,
        init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    for args in (["merge", tmp_path / "base"], ["resize", "--rank", "1"],
                 ["convert", "--rule", "rslora"]):
        capsys.readouterr()
        cmd, *rest = args
        pos = [a for a in rest if not str(a).startswith("--") and a not in ("1", "rslora")]
        opts = [a for a in rest if a not in pos]
        assert cli(cmd, *pos, tmp_path / "ad", "-o", tmp_path / "x", *opts) == 2
        err = capsys.readouterr().err
        assert "target_parameters" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_qwen2_moe_extract_says_peft_drops_experts_and_merges_them(tmp_path, capsys):
    """PEFT 0.21 on transformers 5 leaves Qwen2-MoE's per-expert LoRA out without a word (and
    cannot wrap its router): extraction says so, and rslora merge applies them exactly."""
    build("qwen2_moe").save_pretrained(tmp_path / "base", max_shard_size="40KB")
    base = load("qwen2_moe", tmp_path / "base")
    tuned, ref = tune(base)
    tuned.save_pretrained(tmp_path / "tuned")
    capsys.readouterr()
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank",
               "2", "-q") == 0
    err = capsys.readouterr().err
    assert "12 module(s) are per-expert MoE projections" in err and "Qwen2-MoE" in err, err
    assert "sqrt(2)" in err  # gate_proj + up_proj under the default rsLoRA rule
    assert cli("merge", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "m", "-q") == 0
    want = logits(ref, "qwen2_moe")
    assert (logits(base, "qwen2_moe") - want).abs().max().item() > 0.05
    d = (logits(load("qwen2_moe", tmp_path / "m"), "qwen2_moe") - want).abs().max().item()
    assert d <= 1e-4 * want.abs().max().item(), d


def test_moe_rslora_note(tmp_path, capsys):
    """PEFT (on transformers 5) loads per-expert w1/w3 LoRA into the fused gate_up_proj with r and
    lora_alpha doubled, which keeps alpha/r but not alpha/sqrt(r): extraction under the rsLoRA rule
    says so (the merged model is right either way)."""
    model = build("mixtral")
    model.save_pretrained(tmp_path / "base")
    tune(model)[0].save_pretrained(tmp_path / "tuned")
    capsys.readouterr()
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank",
               "2", "-q") == 0
    err = capsys.readouterr().err
    assert "--rule standard" in err and "per-expert" in err
    assert cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad2", "--rank",
               "2", "-q", "--rule", "standard") == 0
    assert "sqrt(2)" not in capsys.readouterr().err
