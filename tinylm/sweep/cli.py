"""`tinylm sweep PRESET key=v1,v2 ... [--random N] [--budget-...] [--parallel K] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinylm.cli_args import float_in, int_in


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train a grid (or random sample) of configs and compare them",
        description="Run one training per point of a grid: an override with commas is an axis "
        "(optim.lr=1e-3,2e-3,4e-3), others apply to every run. Each run is a normal run directory "
        "under the sweep directory; re-running the same command resumes the sweep. Ends with a "
        "table sorted by best validation loss and a plot of the curves.",
    )
    p.add_argument("preset", help="preset name or YAML config file")
    p.add_argument("overrides", nargs="+", help="key=v1,v2 axes and key=value fixed overrides")
    p.add_argument(
        "--random", type=int_in(0, 100_000), default=0, metavar="N", help="N random grid points"
    )
    p.add_argument(
        "--seed", type=int_in(0, 2**32 - 1), default=0, help="seed of --random (default 0)"
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-steps", type=int_in(1, 10**9), metavar="S", help="train.max_steps per run"
    )
    budget.add_argument(
        "--budget-tokens",
        type=float_in(gt=0, le=1e15),
        metavar="T",
        help="tokens per run (steps from each config)",
    )
    budget.add_argument(
        "--budget-minutes",
        type=float_in(gt=0, le=1e6),
        metavar="M",
        help="wall-clock minutes per run",
    )
    p.add_argument(
        "--parallel",
        type=int_in(1, 256),
        default=1,
        metavar="K",
        help="runs at once (threads split)",
    )
    p.add_argument("--out", default="", help="sweep directory (default: sweeps/<preset>-<hash>)")
    p.add_argument(
        "--abandon-factor",
        type=float,
        default=2.0,
        help="abandon a run whose loss exceeds this many times the best run's at the same step "
        "(0 = never; non-finite losses are always abandoned)",
    )
    p.add_argument(
        "--abandon-after",
        type=float,
        default=0.2,
        help="compare losses only after this fraction of a run's steps (default 0.2)",
    )
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from tinylm.config import ConfigError
    from tinylm.sweep.plan import (
        FAILED,
        Budget,
        build_plan,
        load_manifest,
        reconcile,
        save_manifest,
    )
    from tinylm.sweep.report import write_report
    from tinylm.sweep.runner import Divergence, SweepRunner

    if args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    if args.abandon_factor < 0 or not 0 <= args.abandon_after <= 1:
        raise ConfigError("--abandon-factor must be >= 0 and --abandon-after in [0, 1]")
    budget = Budget()
    for kind in ("steps", "tokens", "minutes"):
        if (value := getattr(args, f"budget_{kind}")) is not None:
            budget = Budget(kind, float(value))
    plan = build_plan(
        args.preset, args.overrides, random_samples=args.random, seed=args.seed, budget=budget
    )
    out = Path(args.out) if args.out else plan.default_dir()
    plan = reconcile(plan, load_manifest(out), out)
    save_manifest(plan, out)
    left = sum(r.status not in ("finished", "abandoned") for r in plan.runs)
    print(f"sweep: {len(plan.runs)} runs in {out} ({left} to run, {args.parallel} at a time)")
    result = SweepRunner(
        plan,
        out,
        parallel=args.parallel,
        divergence=Divergence(args.abandon_factor, args.abandon_after),
    ).run()
    table, png = write_report(plan, out)
    print(table)
    print(f"summary: {out / 'summary.md'}" + (f"; plot: {png}" if png else ""))
    if result == "interrupted":
        print("sweep interrupted: re-run the same command to resume it", file=sys.stderr)
        return 130
    return 1 if any(r.status == FAILED for r in plan.runs) else 0
