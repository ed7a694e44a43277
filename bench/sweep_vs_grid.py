"""TPE + pruning against the full grid at a fixed per-trial budget (issue 20's measured figure).

The issue asks: on the `tiny` preset, does TPE + pruning reach a config within 1% of the full
grid's best validation bits/byte with <= 40% of the grid's compute (3 repetitions)? This runs
both as ordinary `tinylm sweep` commands on the same ranges:

  grid   `--sampler grid --pruner none` over lr x d_model (4 x 3 = 12 points by default)
  tpe    `--sampler tpe --pruner P --trials K --seed r` over `optim.lr=log:LO..HI` and
         `model.d_model=choice:...` (the grid's ends and its widths), per repetition r

The grid is run ONCE and reused by every repetition: training is seeded (`train.seed`, the same
for every trial), so at a fixed thread count the grid's runs, and its best value, come out the
same each time; only the TPE sampler's seed changes between repetitions.

Compute is read from the runs, not assumed: each trial's tokens actually trained (its newest
checkpoint's loop state, else its last train record: a pruned trial counts what it ran) times
its model's training FLOPs per token (tinylm/estimate.py: 6 x params + attention). Evaluation
FLOPs are not counted (the same `eval.*` settings on both sides). "Best" is the best bits/byte
of a finished trial (a pruned trial's early value is not a config trained at the budget).
Two compute figures per repetition: what all K trials of the study cost, and what it had spent
when it first *reached* a config within 1% of the grid's best (trials in order; a user watching
the study, or a `--trials` chosen smaller, would stop there).

Every sweep resumes when the script is re-run with the same arguments (the study is the
record); results go to OUT/results.json and a table on stdout.

Real measurement. Run time, estimated (not measured at this size): ~15 s per trial to start
and evaluate plus ~0.2 s per step at d_model 128 (tiny's ~215 ms/step, notes/issue-10-recipes.md)
on 2 idle cores: the 12-trial grid of 300 steps ~15 min, each TPE repetition ~40-50% of that
(~6-7 min): ~35 min with `--pruners median`, ~55 min with both pruners. The micro check below
took 5.2 min wall for 12 trials of 20 steps at load average 8 (~26 s per trial, mostly start-up).

    .venv/bin/python bench/sweep_vs_grid.py --out /tmp/sweep-vs-grid --budget-steps 300 \\
        --reps 3 --trials 6 --pruners median,hyperband

Micro check that the script works (minutes; the figures mean nothing at this size):

    .venv/bin/python bench/sweep_vs_grid.py --out /tmp/w20-svg --budget-steps 20 --lr 1e-3,4e-3 \\
        --d-model 32,64 --trials 2 --reps 2 --pruners median,hyperband \\
        --extra model.n_layer=2 model.context_length=64 eval.max_batches=2
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tinylm.config import load_config_file
from tinylm.estimate import estimate
from tinylm.runs import find_runs, read_metrics, summarize


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def fixed_overrides(budget_steps: int, extra: list[str]) -> list[str]:
    """What every trial of both sides shares: ~10 evaluations per trial (what pruning reads)."""
    interval = max(1, budget_steps // 10)
    return [
        f"eval.interval={interval}",
        "eval.max_batches=10",
        "eval.samples=0",
        f"log.interval={max(1, interval // 2)}",
        f"optim.warmup_steps={max(1, budget_steps // 10)}",
        "checkpoint.interval=0",
        "log.tensorboard=false",
        "log.progress=false",
        *extra,
    ]


def run_sweep(out: Path, axes: list[str], fixed: list[str], flags: list[str], log: Path) -> float:
    """One `tinylm sweep` (resumed if OUT exists); returns its wall seconds. Exit 1 = a failed trial."""
    cmd = [
        sys.executable,
        "-m",
        "tinylm.cli",
        "sweep",
        "tiny",
        *axes,
        *fixed,
        *flags,
        "--out",
        str(out),
    ]
    print(f"$ {' '.join(cmd[2:])}", flush=True)
    start = time.monotonic()
    with log.open("a") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if code not in (0, 1):
        sys.exit(f"sweep exited {code}: see {log}")
    return time.monotonic() - start


def trial_figures(run_dir: Path) -> dict[str, Any]:
    """A trial's status, best bits/byte, and compute actually run (module docstring)."""
    s = summarize(run_dir)
    records = read_metrics(run_dir)
    bpb = [
        float(r["val/bits_per_byte"])
        for r in records
        if r.get("kind") == "eval" and isinstance(r.get("val/bits_per_byte"), (int, float))
    ]
    pruned = any(r.get("kind") == "event" and r.get("event") == "pruned" for r in records)
    flops_per_token = estimate(load_config_file(run_dir / "config.yaml")).flops_per_token
    return {
        "run": run_dir.name,
        "status": "pruned" if pruned else s.status,
        "steps": s.step,
        "tokens": s.tokens,
        "flops": s.tokens * flops_per_token,
        "best_bpb": min(bpb) if bpb else None,
    }


def sweep_figures(out: Path) -> dict[str, Any]:
    """Totals of one sweep directory: best finished bits/byte, tokens and FLOPs of every trial."""
    trials = [trial_figures(p) for p in find_runs(out) if p.name.startswith("t")]
    finished = [t for t in trials if t["status"] == "finished" and t["best_bpb"] is not None]
    best = min(finished, key=lambda t: t["best_bpb"]) if finished else None
    return {
        "dir": str(out),
        "trials": trials,
        "best_bpb": best["best_bpb"] if best else None,
        "best_run": best["run"] if best else None,
        "tokens": sum(t["tokens"] for t in trials),
        "flops": sum(t["flops"] for t in trials),
        "pruned": sum(t["status"] == "pruned" for t in trials),
    }


def reach_fraction(trials: list[dict[str, Any]], target: float, grid_flops: float) -> float | None:
    """The share of the grid's FLOPs a study had spent, in trial order (`tNNN-` run names; trials
    run one at a time), when its first finished trial within `target` bits/byte ended; None if
    none did. A study of K trials stops at K whatever it found: this is what it took to *reach*
    a config that good, the total is what the K trials cost."""
    spent = 0.0
    for t in sorted(trials, key=lambda t: t["run"]):
        spent += t["flops"]
        if t["status"] == "finished" and t["best_bpb"] is not None and t["best_bpb"] <= target:
            return spent / grid_flops
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/sweep-vs-grid")
    p.add_argument("--budget-steps", type=int, default=300, help="train.max_steps per trial")
    p.add_argument("--lr", default="1e-3,2e-3,4e-3,8e-3", help="the grid's optim.lr values")
    p.add_argument("--d-model", default="64,96,128", help="the grid's model.d_model values")
    p.add_argument("--trials", type=int, default=6, help="TPE trials per repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--pruners", default="median", help="comma list of median,hyperband")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every trial")
    args = p.parse_args()
    lrs, widths = _floats(args.lr), _ints(args.d_model)
    pruners = [v for v in args.pruners.split(",") if v]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "sweeps.log"
    fixed = fixed_overrides(args.budget_steps, args.extra)
    budget = ["--budget-steps", str(args.budget_steps)]
    grid_axes = [
        f"optim.lr={','.join(map(str, lrs))}",
        f"model.d_model={','.join(map(str, widths))}",
    ]
    tpe_axes = [
        f"optim.lr=log:{min(lrs)}..{max(lrs)}",
        f"model.d_model=choice:{','.join(map(str, widths))}",
    ]
    print(f"grid: {len(lrs) * len(widths)} points, run once and reused by all {args.reps} "
          "repetitions (seeded training: the same runs each time)")  # fmt: skip
    wall = {
        "grid": run_sweep(
            out / "grid", grid_axes, fixed, ["--sampler", "grid", "--pruner", "none", *budget], log
        )
    }
    grid = sweep_figures(out / "grid")
    if grid["best_bpb"] is None:
        sys.exit(f"the grid finished no trial: see {log}")
    reps = []
    for pruner in pruners:
        for r in range(args.reps):
            name = f"tpe-{pruner}-seed{r}"
            flags = [
                "--sampler",
                "tpe",
                "--pruner",
                pruner,
                "--trials",
                str(args.trials),
                "--seed",
                str(r),
                *budget,
            ]
            wall[name] = run_sweep(out / name, tpe_axes, fixed, flags, log)
            tpe = sweep_figures(out / name)
            ratio = tpe["best_bpb"] / grid["best_bpb"] if tpe["best_bpb"] is not None else math.inf
            reps.append({
                "pruner": pruner, "seed": r, "tpe": tpe,
                "ratio": ratio, "flops_fraction": tpe["flops"] / grid["flops"],
                "tokens_fraction": tpe["tokens"] / grid["tokens"],
                "within_1pct": ratio <= 1.01, "within_40pct_compute": tpe["flops"] / grid["flops"] <= 0.40,
                "reach_fraction": reach_fraction(tpe["trials"], 1.01 * grid["best_bpb"], grid["flops"]),
            })  # fmt: skip
    print(f"\ngrid: best {grid['best_bpb']:.4f} bits/byte ({grid['best_run']}), "
          f"{grid['flops']:.3g} FLOPs, {grid['tokens']:,} tokens, {len(grid['trials'])} trials")  # fmt: skip
    print(f"{'pruner':<10} {'seed':>4} {'best':>8} {'ratio':>7} {'FLOPs':>7} {'tokens':>7} "
          f"{'pruned':>6}  target (<=1.01 at <=0.40)  FLOPs to reach 1%")  # fmt: skip
    for x in reps:
        t = x["tpe"]
        best = f"{t['best_bpb']:.4f}" if t["best_bpb"] is not None else "-"
        ok = "met" if x["within_1pct"] and x["within_40pct_compute"] else "not met"
        reach = "-" if x["reach_fraction"] is None else f"{x['reach_fraction']:.1%}"
        print(f"{x['pruner']:<10} {x['seed']:>4} {best:>8} {x['ratio']:>7.4f} {x['flops_fraction']:>7.1%} "
              f"{x['tokens_fraction']:>7.1%} {t['pruned']:>3}/{len(t['trials']):<2}  {ok:<26} {reach}")  # fmt: skip
    for pruner in pruners:
        mine = [x for x in reps if x["pruner"] == pruner]
        met = sum(x["within_1pct"] and x["within_40pct_compute"] for x in mine)
        reached = sum(x["reach_fraction"] is not None and x["reach_fraction"] <= 0.40 for x in mine)
        print(
            f"{pruner}: {met}/{len(mine)} repetitions within 1% of the grid's best at <= 40% of its FLOPs"
            f" in all; {reached}/{len(mine)} had reached such a config by 40% of its FLOPs"
        )
    result = {"args": vars(args), "fixed": fixed, "grid": grid, "reps": reps, "wall_seconds": wall}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'results.json'} (sweep output: {log})")


if __name__ == "__main__":
    main()
