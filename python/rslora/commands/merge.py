"""``rslora merge``: a checkpoint with a LoRA adapter merged into its weights."""

from __future__ import annotations

NEEDS = ("tqdm", "safetensors")  # optional modules, checked before any work (rslora.cli.require)

USAGE = """examples:
  rslora merge base/ adapter/ -o merged/
  rslora merge model.safetensors adapter/ -o merged/ --dtype bfloat16 --force
"""


def register(sub) -> None:
    import argparse

    p = sub.add_parser(
        "merge", help="merge a PEFT LoRA adapter into a checkpoint",
        description="Write BASE with W += scale * B @ A for every module of ADAPTER (scale as PEFT "
                    "computes it: use_rslora, rank_pattern, alpha_pattern), one shard at a time. "
                    "Only the safetensors weights are written.",
        epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", help="the base checkpoint (.safetensors, folder or index)")
    p.add_argument("adapter", metavar="ADAPTER", help="a PEFT LoRA adapter folder")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="folder to write")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="storage dtype of merged weights (default: each weight's own)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..adapters.peft_format import load_adapter
    from ..adapters.merge import merge_checkpoint
    from ..errors import UserError

    try:
        adapter = load_adapter(args.adapter)
        merge_checkpoint(args.base, adapter, args.output, dtype=args.dtype, force=args.force,
                         progress=not args.quiet)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {args.output} ({len(adapter)} modules merged)")
    return 0
