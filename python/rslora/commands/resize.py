"""``rslora resize``: an adapter's rank lowered optimally per module."""

from __future__ import annotations

def NEEDS(args) -> tuple:
    """The optional modules this run imports, checked before any work (rslora.cli.require)."""
    from ..cli import cluster_needs

    return ("tqdm", "safetensors") + cluster_needs(args)

USAGE = """examples:
  rslora resize adapter/ -o adapter-r16/ --rank 16
  rslora resize adapter/ -o adapter-small/ --tol 0.05 --max-rank 64
  rslora resize adapter/ -o adapter-small/ --energy 0.99 --force -q
"""


def register(sub) -> None:
    from ..cli import add_cluster_args

    import argparse

    p = sub.add_parser(
        "resize", help="lower a LoRA adapter's rank per module (optimal truncation)",
        description="Replace each module's B @ A by its best approximation of lower rank "
                    "(Eckart-Young; computed from QR of the factors, never the dense delta). "
                    "Per-module ranks go to rank_pattern; lora_alpha and the rule stay.",
        epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", metavar="ADAPTER", help="a PEFT LoRA adapter folder")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="adapter folder to write")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, metavar="R",
                     help="the same rank for every module (a module's rank never grows)")
    how.add_argument("--tol", type=float, metavar="T",
                     help="per module, the smallest rank with relative Frobenius error <= T")
    how.add_argument("--energy", type=float, metavar="E",
                     help="per module, the smallest rank keeping a fraction >= E of ||B A||_F^2")
    p.add_argument("--max-rank", type=int, metavar="M", help="upper bound on the rank with "
                   "--tol or --energy")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no table")
    add_cluster_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..adapters.resize import resize_adapter
    from ..errors import UserError
    from ._cluster import client_for

    where = client_for(args)  # the cluster flags checked before any work

    flag = {"rank": "--rank", "tol": "--tol", "energy": "--energy", "max_rank": "--max-rank"}
    try:
        with where as client:
            res = resize_adapter(args.adapter, args.output, rank=args.rank, tol=args.tol,
                                 energy=args.energy, max_rank=args.max_rank, force=args.force,
                                 progress=not args.quiet, client=client)
    except (ValueError, TypeError, OSError) as e:  # CheckpointError is a ValueError
        msg = str(e)
        for name, opt in flag.items():  # name the command-line flag, not the Python argument
            if msg.startswith(f"{name} "):
                msg = opt + msg[len(name):]
        raise UserError(msg) from None
    if not args.quiet:
        print(res.summary())
    cfg = res.config
    print(f"wrote {args.output} (r={cfg['r']}, lora_alpha={cfg['lora_alpha']}, "
          f"use_rslora={cfg['use_rslora']}, {len(res.modules)} modules)")
    return 0
