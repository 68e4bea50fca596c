"""``rslora convert``: an adapter rewritten for another scaling rule, same update."""

from __future__ import annotations

NEEDS = ("safetensors",)  # optional modules, checked before any work (rslora.cli.require)

USAGE = """examples:
  rslora convert adapter/ -o adapter-standard/ --rule standard     # serve an rsLoRA adapter anywhere
  rslora convert adapter/ -o adapter-rs/ --rule rslora --alpha 16 --force
"""


def register(sub) -> None:
    import argparse

    p = sub.add_parser(
        "convert", help="rewrite a LoRA adapter for another scaling rule (same update)",
        description="Rewrite a PEFT LoRA adapter so that RULE (alpha/r or alpha/sqrt(r)) gives "
                    "exactly the same update: the scale ratio is folded into lora_B, and "
                    "use_rslora, lora_alpha and alpha_pattern are rewritten so that every module "
                    "has the top-level scale (right also where rank/alpha patterns or use_rslora "
                    "are ignored, as in several serving stacks).",
        epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", metavar="ADAPTER", help="a PEFT LoRA adapter folder")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="adapter folder to write")
    p.add_argument("--rule", choices=("standard", "rslora"), required=True,
                   help="scaling of the written adapter: alpha/r (standard) or alpha/sqrt(r)")
    p.add_argument("--alpha", type=float, metavar="A",
                   help="lora_alpha to write (default: the one that leaves lora_B of the modules "
                        "at the config's r unchanged)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..adapters.convert import convert_adapter
    from ..errors import UserError

    try:
        res = convert_adapter(args.adapter, args.output, rule=args.rule, alpha=args.alpha,
                              force=args.force)
    except (ValueError, TypeError, OSError) as e:  # CheckpointError is a ValueError
        raise UserError(str(e)) from None
    cfg = res.config
    print(f"wrote {args.output} (use_rslora={cfg['use_rslora']}, lora_alpha={cfg['lora_alpha']}, "
          f"r={cfg['r']}; lora_B rescaled in {len(res.rescaled)} of {res.modules} modules)")
    return 0
