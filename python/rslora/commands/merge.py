"""``rslora merge``: a checkpoint with a LoRA adapter merged into its weights."""

from __future__ import annotations

def NEEDS(args) -> tuple:
    """The optional modules this run imports, checked before any work (rslora.cli.require)."""
    from ..cli import cluster_needs

    return ("tqdm", "safetensors") + cluster_needs(args)

USAGE = """examples:
  rslora merge base/ adapter/ -o merged/
  rslora merge model.safetensors adapter/ -o merged/ --dtype bfloat16 --force
  rslora merge gpt2/ adapter/ -o merged/ --prefix transformer.=   # adapter transformer.h.., base h..
  rslora merge llama/ adapter/ -o merged/ --max-shard-size 2GB
"""


def register(sub) -> None:
    from ..cli import add_cluster_args

    import argparse

    p = sub.add_parser(
        "merge", help="merge a PEFT LoRA adapter into a checkpoint",
        description="Write BASE with W += scale * B @ A for every module of ADAPTER (scale as PEFT "
                    "computes it: use_rslora, rank_pattern, alpha_pattern; Conv1D and embedding "
                    "layers transposed), with modules_to_save and trained biases copied in, one "
                    "shard at a time. A model folder gives a model folder: its other files "
                    "(config.json, tokenizer) copied, its sharding kept.",
        epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", help="the base checkpoint (.safetensors, folder or index)")
    p.add_argument("adapter", metavar="ADAPTER", help="a PEFT LoRA adapter folder")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="folder to write")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="storage dtype of every float tensor (default: each tensor's own)")
    p.add_argument("--prefix", metavar="OLD=NEW",
                   help="adapter modules named OLD... are BASE's NEW... ('NEW' alone: add NEW); "
                        "default: exact names, else a unique dotted suffix")
    p.add_argument("--max-shard-size", metavar="SIZE",
                   help="re-shard the output (e.g. 2GB, 500MB) instead of keeping BASE's files")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_cluster_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..adapters.peft_format import load_adapter
    from ..adapters.merge import merge_checkpoint
    from ..errors import UserError
    from ._cluster import client_for

    import sys

    where = client_for(args)  # the cluster flags checked before any work
    notes: list = []
    try:
        adapter = load_adapter(args.adapter)
        with where as client:
            merge_checkpoint(args.base, adapter, args.output, dtype=args.dtype, force=args.force,
                             progress=not args.quiet, prefix=args.prefix,
                             max_shard_size=args.max_shard_size, notes=notes, client=client)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    for note in notes:
        print(f"rslora merge: note: {note}", file=sys.stderr)
    print(f"wrote {args.output} ({len(adapter)} modules merged)")
    return 0
