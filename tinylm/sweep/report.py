"""The end of a sweep: a table of its runs sorted by best validation loss, and a plot of the curves.

Everything is read from what the runs wrote (`metrics.jsonl`) and the manifest's statuses, so the
report of an interrupted or partly failed sweep shows what exists. Written next to the runs:
`summary.md` (the table), `summary.json` (the same rows as data) and `curves.png` (tinylm/runs.py's
comparison plot of every run that logged a step).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from tinylm.fileio import atomic_write_text
from tinylm.runs import METRICS_FILE, metric_number, plot_runs, read_metrics
from tinylm.sweep.plan import SweepPlan


@dataclass
class SweepRow:
    name: str
    params: dict[str, str]
    status: str
    reason: str
    steps: int
    tokens: int
    train_minutes: float  # summed step time (evaluation and start-up excluded)
    best_val_loss: float | None
    best_bits_per_byte: float | None  # at the evaluation with the best loss


def collect(plan: SweepPlan, out_dir: Path) -> list[SweepRow]:
    """One row per planned run, best first (runs without a validation loss last, in plan order)."""
    rows = []
    for run in plan.runs:
        run_dir = out_dir / run.name
        records = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
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
        rows.append(
            SweepRow(
                name=run.name,
                params=run.params,
                status=run.status,
                reason=run.reason,
                steps=int(train[-1]["step"]) if train else 0,
                tokens=int(train[-1].get("tokens", 0)) if train else 0,
                train_minutes=minutes,
                best_val_loss=float(best["val/loss"]) if best else None,
                best_bits_per_byte=metric_number(best.get("val/bits_per_byte")) if best else None,
            )
        )
    return sorted(rows, key=lambda r: (r.best_val_loss is None, r.best_val_loss or 0.0))


def format_table(rows: list[SweepRow], axes: list[str]) -> str:
    """Aligned text table: rank, run, one column per axis, status, progress, best val, bits/byte."""
    leaves = [key.rsplit(".", 1)[-1] for key in axes]
    header = [
        "#",
        "run",
        *leaves,
        "status",
        "steps",
        "tokens",
        "train min",
        "best val",
        "bits/byte",
    ]
    table = [header]
    for rank, row in enumerate(rows, 1):
        table.append(
            [
                str(rank),
                row.name,
                *(row.params.get(key, "") for key in axes),
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


def write_report(plan: SweepPlan, out_dir: Path) -> tuple[str, Path | None]:
    """Write summary.md, summary.json and curves.png; return the table and the plot's path."""
    rows = collect(plan, out_dir)
    table = format_table(rows, list(plan.axes))
    notes = [f"- {r.name}: {r.status}: {r.reason}" for r in rows if r.reason]
    text = f"# sweep {out_dir.name}\n\n```\n{table}\n```\n" + (
        "\n" + "\n".join(notes) + "\n" if notes else ""
    )
    _write_atomic(out_dir / "summary.md", text)
    _write_atomic(out_dir / "summary.json", json.dumps([asdict(r) for r in rows], indent=1))
    plotted = [out_dir / r.name for r in rows if r.steps > 0]
    png = plot_runs(plotted, out_dir / "curves.png") if plotted else None
    return table, png


def _write_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text)
