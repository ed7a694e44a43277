"""`tinylm scaling SWEEP_DIR`: fit a scaling law to a sweep's finished runs and use it.

Each finished run under the directory (any run directory: a sweep's trials, or `runs/`) is one
point: N = its model's non-embedding parameters (tinylm/estimate.py, counted on the meta device),
D = the tokens it trained on (its last train record), L = its final validation loss (the
evaluation at its last step). Runs that did not finish (pruned, stopped, failed, running) are
left out: their learning-rate schedule had not ended, so their loss is not the one their budget
buys. The command prints the fit with its error, a per-run table, and, for a budget
(`--budget-flops`, or `--budget-hours` at this machine's speed as the runs measured it, or at
`--tflops`), the compute-optimal model size and tokens; then plots the runs against the fit.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from tinylm.cli_args import float_in


@dataclass
class Point:
    run: str
    n: int  # non-embedding parameters
    d: int  # tokens trained
    loss: float  # final validation loss
    flops_per_second: float | None  # measured: model FLOPs per token x tokens per second


def collect_points(root: Path) -> tuple[list[Point], list[str]]:
    """The finished runs under `root` as points, and a note per run left out."""
    from tinylm.config import ConfigError, load_config
    from tinylm.estimate import model_counts
    from tinylm.runs import find_runs, metric_number, read_metrics, summarize

    points, skipped = [], []
    counts: dict[str, tuple[int, int, int, int]] = {}  # a sweep repeats model shapes
    for run_dir in find_runs(root):
        status = summarize(run_dir).status
        if status != "finished":
            skipped.append(f"{run_dir.name}: {status}")
            continue
        records = read_metrics(run_dir)
        train = [r for r in records if r.get("kind") == "train" and "tokens" in r]
        evals = [r for r in records if r.get("kind") == "eval" and "val/loss" in r]
        loss = metric_number(evals[-1]["val/loss"]) if evals else None
        if not train or loss is None or not math.isfinite(loss) or loss <= 0:
            skipped.append(f"{run_dir.name}: no final validation loss")
            continue
        try:
            cfg = load_config(str(run_dir / "config.yaml"))
        except ConfigError as e:
            skipped.append(f"{run_dir.name}: {e}")
            continue
        shape = repr(cfg.model)
        if shape not in counts:
            counts[shape] = model_counts(cfg.model)
        _, body, flops, _ = counts[shape]
        speeds = [v for r in train if (v := metric_number(r.get("tokens_per_second")))]
        speed = flops * statistics.median(speeds) if speeds else None
        points.append(Point(run_dir.name, body, int(train[-1]["tokens"]), loss, speed))
    return points, skipped


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scaling",
        help="fit a loss-vs-compute law to a sweep's runs and size a model for a budget",
        description="Fit L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla) or L(C) = E + A/C^gamma "
        "to the finished runs under a directory, print it with its error, predict the "
        "compute-optimal size for a budget and plot the runs against the fit.",
    )
    p.add_argument("root", help="a sweep directory (or any directory of runs)")
    p.add_argument(
        "--law",
        choices=("auto", "nd", "c"),
        default="auto",
        help="nd: L(N, D); c: L(C); auto: L(N, D) when the runs vary both N and D (>= 5 runs)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-flops", type=float_in(gt=0, le=1e30), metavar="C")
    budget.add_argument("--budget-hours", type=float_in(gt=0, le=1e6), metavar="H")
    p.add_argument(
        "--tflops",
        type=float_in(gt=0, le=1e6),
        help="speed for --budget-hours (default: the median speed the runs measured)",
    )
    p.add_argument("--out", default="", help="plot file (default ROOT/scaling.png)")
    p.set_defaults(func=cmd_scaling)


def _si(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def cmd_scaling(args: argparse.Namespace) -> int:
    import numpy as np

    from tinylm.config import ConfigError
    from tinylm.scaling.fit import fit_c, fit_nd

    root = Path(args.root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory of runs")
    points, skipped = collect_points(root)
    for note in skipped:
        print(f"left out {note}")
    n = np.array([p.n for p in points], dtype=np.float64)
    d = np.array([p.d for p in points], dtype=np.float64)
    loss = np.array([p.loss for p in points])
    varied = len(set(n.tolist())) > 1 and len(set(d.tolist())) > 1
    law = args.law if args.law != "auto" else ("nd" if varied and len(points) >= 5 else "c")
    need = 5 if law == "nd" else 3
    if len(points) < need or (law == "nd" and not varied):
        raise ConfigError(
            f"{root}: {len(points)} finished runs; L({'N, D' if law == 'nd' else 'C'}) needs at "
            f"least {need}"
            + (" with several model sizes and token counts" if law == "nd" else "")
            + ": run a sweep over model.d_model/n_layer and the budget first"
        )
    fit = fit_nd(n, d, loss) if law == "nd" else fit_c(6 * n * d, loss)
    print(f"fit: {fit.describe()}")
    pred = fit.predict(n, d)
    print(f"{'run':<32} {'N':>8} {'D':>8} {'C':>8} {'loss':>7} {'fit':>7} {'err':>6}")
    for p, q in zip(points, pred.tolist(), strict=True):
        c = 6 * p.n * p.d
        print(
            f"{p.run[:32]:<32} {_si(p.n):>8} {_si(p.d):>8} {c:>8.2e} {p.loss:>7.4f} {q:>7.4f} "
            f"{100 * (q / p.loss - 1):>+5.1f}%"
        )
    budget = args.budget_flops
    if args.budget_hours is not None:
        speeds = [p.flops_per_second for p in points if p.flops_per_second]
        if args.tflops is None and not speeds:
            raise ConfigError("--budget-hours needs a speed: the runs logged none; give --tflops")
        speed = args.tflops * 1e12 if args.tflops else statistics.median(speeds)
        budget = args.budget_hours * 3600 * speed
        source = "--tflops" if args.tflops else "the runs' median measured speed"
        print(
            f"budget: {args.budget_hours:g} h at {speed / 1e12:.4g} TFLOP/s ({source}) = {budget:.3e} FLOPs"
        )
    optimum = None
    if budget is not None:
        optimum = fit.optimum(budget)
        if optimum is None:
            best = float(fit.predict(budget / 6, 1.0))
            print(f"at C = {budget:.3e} FLOPs: predicted loss {best:.4f} (L(C) has no N/D split)")
        else:
            n_opt, d_opt = optimum
            best = float(fit.predict(n_opt, d_opt))
            print(
                f"compute-optimal at C = {budget:.3e} FLOPs: N = {_si(n_opt)} non-embedding "
                f"parameters, D = {_si(d_opt)} tokens ({d_opt / n_opt:.1f} tokens per "
                f"parameter), predicted loss {best:.4f}"
            )
    out = Path(args.out) if args.out else root / "scaling.png"
    plot_fit(points, fit, out, budget, optimum)
    print(f"plot: {out}")
    return 0


def plot_fit(points: list[Point], fit, out: Path, budget: float | None, optimum) -> Path:
    """Loss against compute: the runs (coloured by model size) and the fitted law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tinylm.fileio import atomic_write

    fig, ax = plt.subplots(figsize=(8, 5))
    sizes = sorted({p.n for p in points})
    cmap = plt.get_cmap("viridis")
    c_all = np.array([6 * p.n * p.d for p in points], dtype=np.float64)
    lo, hi = c_all.min() / 2, max(c_all.max(), budget or 0) * 2
    for i, size in enumerate(sizes):
        color = cmap(i / max(1, len(sizes) - 1))
        mine = [p for p in points if p.n == size]
        ax.scatter([6 * p.n * p.d for p in mine], [p.loss for p in mine], color=color,
                   label=f"N = {_si(size)}", zorder=3)  # fmt: skip
        if fit.form == "N,D":
            c = np.geomspace(lo, hi, 100)
            ax.plot(c, fit.predict(size, c / (6 * size)), color=color, alpha=0.6)
    if fit.form == "C":
        c = np.geomspace(lo, hi, 100)
        ax.plot(c, fit.predict(c / 6, 1.0), color="k", alpha=0.7, label="fit L(C)")
    if budget is not None:
        ax.axvline(budget, color="r", linestyle="--", alpha=0.6, label="budget")
        if optimum is not None:
            ax.scatter([budget], [fit.predict(*optimum)], marker="*", s=180, color="r", zorder=4,
                       label=f"optimum N = {_si(optimum[0])}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6 N D (FLOPs)")
    ax.set_ylabel("final validation loss")
    ax.set_title(fit.describe().split("   ")[0], fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out
