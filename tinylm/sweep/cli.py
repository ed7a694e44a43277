"""`tinylm sweep PRESET AXES... [--trials N] [--sampler ...] [--pruner ...] [--budget-...]
[--parallel K] [--storage URL] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinylm.cli_args import float_in, int_in


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="search config values with Optuna (TPE, random or grid), pruning losing runs",
        description="Train one run per trial of an Optuna study. Axes: key=log:a..b, key=a..b, "
        "key=int:a..b, key=choice:a,b,c, or key=a,b,c (a grid axis); other overrides apply to "
        "every trial. Each trial is a normal run directory under the sweep directory; the study "
        "lives in <sweep>/study.db and re-running the same command resumes it. Ends with a "
        "table sorted by best bits per byte, <sweep>/best.yaml and plots.",
    )
    p.add_argument("preset", help="preset name or YAML config file")
    p.add_argument("overrides", nargs="+", help="axes and key=value fixed overrides")
    p.add_argument(
        "--trials",
        type=int_in(1, 100_000),
        metavar="N",
        help="trials in the study (default: the whole grid for --sampler grid)",
    )
    p.add_argument(
        "--sampler",
        choices=("tpe", "random", "grid"),
        help="default: grid when every axis is a list of values, else tpe",
    )
    p.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    p.add_argument(
        "--random",
        type=int_in(1, 100_000),
        metavar="N",
        help="shorthand for --sampler random --trials N",
    )
    p.add_argument(
        "--seed", type=int_in(0, 2**32 - 1), default=0, help="the sampler's seed (default 0)"
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-steps", type=int_in(1, 10**9), metavar="S", help="train.max_steps per trial"
    )
    budget.add_argument(
        "--budget-tokens",
        type=float_in(gt=0, le=1e15),
        metavar="T",
        help="tokens per trial (steps from each config)",
    )
    budget.add_argument(
        "--budget-minutes",
        type=float_in(gt=0, le=1e6),
        metavar="M",
        help="wall-clock minutes per trial",
    )
    p.add_argument(
        "--parallel",
        type=int_in(1, 256),
        default=1,
        metavar="K",
        help="trials at once in this process (threads split)",
    )
    p.add_argument(
        "--storage",
        default="",
        metavar="URL",
        help="SQLAlchemy URL of the study (default sqlite:///<sweep>/study.db); a shared "
        "database lets several processes or machines work one study",
    )
    p.add_argument("--out", default="", help="sweep directory (default: sweeps/<preset>-<hash>)")
    p.add_argument(
        "--prune-after",
        type=float_in(ge=0, le=1),
        default=0.25,
        metavar="F",
        help="ask the pruner only after this fraction of a trial's steps (default 0.25)",
    )
    p.add_argument(
        "--prune-startup",
        type=int_in(0, 100_000),
        default=3,
        metavar="N",
        help="median pruner: prune nothing until N trials have finished (default 3)",
    )
    p.add_argument(
        "--abandon-factor",
        type=float_in(ge=0, le=1e6),
        default=2.0,
        help="stop a trial whose loss exceeds this many times the best trial's at the same "
        "step (0 = never; non-finite losses are always stopped)",
    )
    p.add_argument(
        "--abandon-after",
        type=float_in(ge=0, le=1),
        default=0.2,
        help="compare losses only after this fraction of a trial's steps (default 0.2)",
    )
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from tinylm.config import ConfigError, load_config
    from tinylm.sweep.plan import (
        FAILED,
        Budget,
        axis_ends,
        build_spec,
        check_same_sweep,
        default_trials,
        load_manifest,
        save_manifest,
    )
    from tinylm.sweep.report import write_report
    from tinylm.sweep.runner import Divergence, SweepRunner
    from tinylm.sweep.study import SweepStudy, default_storage, pruning_chances

    sampler, trials = args.sampler, args.trials
    if args.random is not None:
        if sampler not in (None, "random") or trials not in (None, args.random):
            raise ConfigError("--random N is --sampler random --trials N; give one or the other")
        sampler, trials = "random", args.random
    budget = Budget()
    for kind in ("steps", "tokens", "minutes"):
        if (value := getattr(args, f"budget_{kind}")) is not None:
            budget = Budget(kind, float(value))
    spec = build_spec(
        args.preset, args.overrides, budget=budget, sampler=sampler, pruner=args.pruner,
        seed=args.seed,
    )  # fmt: skip
    n_trials = default_trials(spec, trials)
    out = Path(args.out) if args.out else spec.default_dir()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    saved = load_manifest(out)
    check_same_sweep(spec, saved, out)
    storage = args.storage or (saved["storage"] if saved else default_storage(out))
    if saved and args.storage and args.storage != saved["storage"]:
        raise ConfigError(
            f"{out} keeps its study in {saved['storage']}, not {args.storage}; drop --storage "
            "or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    first = spec.trial_overrides({a.key: axis_ends(a)[0] for a in spec.axes})
    first_cfg = load_config(spec.preset, first)
    max_steps = first_cfg.train.max_steps
    chances = pruning_chances(max_steps, first_cfg.eval.interval, args.prune_after)
    if spec.pruner != "none" and budget.kind != "minutes" and chances < 2:
        print(
            f"sweep: note: eval.interval={first_cfg.eval.interval} leaves the {spec.pruner} pruner "
            f"{chances} evaluation(s) between {args.prune_after:.0%} of the {max_steps} steps and "
            f"the end, and it acts only at evaluations: e.g. eval.interval={max(1, max_steps // 10)}",
            file=sys.stderr,
        )
    study = SweepStudy(
        spec, out, storage=storage, n_trials=n_trials, max_steps=max_steps,
        prune_after=args.prune_after, prune_startup=args.prune_startup,
    )  # fmt: skip
    if saved is None:  # once the study opened: a bad --storage leaves no manifest naming it
        save_manifest(spec, out, storage)
    done = study.counted()
    print(
        f"sweep: {n_trials} trials ({spec.sampler} sampler, {spec.pruner} pruner) in {out}, "
        f"{done} already in the study, {args.parallel} at a time; study: {storage}"
    )
    result = SweepRunner(
        spec,
        study,
        out,
        parallel=args.parallel,
        divergence=Divergence(args.abandon_factor, args.abandon_after),
        after_trial=lambda: write_report(spec, study.study, out, plots=False),
    ).run()
    table, written = write_report(spec, study.study, out)
    print(table)
    print("wrote: " + ", ".join(str(p) for p in written))
    if result == "interrupted":
        print("sweep interrupted: re-run the same command to resume it", file=sys.stderr)
        return 130
    failed = [
        t
        for t in study.trials()
        if t.user_attrs.get("status") == FAILED and not t.user_attrs.get("requeued")
    ]
    return 1 if failed else 0
