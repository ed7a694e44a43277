"""The results of a sweep: a table of its trials sorted by best bits per byte, the best trial's
config as a ready preset, and plots.

Everything is read from the study (statuses, parameters, run names) and from what the runs wrote
(`metrics.jsonl`), so the report of an interrupted or partly failed sweep shows what exists.
Written next to the runs, atomically:
  summary.md / summary.json   the table (and the same rows as data: what the dashboard's sweep
                              page reads)
  best.yaml                   the best finished trial's resolved config, with out_dir/run_name
                              reset: `tinylm train <sweep>/best.yaml` trains it again
  curves.png                  the runs' curves (tinylm/runs.py's comparison plot)
  history.png, importances.png, parallel.png, intermediate.png
                              Optuna's visualisation (matplotlib backend): the optimisation
                              history, parameter importances (fANOVA), parallel coordinates,
                              and every trial's reported evaluations
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from tinylm.config import ConfigError
from tinylm.fileio import atomic_write_text
from tinylm.runs import METRICS_FILE, metric_number, plot_runs, read_metrics
from tinylm.sweep.plan import FAILED, FINISHED, PENDING, PRUNED, RUNNING, SweepSpec, run_dir

SUMMARY_JSON = "summary.json"
BEST_YAML = "best.yaml"
PLOTS = ("history", "importances", "parallel", "intermediate")


@dataclass
class SweepRow:
    trial: int
    name: str
    params: dict[str, str]
    status: str
    reason: str
    steps: int
    tokens: int
    train_minutes: float  # summed step time (evaluation and start-up excluded)
    best_val_loss: float | None
    best_bits_per_byte: float | None  # at the evaluation with the best loss


def trial_status(frozen: Any) -> str:
    """finished / pruned / failed / running / pending of a study trial."""
    state = frozen.state.name
    if state == "COMPLETE":
        return FINISHED
    if state == "PRUNED":
        return PRUNED
    if state == "FAIL":
        return FAILED
    if state == "RUNNING":
        return RUNNING
    return PENDING


def run_row(trial: int, name: str, params: dict, status: str, reason: str, path: Path) -> SweepRow:
    """One row from a run's metrics (zeros and None where it logged nothing yet)."""
    records = read_metrics(path) if (path / METRICS_FILE).is_file() else []
    train = [r for r in records if r.get("kind") == "train"]
    evals = [
        r
        for r in records
        if r.get("kind") == "eval"
        and (v := metric_number(r.get("val/loss"))) is not None
        and math.isfinite(v)
    ]
    best = min(evals, key=lambda r: float(r["val/loss"])) if evals else None
    minutes, previous = 0.0, 0
    for r in train:
        minutes += float(r.get("ms_per_step", 0.0)) * (int(r["step"]) - previous) / 60_000
        previous = int(r["step"])
    return SweepRow(
        trial=trial,
        name=name,
        params={k: str(v) for k, v in params.items()},
        status=status,
        reason=reason,
        steps=int(train[-1]["step"]) if train else 0,
        tokens=int(train[-1].get("tokens", 0)) if train else 0,
        train_minutes=minutes,
        best_val_loss=float(best["val/loss"]) if best else None,
        best_bits_per_byte=metric_number(best.get("val/bits_per_byte")) if best else None,
    )


def sort_rows(rows: list[SweepRow]) -> list[SweepRow]:
    """Best bits per byte first (best loss where a run has none); runs without either last."""

    def key(r: SweepRow) -> tuple:
        score = r.best_bits_per_byte if r.best_bits_per_byte is not None else r.best_val_loss
        return (score is None, score or 0.0, r.trial)

    return sorted(rows, key=key)


def collect(trials: list[Any], out_dir: Path) -> list[SweepRow]:
    """One row per study trial that has a run (re-queued failures included), best first."""
    rows = []
    for t in trials:
        name = t.user_attrs.get("run")
        if name is None:
            continue
        path = run_dir(out_dir, name, f"study trial {t.number}")
        params = t.user_attrs.get("params")
        params = params if isinstance(params, dict) else dict(t.params)
        status = str(t.user_attrs.get("status") or trial_status(t))
        rows.append(
            run_row(t.number, name, params, status, str(t.user_attrs.get("reason", "")), path)
        )
    return sort_rows(rows)


def format_table(rows: list[SweepRow], axes: list[str]) -> str:
    """Aligned text table: rank, run, one column per axis, status, progress, best val, bits/byte."""
    leaves = [key.rsplit(".", 1)[-1] for key in axes]
    header = ["#", "run", *leaves, "status", "steps", "tokens", "train min", "best val",
              "bits/byte"]  # fmt: skip
    table = [header]
    for rank, row in enumerate(rows, 1):
        table.append(
            [
                str(rank),
                row.name,
                *(_short(row.params.get(key, "")) for key in axes),
                row.status,
                str(row.steps),
                f"{row.tokens:,}",
                f"{row.train_minutes:.1f}",
                "-" if row.best_val_loss is None else f"{row.best_val_loss:.4f}",
                "-" if row.best_bits_per_byte is None else f"{row.best_bits_per_byte:.4f}",
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if len(value) <= 8 or not math.isfinite(number) else f"{number:.4g}"


def write_best(rows: list[SweepRow], out_dir: Path) -> Path | None:
    """`best.yaml`: the best finished trial's resolved config as a preset (None if none)."""
    best = next((r for r in rows if r.status == FINISHED and r.best_val_loss is not None), None)
    if best is None:
        return None
    config = out_dir / best.name / "config.yaml"
    try:
        tree = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{config}: cannot read the best trial's config ({e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{config} is not a tinylm config")
    tree["out_dir"], tree["run_name"] = "runs", ""  # a new run, not the trial's directory
    score = best.best_bits_per_byte if best.best_bits_per_byte is not None else best.best_val_loss
    params = ", ".join(f"{k}={v}" for k, v in best.params.items())
    header = (
        f"# The best trial of sweep {out_dir.name}: trial {best.trial} ({best.name}), "
        f"best val {score:.4f}\n# {params}\n# Train it again: tinylm train {out_dir / BEST_YAML}\n"
    )
    path = out_dir / BEST_YAML
    atomic_write_text(path, header + yaml.safe_dump(tree, sort_keys=False))
    return path


def write_plots(study: Any, rows: list[SweepRow], out_dir: Path) -> list[Path]:
    """curves.png and Optuna's plots; a plot that needs more trials is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ov

    written = []
    plotted = [out_dir / r.name for r in rows if r.steps > 0]
    if plotted:
        written.append(plot_runs(plotted, out_dir / "curves.png"))
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    makers = {
        "history": ov.plot_optimization_history,
        "importances": ov.plot_param_importances,
        "parallel": ov.plot_parallel_coordinate,
        "intermediate": ov.plot_intermediate_values,
    }
    for name, make in makers.items():
        if len(finished) < (2 if name in ("importances", "parallel") else 1):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make(study)
            fig = ax if hasattr(ax, "flat") else [ax]
            figure = next(iter(getattr(fig, "flat", fig))).figure
            figure.set_size_inches(9, 5.5)
            figure.tight_layout()
            path = out_dir / f"{name}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            written.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError):
            # e.g. importances over one distinct value: nothing to show, not an error
            plt.close("all")
    return written


def write_report(
    spec: SweepSpec, study: Any, out_dir: Path, *, plots: bool = True
) -> tuple[str, list[Path]]:
    """Write summary.md/json, best.yaml and the plots; return the table and the files written."""
    rows = collect(study.get_trials(deepcopy=False), out_dir)
    table = format_table(rows, [a.key for a in spec.axes])
    notes = [f"- {r.name}: {r.status}: {r.reason}" for r in rows if r.reason]
    text = f"# sweep {out_dir.name}\n\n```\n{table}\n```\n" + (
        "\n" + "\n".join(notes) + "\n" if notes else ""
    )
    atomic_write_text(out_dir / "summary.md", text)
    data = {
        "sweep": out_dir.name,
        "axes": [asdict(a) for a in spec.axes],
        "sampler": spec.sampler,
        "pruner": spec.pruner,
        "trials": [asdict(r) for r in rows],
    }
    atomic_write_text(out_dir / SUMMARY_JSON, json.dumps(data, indent=1))
    written = [out_dir / "summary.md"]
    if (best := write_best(rows, out_dir)) is not None:
        written.append(best)
    if plots:
        written += write_plots(study, rows, out_dir)
    return table, written
