"""Module names transformers >= 5 renames on load, derived from transformers' own conversion
mapping (not the static table): an adapter extracted from checkpoints of these models must name
the modules as the model in memory does, or PEFT loads it with those LoRA weights dropped.
Tiny models built from configs with random weights (nothing downloaded)."""

from __future__ import annotations

import copy

import pytest

import rslora.cli
from rslora.adapters import layouts

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")
pytest.importorskip("transformers.conversion_mapping")
import hf_models as hm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

_TEXT = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_attention_heads=4,
             num_key_value_heads=2, num_hidden_layers=1, max_position_embeddings=64)


def _model(arch):
    """A tiny model of ``arch`` whose saved keys differ from its module names (none of these are
    in the static table); text-only inputs run its language model."""
    torch.manual_seed(0)
    if arch == "vipllava":
        cfg = tf.VipLlavaConfig(text_config=tf.LlamaConfig(**_TEXT), image_token_index=299,
                                vision_config=tf.CLIPVisionConfig(
                                    hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                    num_attention_heads=4, image_size=28, patch_size=14,
                                    projection_dim=32))
        return tf.VipLlavaForConditionalGeneration(cfg).eval()
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    if arch == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(text_config=dict(**_TEXT, rope_parameters=rope),
                               vision_config=dict(depth=1, embed_dim=32, hidden_size=32,
                                                  num_heads=4, mlp_ratio=2))
        return tf.Qwen2VLForConditionalGeneration(cfg).eval()
    if arch == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(text_config=dict(**_TEXT, rope_parameters=rope),
                                  vision_config=dict(depth=1, hidden_size=32, intermediate_size=48,
                                                     num_heads=4, out_hidden_size=32))
        return tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=48, image_size=28, patch_size=14, num_labels=5)
    if arch == "vit":  # the ViT renames are scoped to the sub-model at vit.*
        return tf.ViTForImageClassification(tf.ViTConfig(**vision)).eval()
    if arch == "dinov2":
        return tf.Dinov2ForImageClassification(tf.Dinov2Config(**vision)).eval()
    raise AssertionError(arch)


def _inputs(arch):
    g = torch.Generator().manual_seed(1)
    if arch in ("vit", "dinov2"):
        return {"pixel_values": torch.randn(2, 3, 28, 28, generator=g)}
    return {"input_ids": torch.randint(3, 200, (1, 7), generator=g)}


@torch.no_grad()
def _out(model, arch):
    return model(**_inputs(arch)).logits


def _cli(*args) -> int:
    return rslora.cli.main([str(a) for a in args])


@pytest.fixture
def static_only(monkeypatch):
    """rslora as before the derived renames: the static table only."""
    monkeypatch.setattr(layouts, "_transformers_key_renames", lambda cfg, keys: None)


def _extract_and_load(arch, tmp_path):
    model = _model(arch)
    model.save_pretrained(tmp_path / "base")
    tuned, _ = hm.low_rank_tuned(model, r"(q_proj|v_proj|o_proj|down_proj|fc2|lm_head)\.weight$",
                                 rank=2)
    tuned.save_pretrained(tmp_path / "tuned")
    assert _cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank",
                "2", "-q") == 0
    want = _out(tuned, arch)
    scale = want.abs().max().item()
    assert (_out(model, arch) - want).abs().max().item() > 0.1 * scale
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ad").eval()
    return model, tuned, (_out(pm, arch) - want).abs().max().item() / scale


ARCHS = ["qwen2_vl", "qwen2_5_vl", "vipllava", "vit", "dinov2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_keys_differ_from_module_names(arch, tmp_path):
    """The premise: transformers saves these models under other names than it loads them as."""
    from safetensors import safe_open
    model = _model(arch)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved != set(model.state_dict())


@pytest.mark.parametrize("arch", ARCHS)
def test_extracted_adapter_loads_in_peft(arch, tmp_path):
    model, tuned, err = _extract_and_load(arch, tmp_path)
    assert err <= 1e-4
    # merged by rslora into the checkpoint (its names) gives the tuned model too
    assert _cli("merge", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "m", "-q") == 0
    merged = type(model).from_pretrained(tmp_path / "m").eval()
    want = _out(tuned, arch)
    assert (_out(merged, arch) - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_without_derived_renames_peft_drops_modules(arch, tmp_path, static_only):
    """The test above can fail: with the static table alone PEFT drops the adapter's modules
    (silently, or refuses it when it finds none of them)."""
    try:
        _, _, err = _extract_and_load(arch, tmp_path)
    except peft.utils.error.NoMatchingPeftModuleError:
        return
    assert err > 1e-2


@pytest.mark.parametrize("architectures", [["MixtralForCausalLM"], None])
def test_fuse_and_split_entries_are_not_renames(architectures):
    """Mixtral's mapping renames block_sparse_moe to mlp and fuses the experts' w1/w3 into
    gate_up_proj: only the rename is taken. With the model built (``architectures``), the
    experts keep their names too: the model has no module of the renamed name."""
    cfg = {"model_type": "mixtral", "num_hidden_layers": 1, "hidden_size": 32,
           "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_local_experts": 2, "vocab_size": 64}
    if architectures:
        cfg["architectures"] = architectures
    keys = ["model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.0.block_sparse_moe.experts.0.w1.weight",
            "model.layers.0.block_sparse_moe.experts.0.w2.weight",
            "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    r = layouts.module_renames(cfg, keys)
    names = [layouts.rename_module(k.rsplit(".", 1)[0], r) for k in keys]
    experts = "block_sparse_moe" if architectures else "mlp"
    assert names == ["model.layers.0.mlp.gate", f"model.layers.0.{experts}.experts.0.w1",
                     f"model.layers.0.{experts}.experts.0.w2", "model.layers.0.self_attn.q_proj",
                     "lm_head"]
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") for n in names)
    # Qwen2-MoE's mapping only fuses experts: nothing is renamed
    keys = ["model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.gate.weight"]
    assert layouts.module_renames({"model_type": "qwen2_moe"}, keys) == {}
    assert layouts.module_renames({"model_type": "qwen2_moe", "num_hidden_layers": 1,
                                   "architectures": ["Qwen2MoeForCausalLM"]}, keys) == {}


def test_renames_only_where_a_pattern_matches():
    """Qwen2-VL renames model.* to model.language_model.* unless it already is (or is visual):
    a checkpoint already in the new names keeps them."""
    cfg = {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]}
    keys = ["model.layers.0.self_attn.q_proj.weight", "model.language_model.norm.weight",
            "visual.blocks.0.attn.qkv.weight", "model.visual.merger.mlp.0.weight",
            "lm_head.weight"]
    r = layouts.module_renames(cfg, keys)
    names = [layouts.rename_module(k.rsplit(".", 1)[0], r) for k in keys]
    assert names == ["model.language_model.layers.0.self_attn.q_proj",
                     "model.language_model.norm", "model.visual.blocks.0.attn.qkv",
                     "model.visual.merger.mlp.0", "lm_head"]


def test_static_table_without_a_mapping(static_only):
    assert layouts.module_renames({"model_type": "gpt_neox"}, ["embed_out.weight"]) == \
        {"embed_out": "lm_head"}
    assert layouts.module_renames({"model_type": "llama"}, ["lm_head.weight"]) == {}


def _saved_names(model):
    """{checkpoint key: model key} as transformers' save_pretrained names the model's tensors
    (its conversion mapping reversed), for the tensors it renames without fusing or splitting."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (PrefixChange, WeightConverter, WeightRenaming,
                                                 apply_converters, apply_renamings)
    conv = [c for c in get_model_conversion_mapping(model, add_legacy=False)
            if not isinstance(c, PrefixChange)]
    rev = [c.reverse_transform() for c in conv[::-1]]
    renamings = [c for c in rev if isinstance(c, WeightRenaming)]
    converters = [c for c in rev if isinstance(c, WeightConverter)]
    return {apply_renamings(k, renamings): k for k in model.state_dict()
            if apply_converters(k, converters)[1] is None}


# default configs, built on the meta device: a ViT sub-model (scoped renames), a VLM with a
# GroupWeightRename (fc0 -> fc1 -> fc2: applied in part, it would give an existing wrong name),
# Qwen2-VL's negative lookahead, prefixes that do not hold for every module
@pytest.mark.parametrize("model_type", ["vit", "kimi_k25", "qwen2_vl", "unlimited_ocr",
                                        "hy_v4_vl", "mllama"])
def test_every_module_named_as_transformers_loads_it(model_type):
    from transformers.models.auto import modeling_auto as ma
    cls_name = (ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
                or ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(model_type))
    if cls_name is None or not hasattr(tf, cls_name):
        pytest.skip(f"transformers {tf.__version__} has no {model_type}")
    cfg = tf.AutoConfig.for_model(model_type)
    with torch.device("meta"):
        model = getattr(tf, cls_name)(cfg)
    saved = _saved_names(model)
    assert any(s != k for s, k in saved.items())
    modules = dict(model.named_modules())
    cfg_json = {**cfg.to_dict(), "architectures": [cls_name]}
    renames = layouts.module_renames(cfg_json, saved)
    checked = 0
    for s, k in saved.items():
        stem, param = k.rsplit(".", 1)
        if param == "weight" and getattr(getattr(modules.get(stem), "weight", None), "ndim", 0) == 2:
            assert layouts.rename_module(s.rsplit(".", 1)[0], renames) == stem, s
            checked += 1
    assert checked
