"""Tiny Hugging Face models built from configs (random weights, nothing downloaded), saved as
real model folders, and the PEFT adapters made on them: the fixtures of test_real_models.py."""

from __future__ import annotations

import copy
import json
import re

import torch
import transformers as tf

VOCAB = 64


def config(arch: str):
    """A tiny config per architecture name (hidden 32, 1-2 layers)."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4)
    if arch in ("llama", "llama_tied"):
        return tf.LlamaConfig(**common, num_hidden_layers=2, num_key_value_heads=2,
                              max_position_embeddings=32, tie_word_embeddings=arch == "llama_tied",
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, num_hidden_layers=1, num_key_value_heads=2,
                              max_position_embeddings=32, bos_token_id=1, eos_token_id=2)
    if arch in ("gpt2", "gpt2_untied"):
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=arch == "gpt2")
    if arch == "bert":
        return tf.BertConfig(**common, num_hidden_layers=1, max_position_embeddings=32,
                             pad_token_id=0)
    raise ValueError(arch)


def head_class(arch: str):
    return tf.AutoModelForMaskedLM if arch == "bert" else tf.AutoModelForCausalLM


def build(arch: str, seed: int = 0, bare: bool = False):
    """A model with random weights (biases and norms randomised too, so they matter)."""
    torch.manual_seed(seed)
    cfg = config(arch)
    model = (tf.AutoModel.from_config(cfg) if bare else head_class(arch).from_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save(model, folder, *, dtype=None, shard=None) -> None:
    """save_pretrained (optionally sharded / cast) plus the files a real folder has beside the
    weights: a tokenizer file and a README."""
    m = model if dtype is None else copy.deepcopy(model).to(dtype)
    kw = {} if shard is None else {"max_shard_size": shard}
    m.save_pretrained(folder, **kw)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {}}}))
    (folder / "README.md").write_text("tiny test model\n")


def ids(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 7), generator=g)


@torch.no_grad()
def outputs(model, x=None):
    """float32 logits (or last hidden state of a bare model), for comparisons."""
    out = model(input_ids=ids() if x is None else x)
    t = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return t.float()


def perturb_trained(peft_model, seed: int = 3) -> None:
    """Give trainable full tensors (modules_to_save copies, trained biases) new values, as
    training would, so merging them in is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


def low_rank_tuned(model, pattern: str, rank: int = 2, seed: int = 5, biases: bool = False):
    """A copy of ``model`` whose 2-D weights matching ``pattern`` moved by an exactly rank-``rank``
    update (so an adapter of that rank reproduces it up to float rounding); with ``biases``,
    every bias moved too."""
    g = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    changed = []
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.ndim == 2 and re.search(pattern, name):
                u = torch.randn(p.shape[0], rank, generator=g)
                v = torch.randn(rank, p.shape[1], generator=g)
                p.add_(0.3 * (u @ v) / p.shape[1] ** 0.5)
                changed.append(name)
            elif biases and p.ndim == 1 and "bias" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    assert changed, pattern
    return tuned, changed
