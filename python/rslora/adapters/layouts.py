"""Which layout a 2-D weight is stored in: ``nn.Linear`` (out, in), transformers' ``Conv1D``
(in, out: GPT-2 and its relatives) or ``nn.Embedding`` (num_embeddings, dim).

PEFT decides ``fan_in_fan_out`` per module from the module's class, whatever the adapter config
says (it flips the flag for each Linear and Conv1D it wraps, so the saved flag is only the last
module's). Without the model class, rslora decides from ``config.json``'s ``model_type`` (the
table below), else from shapes: a non-square weight fits only one layout, a bias tells which
side is ``out``; a square weight with nothing to decide it is refused, never guessed.
"""

from __future__ import annotations

import re
from pathlib import Path

from .checkpoint import CheckpointError, read_json_object

__all__ = ["model_config", "conv1d_by_type", "layout_evidence", "decide_conv1d", "EMBEDDING_NAMES",
           "RENAMED_MODULES", "rename_module", "WORD_EMBEDDINGS", "STACK_EMBEDDING", "SHARED", "stored_ties"]

#: model_type -> leaf names of transformers' Conv1D modules (read from transformers' modeling files).
CONV1D_MODULES = {
    "gpt2": {"c_attn", "q_attn", "c_proj", "c_fc"},
    "openai-gpt": {"c_attn", "c_proj", "c_fc"},
    "imagegpt": {"c_attn", "q_attn", "c_proj", "c_fc"},
    "decision_transformer": {"c_attn", "q_attn", "c_proj", "c_fc"},
    "clvp": {"c_fc", "c_proj"},
}

#: model_type -> {module path prefix in the checkpoint: its name in the model transformers >= 5
#: builds}. transformers renames these keys on load (and back on save), and PEFT names an adapter's
#: modules after the model: an adapter that says ``embed_out`` loads with that LoRA silently
#: dropped. (The vision-language models below were checked against transformers 5.24's own
#: save and load; others of the family may rename the same way.)
_VLM = {"language_model.model": "model.language_model", "language_model.lm_head": "lm_head",
        "vision_tower": "model.vision_tower", "multi_modal_projector": "model.multi_modal_projector"}
RENAMED_MODULES = {"gpt_neox": {"embed_out": "lm_head"},
                   **{t: _VLM for t in ("gemma3", "llava", "llava_next", "mistral3", "paligemma",
                                        "aya_vision", "internvl")}}


def rename_module(name: str, renames: dict) -> str:
    """``name`` with its leading module path renamed by ``renames`` ({old prefix: new})."""
    for old, new in renames.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return name

#: Module names of nn.Embedding layers in common architectures (T5's per-layer
#: ``relative_attention_bias`` is one too, and Mamba's ``embeddings``, XLNet's ``word_embedding``:
#: written as a Linear LoRA, PEFT would load none of it).
EMBEDDING_NAMES = re.compile(r"(^|\.)(embed_tokens|embed_positions|embed_in|word_embeddings|"
                             r"position_embeddings|token_type_embeddings|wte|wpe|shared|"
                             r"relative_attention_bias|token_embedding|position_embedding|"
                             r"embeddings|word_embedding)$")


#: Input-embedding names an output layer (lm_head) may be tied to.
WORD_EMBEDDINGS = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|shared)$")
#: The embeddings of an encoder-decoder's two stacks, which share (and are saved as) ``shared``.
STACK_EMBEDDING = re.compile(r"(^|\.)(encoder|decoder)\.embed_tokens$")
SHARED = re.compile(r"(^|\.)shared$")


def stored_ties(stems, shapes: dict, cfg: dict) -> list[tuple[str, set]]:
    """Tied weights a checkpoint saves more than once (older checkpoints), as
    ``[(source, {every copy, source included})]`` by module name: transformers re-ties them on
    load and keeps the source (the input embedding). The ties: an encoder-decoder's ``shared``
    embedding with its stacks' ``embed_tokens`` (T5 always; others unless config.json unties the
    embeddings), and ``lm_head`` with the input embedding when config.json says
    ``tie_word_embeddings``. ``shapes`` maps ``<module>.weight`` keys to shapes."""
    def shape(s):
        return tuple(shapes[f"{s}.weight"])

    groups: list[tuple[str, set]] = []
    shared = [s for s in stems if SHARED.search(s)]
    if len(shared) == 1 and (cfg.get("tie_word_embeddings", True) or
                             str(cfg.get("model_type", "")).endswith("t5")):
        stacks = {s for s in stems if STACK_EMBEDDING.search(s) and shape(s) == shape(shared[0])}
        if stacks:
            groups.append((shared[0], {shared[0], *stacks}))
    if cfg.get("tie_word_embeddings") and "lm_head" in stems:
        emb = [s for s in (shared or [s for s in stems if WORD_EMBEDDINGS.search(s)])
               if shape(s) == shape("lm_head")]
        if len(emb) == 1:
            group = next((g for src, g in groups if src == emb[0]), None)
            if group is None:
                groups.append((emb[0], {emb[0], "lm_head"}))
            else:
                group.add("lm_head")
    return groups


def model_config(path) -> dict:
    """``config.json`` next to a checkpoint (in the folder, or beside the file), or {}."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    cfg = folder / "config.json"
    if not cfg.is_file():
        return {}
    return read_json_object(cfg)


def conv1d_by_type(model_type, module: str) -> bool | None:
    """True/False when ``model_type`` is known to rslora (GPT-2 family: Conv1D by leaf name;
    anything else with a model_type: nn.Linear), None without a model_type."""
    if not model_type:
        return None
    leaves = CONV1D_MODULES.get(str(model_type))
    return leaves is not None and bool(leaves) and module.rsplit(".", 1)[-1] in leaves


def layout_evidence(ck) -> set:
    """{"linear", "conv1d"}: the layouts that non-square weights with a bias show in ``ck``
    (a Linear bias has length shape[0], a Conv1D bias shape[1])."""
    seen = set()
    for key in ck.keys():
        if not key.endswith(".weight"):
            continue
        bias = key[: -len("weight")] + "bias"
        if bias not in ck:
            continue
        s, b = ck.shape(key), ck.shape(bias)
        if len(s) == 2 and len(b) == 1 and s[0] != s[1]:
            if b[0] == s[0]:
                seen.add("linear")
            elif b[0] == s[1]:
                seen.add("conv1d")
    return seen


def decide_conv1d(module: str, stored: tuple, d_out: int, d_in: int, *, model_type=None,
                  evidence=frozenset(), flag=None, key=None) -> bool:
    """Whether ``module``'s weight, stored with shape ``stored``, is a Conv1D (in, out) for an
    update of (d_out, d_in). ``evidence``: layouts seen elsewhere in the model; ``flag``: the
    adapter's fan_in_fan_out (PEFT's value after its last module), None for extraction.

    Raises CheckpointError when the shape fits neither layout, or the layout cannot be decided.
    """
    fits_linear, fits_conv = tuple(stored) == (d_out, d_in), tuple(stored) == (d_in, d_out)
    by_type = conv1d_by_type(model_type, module)
    if not (fits_linear or fits_conv):
        raise CheckpointError(f"base weight {key or module + '.weight'!r} has shape {tuple(stored)} "
                              f"but the adapter's update gives ({d_out}, {d_in}) (module {module!r}: "
                              "shape mismatch)")
    if by_type is not None:
        if (fits_conv if by_type else fits_linear):
            return by_type
        raise CheckpointError(f"module {module!r}: config.json's model_type {model_type!r} makes it "
                              f"{'a Conv1D' if by_type else 'an nn.Linear'}, but its weight has shape "
                              f"{tuple(stored)} for an update of ({d_out}, {d_in})")
    conv_seen = "conv1d" in evidence or bool(flag)
    if fits_linear != fits_conv:
        if fits_linear or conv_seen:
            return fits_conv
        raise CheckpointError(f"base weight {key or module + '.weight'!r} has shape {tuple(stored)} "
                              f"but the adapter's update gives ({d_out}, {d_in}) (module {module!r}); "
                              "it would fit a Conv1D "
                              "(in, out) layer, but nothing says the model has any (no config.json "
                              "model_type, no fan_in_fan_out)")
    # Square: the layouts seen in the rest of the model (and PEFT's saved flag) must agree.
    if not conv_seen:
        return False
    if flag and evidence == {"conv1d"}:
        return True
    raise CheckpointError(f"module {module!r}: its weight is square {tuple(stored)} and the model "
                          "has Conv1D layers, so nn.Linear (out, in) and Conv1D (in, out) cannot be "
                          "told apart; put the model's config.json (model_type) next to the weights")


def stored_conv1d(module: str, shape: tuple, bias_len, *, model_type=None,
                  evidence=frozenset()) -> bool:
    """For extraction (no adapter to compare with): whether ``module``'s 2-D weight is a Conv1D.

    By model_type when known; else nn.Linear unless the model shows Conv1D layers, in which case
    the module's own bias must tell (length shape[1]: Conv1D, shape[0]: Linear) or it is refused.
    """
    by_type = conv1d_by_type(model_type, module)
    if by_type is not None:
        return by_type
    if "conv1d" not in evidence:
        return False
    if bias_len is not None and shape[0] != shape[1] and bias_len in shape:
        return bias_len == shape[1]
    raise CheckpointError(f"module {module!r}: the model has Conv1D (in, out) layers and nothing "
                          f"tells whether this {tuple(shape)} weight is one; put the model's "
                          "config.json (model_type) next to the weights, or --exclude it")
