"""``rslora extract``: a PEFT LoRA adapter from the difference of two checkpoints."""

from __future__ import annotations

import sys

def NEEDS(args) -> tuple:
    """The optional modules this run imports, checked before any work (rslora.cli.require)."""
    from ..cli import cluster_needs

    return ("tqdm", "safetensors") + cluster_needs(args)

USAGE = """examples:
  rslora extract base/ tuned/ -o adapter/ --rank 64
  rslora extract base.safetensors tuned.safetensors -o adapter/ --tol 0.05 --max-rank 256
  rslora extract base/ tuned/ -o adapter/ --rank 16 --rule standard --alpha 32 \\
      --include 'self_attn' --exclude 'lm_head' --dtype bfloat16 --on-missing skip --force
"""


def register(sub) -> None:
    from ..cli import add_cluster_args

    p = sub.add_parser(
        "extract", help="extract a LoRA adapter from a base and a fine-tuned checkpoint",
        description="Factor tuned - base for every 2-D weight with the randomized SVD and write a "
                    "PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors). "
                    "Checkpoints: a .safetensors file, a folder, or a *.safetensors.index.json.",
        epilog=USAGE, formatter_class=_formatter())
    p.add_argument("base", metavar="BASE", help="the base checkpoint")
    p.add_argument("tuned", metavar="TUNED", help="the fine-tuned checkpoint")
    p.add_argument("-o", "--output", metavar="OUT_DIR", required=True, help="adapter folder to write")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, metavar="R", help="the same rank for every layer")
    how.add_argument("--tol", type=float, metavar="T",
                     help="per layer, the smallest rank with relative Frobenius error <= T")
    p.add_argument("--max-rank", type=int, metavar="R", help="upper bound on the rank with --tol")
    p.add_argument("--rule", choices=("rslora", "standard"), default="rslora",
                   help="scaling written to the adapter: alpha/sqrt(r) (rslora, default) or alpha/r")
    p.add_argument("--alpha", type=float, metavar="A",
                   help="lora_alpha (default: the adapter's r); the merged weights do not depend on it")
    p.add_argument("--include", metavar="REGEX", help="only modules whose name matches")
    p.add_argument("--exclude", metavar="REGEX", help="leave out modules whose name matches")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="storage dtype of the adapter (computation is float32)")
    p.add_argument("--on-missing", choices=("error", "skip"), default="error",
                   help="weights present in only one checkpoint: stop (default) or skip them")
    p.add_argument("--prefix", metavar="OLD=NEW",
                   help="name TUNED's modules NEW... as OLD... in the adapter (e.g. '=bert.' for a "
                        "bare BertModel); BASE is matched to TUNED by module path either way")
    p.add_argument("--biases", action="store_true",
                   help="carry TUNED's biases whole (PEFT bias='all'), so trained biases are kept")
    p.add_argument("--modules-to-save", metavar="NAME[,NAME...]",
                   type=lambda v: [n.strip() for n in v.split(",")],
                   help="modules saved whole, as PEFT's modules_to_save (a new head, a trained "
                        "lm_head or norm): their full names, e.g. score or lm_head,model.norm")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD (default 0)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no table")
    add_cluster_args(p)
    p.set_defaults(func=run)


def _formatter():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def run(args) -> int:
    from ..errors import UserError
    from ..adapters.extract import extract_adapter
    from ._cluster import client_for

    where = client_for(args)  # the cluster flags checked before any work

    try:
        with where as client:
            res = extract_adapter(
                args.base, args.tuned, args.output, rank=args.rank, tol=args.tol,
                max_rank=args.max_rank, rule=args.rule, alpha=args.alpha, include=args.include,
                exclude=args.exclude, dtype=args.dtype, on_missing=args.on_missing,
                force=args.force, seed=args.seed, progress=not args.quiet, prefix=args.prefix,
                biases=args.biases, modules_to_save=args.modules_to_save, client=client)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise UserError(str(e)) from None
    for side, names in (("BASE", res.only_in_base), ("TUNED", res.only_in_tuned)):
        if names:
            print(f"rslora extract: skipped {len(names)} weight(s) only in {side}: "
                  + ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""), file=sys.stderr)
    if res.changed_not_extracted:
        names = res.changed_not_extracted
        print(f"rslora extract: note: {len(names)} tensor(s) that are not 2-D weights differ and are "
              "not in the adapter (--biases carries biases, --modules-to-save whole modules): "
              + ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""),
              file=sys.stderr)
    if res.structure_differs:
        names = res.structure_differs
        print(f"rslora extract: warning: {len(names)} tensor(s) that are not 2-D weights are in only "
              "one checkpoint or differ in shape (are these the same model?): "
              + ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""), file=sys.stderr)
    for note in res.notes:
        print(f"rslora extract: note: {note}", file=sys.stderr)
    if not args.quiet:
        print(res.summary())
    cfg = res.config
    print(f"wrote {args.output} (r={cfg['r']}, lora_alpha={cfg['lora_alpha']}, "
          f"use_rslora={cfg['use_rslora']}, {len(res.layers)} modules)")
    return 0
