"""``rslora study``: the scale table, spectra, approximation error, the learning-rate map of
LoRA vs rsLoRA across ranks and a nonlinear fine-tune, written as report.md + PNG plots +
results.json."""

from __future__ import annotations

import sys
import time


def NEEDS(args) -> tuple:  # optional modules, checked before any work (rslora.cli.require)
    from ..cli import cluster_needs

    if args.workers == 1:  # runs here
        return ("tqdm", "matplotlib")
    return ("tqdm", "matplotlib") + cluster_needs(args)


def register(sub) -> None:
    from ..cli import add_cluster_args

    p = sub.add_parser(
        "study", help="reproduce what rsLoRA is about on synthetic data (report, plots, JSON)",
        description="Run the rsLoRA study and write report.md, PNG plots and results.json. Its "
                    "independent training runs go to a local Dask cluster of the usable cores "
                    "(at most 8) unless --workers N (1: in this process) or --scheduler "
                    "ADDRESS says otherwise; results.json does not depend on where they run.")
    p.add_argument("--out", default="rslora-study", metavar="DIR",
                   help="output directory (default: ./rslora-study)")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes, fewer ranks: seconds instead of minutes")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of every random draw (default 0); same seed, same numbers")
    add_cluster_args(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    p.set_defaults(func=run)


def _default_workers() -> int:
    """The usable cores, or 1 (this process) where Dask is not installed, said on stderr."""
    from ..study.parallel import default_workers

    n = default_workers()
    if n == 1:
        return 1
    try:
        import distributed  # noqa: F401
    except ImportError:
        print(f"rslora study: Dask is not installed, so the training runs go to this process "
              f"only (pip install 'rslora[dask]' to use all {n} cores)", file=sys.stderr)
        return 1
    return n


def run(args) -> int:
    from ..errors import UserError
    from ..study import full_config, quick_config, run_study
    from ..study.output import REPORT

    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    cfg = quick_config(args.seed) if args.quick else full_config(args.seed)
    workers = args.workers
    if workers is None and args.scheduler is None:
        workers = _default_workers()
    t0 = time.perf_counter()
    run_study(cfg, args.out, force=args.force, workers=workers, scheduler=args.scheduler)
    print(f"rslora study ({cfg.mode}, seed {cfg.seed}) finished in "
          f"{time.perf_counter() - t0:.0f} s: {args.out}/{REPORT}", file=sys.stderr)
    return 0
