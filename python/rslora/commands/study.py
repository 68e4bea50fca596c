"""``rslora study``: the scale table, spectra, approximation error, the learning-rate map of
LoRA vs rsLoRA across ranks and a nonlinear fine-tune, written as report.md + PNG plots +
results.json."""

from __future__ import annotations

import sys
import time

NEEDS = ("tqdm", "matplotlib")  # optional modules, checked before any work (rslora.cli.require)


def register(sub) -> None:
    p = sub.add_parser(
        "study", help="reproduce what rsLoRA is about on synthetic data (report, plots, JSON)",
        description="Run the rsLoRA study and write report.md, PNG plots and results.json.")
    p.add_argument("--out", default="rslora-study", metavar="DIR",
                   help="output directory (default: ./rslora-study)")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes, fewer ranks: seconds instead of minutes")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of every random draw (default 0); same seed, same numbers")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for the training runs (default: the usable cores); "
                        "the results do not depend on it")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UserError
    from ..study import full_config, quick_config, run_study
    from ..study.output import REPORT

    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    cfg = quick_config(args.seed) if args.quick else full_config(args.seed)
    t0 = time.perf_counter()
    run_study(cfg, args.out, force=args.force, workers=args.workers)
    print(f"rslora study ({cfg.mode}, seed {cfg.seed}) finished in "
          f"{time.perf_counter() - t0:.0f} s: {args.out}/{REPORT}", file=sys.stderr)
    return 0
