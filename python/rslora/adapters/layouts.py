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
import warnings
from pathlib import Path

from .checkpoint import CheckpointError, read_json_object

__all__ = ["model_config", "conv1d_by_type", "layout_evidence", "decide_conv1d", "EMBEDDING_NAMES",
           "RENAMED_MODULES", "rename_module", "module_renames",
           "derive_renames", "WORD_EMBEDDINGS", "STACK_EMBEDDING", "SHARED", "stored_ties"]

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
#: save and load.) Only the fallback: ``module_renames`` derives them from transformers' own
#: conversion mapping, for every model it has one for, when transformers is installed.
_VLM = {"language_model.model": "model.language_model", "language_model.lm_head": "lm_head",
        "vision_tower": "model.vision_tower", "multi_modal_projector": "model.multi_modal_projector"}
RENAMED_MODULES = {"gpt_neox": {"embed_out": "lm_head"},
                   **{t: _VLM for t in ("gemma3", "llava", "llava_next", "mistral3", "paligemma",
                                        "aya_vision", "internvl")}}


def rename_module(name: str, renames: dict) -> str:
    """``name`` with its leading module path renamed by ``renames`` ({old prefix: new}; the
    longest matching prefix wins)."""
    if not renames:
        return name
    cut = len(name)
    while cut > 0:
        new = renames.get(name[:cut])
        if new is not None:
            return new + name[cut:]
        cut = name.rfind(".", 0, cut)
    return name


def _plain_renames(transforms) -> list:
    """The transforms that only rename keys (WeightRenaming and its kinds, PrefixChange,
    GroupWeightRename, ...), as transformers sorts them: converters (WeightConverter) fuse or
    split tensors (MoE experts, Concatenate, Chunk) and are left out."""
    from transformers.core_model_loading import WeightRenaming
    return [t for t in transforms if isinstance(t, WeightRenaming)]


def _model_on_meta(cfg: dict):
    """The model class ``architectures`` names in ``cfg``, built on the meta device (no memory,
    no weights), or None when transformers cannot build it."""
    import torch
    import transformers
    arch = cfg.get("architectures")
    cls = getattr(transformers, arch[0], None) if isinstance(arch, list) and arch and \
        isinstance(arch[0], str) else None
    if cls is None or not hasattr(cls, "config_class"):
        return None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return cls(cls.config_class.from_dict(dict(cfg)))
    finally:
        transformers.logging.set_verbosity(verbosity)


def _transformers_key_renames(cfg: dict, keys) -> dict | None:
    """{checkpoint key: the model's key} for the ``keys`` transformers renames on load, by its
    own conversion mapping; None without transformers or a mapping for the model.

    With the model transformers builds for ``cfg`` (on the meta device), its exact mapping
    (sub-models' renames scoped to their paths) and a check: a key is renamed only to a name
    the model has, from one it has not. Without it, the mapping transformers keeps for the
    ``architectures`` class, else the ``model_type``, at the root only."""
    if not cfg.get("model_type") and not cfg.get("architectures"):
        return None  # no config.json: nothing to look up (and no transformers import)
    try:
        from transformers import conversion_mapping as cm
        from transformers.core_model_loading import WeightRenaming  # noqa: F401
    except Exception:  # noqa: BLE001 - no (or an older) transformers: the static table
        return None
    try:
        model = _model_on_meta(cfg)
    except Exception:  # noqa: BLE001 - a config this transformers cannot build
        model = None
    try:
        if model is not None:
            renamings = _plain_renames(cm.get_model_conversion_mapping(model))
            have = set(model.state_dict())
        else:
            arch = cfg.get("architectures")
            names = [arch[0]] if isinstance(arch, list) and arch and isinstance(arch[0], str) \
                else []
            found = next((m for n in [*names, str(cfg.get("model_type"))]
                          if (m := cm.get_checkpoint_conversion_mapping(n))), None)
            if found is None:
                return None
            renamings = _plain_renames([*found, *(cm.get_checkpoint_conversion_mapping("legacy")
                                                  or [])])
            have = None
        out = {}
        for key in sorted(keys):
            new = key
            for t in renamings:
                new, _ = t.rename_source_key(new)
            if new != key and (have is None or new in have and key not in have):
                out[key] = new
    except Exception:  # noqa: BLE001 - a transformers whose mapping API changed
        return None
    return out


def derive_renames(key_renames: dict, keys) -> dict:
    """{checkpoint module path: the model's} from {checkpoint key: model key} (``key_renames``)
    over the tensors ``keys``, as prefixes where they hold (so that a parent module, e.g. one
    saved whole, is renamed too), else per module: every module of ``keys`` comes out of
    ``rename_module`` as ``key_renames`` says, renamed or not. A key whose tensor name
    (``weight``, ``bias``) changes is no module rename."""
    moved: dict[str, str] = {}
    for key, new in key_renames.items():
        if "." in key and "." in new:
            (stem, param), (nstem, nparam) = key.rsplit(".", 1), new.rsplit(".", 1)
            if param == nparam and stem != nstem:
                moved[stem] = nstem
    stems = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    pairs: dict[str, str] = {}
    for stem, nstem in moved.items():
        a, b = stem.split("."), nstem.split(".")
        n = 0  # the common trailing path, dropped unless a side would be left empty
        while n < min(len(a), len(b)) - 1 and a[-1 - n] == b[-1 - n]:
            n += 1
        old, to = ".".join(a[: len(a) - n]), ".".join(b[: len(b) - n])
        pairs[old] = to if pairs.get(old, to) == to else ""  # "": prefixes that disagree
    for renames in ({o: t for o, t in pairs.items() if t}, {}):
        renames = {**renames, **{s: n for s, n in moved.items()
                                 if rename_module(s, renames) != n}}
        keep = {s: s for s in stems - moved.keys() if rename_module(s, renames) != s}
        if not keep.keys() & renames.keys():  # an identity entry would undo a prefix
            renames |= keep
            if all(rename_module(s, renames) == moved.get(s, s) for s in stems):
                return renames
    raise AssertionError("unreachable: per-module renames always hold")


def module_renames(cfg: dict, keys) -> dict:
    """{checkpoint module path: its name in the model transformers >= 5 builds} for a checkpoint
    with config.json ``cfg`` and tensors ``keys``: derived from transformers' own load-time
    renames when it is installed and has them for the model, else the static table."""
    keys = list(keys)
    key_renames = _transformers_key_renames(cfg, keys)
    if key_renames is None:
        return dict(RENAMED_MODULES.get(str(cfg.get("model_type")), {}))
    return derive_renames(key_renames, keys)

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
