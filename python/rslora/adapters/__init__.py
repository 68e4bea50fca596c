"""Adapter files: safetensors checkpoints (single file or sharded), the PEFT LoRA format,
extraction of an adapter from two checkpoints, merging one into a model, conversion between
scaling rules, optimal rank reduction, and atomic output folders.

This is the part of rslora that reads and writes files; it needs ``safetensors`` (the ``[cli]``
extra), imported only when a file is opened. It uses the ops one level up, never the reverse.
"""

from __future__ import annotations

from . import atomic, checkpoint, convert, extract, merge, peft_format, resize, rewrite
from .checkpoint import Checkpoint, CheckpointError
from .convert import convert_adapter
from .extract import extract_adapter
from .merge import merge_adapter, merge_checkpoint
from .peft_format import LoraAdapter, LoraModule, load_adapter, save_adapter
from .resize import resize_adapter

__all__ = [
    "Checkpoint", "CheckpointError", "LoraAdapter", "LoraModule", "extract_adapter",
    "load_adapter", "merge_adapter", "merge_checkpoint", "save_adapter",
    "convert_adapter", "resize_adapter",
    "atomic", "checkpoint", "convert", "extract", "merge", "peft_format", "resize", "rewrite",
]
