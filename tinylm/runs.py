"""`tinylm runs` and `tinylm plot`: what is in a runs directory, and curves that compare runs.

Both read only what a run writes anyway (`metrics.jsonl`, `config.yaml`, `checkpoints/`), so they
work on a live run, a finished one, or one copied from another machine.

A run's status comes from the events in `metrics.jsonl` after its last "start" event:
  finished  a "done" event (reached train.max_steps)
  stopped   a "stopped" event (signal, early stopping, time limit, non-finite losses)
  pruned    a "pruned" event (a sweep stopped it as losing: tinylm/sweep/runner.py)
  failed    a "failed" event (an exception), or no end event and the process is gone
            (killed, out of memory, machine lost)
  running   no end event and the process is alive: checked by pid on the machine that
            started it, else guessed from a metrics line in the last `STALE_MINUTES`
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"  # the name sinks.py writes (not imported: keeps `--help` instant)
STALE_MINUTES = 15.0  # another machine's run with no metrics line for this long is called failed
END_EVENTS = {"done": "finished", "stopped": "stopped", "failed": "failed", "pruned": "pruned"}
PLOT_FORMATS = (".png", ".svg", ".pdf")  # what `plot --out` may end with


@dataclass
class RunSummary:
    """One row of `tinylm runs`."""

    path: Path
    status: str
    step: int
    max_steps: int | None
    tokens: int
    best_val_loss: float | None
    last_train_loss: float | None
    last_checkpoint: str | None
    bad_lines: int = 0  # malformed lines of metrics.jsonl, skipped


class MetricsRecords(list):
    """The records of one `metrics.jsonl` (a list of dicts), and how many lines were malformed."""

    bad_lines: int = 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(record: Any) -> str | None:
    """Why a parsed `metrics.jsonl` line is not a record tinylm writes, or None when it is.

    Only the fields readers index or convert are checked (kind, step, tokens, time, and the
    start event's pid and max_steps); metric values go through `metric_number` where used.
    """
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not an object"
    kind = record.get("kind")
    if not isinstance(kind, str):
        return "no 'kind'"
    step = record.get("step")
    if step is None and kind in ("train", "eval", "sample"):
        return "no 'step'"
    if kind == "train" and "tokens" not in record:
        return "no 'tokens'"
    if step is not None and not (_is_int(step) and step >= 0):
        return f"'step' is {step!r}"
    for key in ("tokens", "time"):
        if key in record and not _is_number(record[key]):
            return f"'{key}' is not a number"
    if kind == "event":
        if not isinstance(record.get("event", ""), str):
            return "'event' is not a name"
        for key in ("pid", "max_steps"):
            if key in record and not _is_int(record[key]):
                return f"'{key}' is not an integer"
    return None


def parse_record(line: bytes | str) -> dict[str, Any] | None:
    """One `metrics.jsonl` line as a record, or None when it is not one (malformed JSON, bytes
    that are not UTF-8, or a value of the wrong type): the one place every reader of metrics
    (`tinylm runs`/`plot`, sweeps, the dashboard) decides what a line is."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):  # JSONDecodeError is a ValueError
        return None
    return record if record_problem(record) is None else None


def read_metrics(run_dir: str | Path) -> MetricsRecords:
    """The records of `run_dir/metrics.jsonl`, skipping malformed lines and counting them in
    `.bad_lines` (a line still being written, the last one without its newline, is skipped
    without being counted): one damaged line must not hide the rest of a run, or other runs."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE}; is it a run directory?")
    records = MetricsRecords()
    data = path.read_bytes()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        record = parse_record(line)
        if record is not None:
            records.append(record)
        elif i < len(lines) - 1:  # complete lines only: the last may be mid-write
            records.bad_lines += 1
    return records


def bad_lines_note(run_dir: str | Path, count: int) -> str:
    """The note that says a run's metrics file had malformed lines (empty when none)."""
    if not count:
        return ""
    return (
        f"note: {Path(run_dir) / METRICS_FILE}: {count} malformed line(s) skipped "
        "(edited or damaged; the other lines are shown)"
    )


def metric_number(value: Any) -> float | None:
    """A metric as a float (sinks.py writes NaN/inf as strings), or None when absent."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _process_alive(pid: int, started: float) -> bool:
    """True if `pid` is a live process that began no later than the run's start event."""
    import psutil

    try:
        # A reused pid belongs to a process created after the run's start event.
        return psutil.Process(pid).create_time() <= started + 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def run_status(records: list[dict[str, Any]], metrics_mtime: float) -> str:
    """finished / stopped / failed / running, from the events (see the module docstring)."""
    events = [r for r in records if r.get("kind") == "event"]
    starts = [i for i, r in enumerate(events) if r.get("event") == "start"]
    if not starts:
        return "failed" if time.time() - metrics_mtime > 60 * STALE_MINUTES else "running"
    start = events[starts[-1]]
    for record in reversed(events[starts[-1] + 1 :]):
        if record.get("event") in END_EVENTS:
            return END_EVENTS[record["event"]]
    if start.get("host") == socket.gethostname() and "pid" in start:
        alive = _process_alive(int(start["pid"]), float(start.get("time", 0.0)))
        return "running" if alive else "failed"
    return "running" if time.time() - metrics_mtime < 60 * STALE_MINUTES else "failed"


def _max_steps(run_dir: Path, records: list[dict[str, Any]]) -> int | None:
    for record in reversed(records):
        if record.get("event") == "start" and "max_steps" in record:
            return int(record["max_steps"])
    train = _config_tree(run_dir).get("train")
    max_steps = train.get("max_steps") if isinstance(train, dict) else None
    return max_steps if _is_int(max_steps) else None


def _config_tree(run_dir: str | Path) -> dict[str, Any]:
    """The run's config.yaml as a dict; {} when absent or unreadable (a display never fails
    on it: `train --resume` is where a damaged config is reported)."""
    import yaml

    from tinylm.yamlio import load as load_yaml

    try:
        tree = load_yaml((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def checkpoint_loop_state(path: Path) -> dict[str, Any] | None:
    """The loop state (step, tokens_seen, ...) saved in a checkpoint, or None if unreadable.

    From meta.json; checkpoints written before it held the loop state fall back to
    train_state.pt, memory-mapped so the optimizer state is not read.
    """
    from tinylm.train import checkpoint

    try:
        meta = checkpoint.read_meta(path)
    except (OSError, ValueError):
        return None
    if isinstance(meta.get("loop"), dict):
        return meta["loop"]
    import torch

    try:
        state = torch.load(
            path / checkpoint.STATE_FILE, map_location="cpu", mmap=True, weights_only=True
        )
    except Exception:  # a checkpoint we cannot read says nothing about progress
        return None
    return state.get("loop") if isinstance(state, dict) else None


def summarize(run_dir: str | Path) -> RunSummary:
    """Status, progress and headline figures of one run directory.

    Steps and tokens come from the latest checkpoint's loop state (what a resume continues from),
    not from the last log line, which lags a stop between log intervals; a live run logged
    past its latest checkpoint shows its logged progress.
    """
    from tinylm.train import checkpoint

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    # The furthest step any line names: a stop is logged at its step even between log lines.
    logged_step = max((r["step"] for r in records if r.get("step") is not None), default=0)
    latest = checkpoint.find_latest(run_dir / "checkpoints", verify_hashes=False)
    state = checkpoint_loop_state(latest) if latest is not None else None
    if state is not None and int(state.get("step", 0)) >= logged_step:
        step, tokens = int(state["step"]), int(state.get("tokens_seen", 0))
    else:
        step, tokens = logged_step, int(train[-1].get("tokens", 0)) if train else 0
    val_losses = [
        v
        for r in records
        if r.get("kind") == "eval"
        if (v := metric_number(r.get("val/loss"))) is not None
    ]
    finite_val = [v for v in val_losses if math.isfinite(v)]
    return RunSummary(
        path=run_dir,
        status=run_status(records, (run_dir / METRICS_FILE).stat().st_mtime),
        step=step,
        max_steps=_max_steps(run_dir, records),
        tokens=tokens,
        best_val_loss=min(finite_val) if finite_val else None,
        last_train_loss=metric_number(train[-1].get("loss")) if train else None,
        last_checkpoint=latest.name if latest is not None else None,
        bad_lines=records.bad_lines,
    )


def find_runs(root: str | Path) -> list[Path]:
    """`root` itself if it is a run, else its sub-directories that are runs, by name."""
    root = Path(root)
    if (root / METRICS_FILE).is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    return sorted(p for p in root.iterdir() if (p / METRICS_FILE).is_file())


def _tokens_human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _loss_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(summaries: list[RunSummary]) -> str:
    """The `tinylm runs` table: one line per run, columns aligned."""
    header = ("run", "status", "steps", "tokens", "best val", "last train", "last checkpoint")
    rows = [header]
    for s in summaries:
        steps = f"{s.step}/{s.max_steps}" if s.max_steps else str(s.step)
        rows.append(
            (
                s.path.name,
                s.status,
                steps,
                _tokens_human(s.tokens),
                _loss_text(s.best_val_loss),
                _loss_text(s.last_train_loss),
                s.last_checkpoint or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def run_label(run_dir: str | Path, name: str) -> str:
    """'name (data, tokenizer)' from the run's config.yaml: the legend says what each curve is."""
    tree = _config_tree(run_dir)
    if not tree:
        return name
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    mix = data.get("mix") if isinstance(data.get("mix"), list) else []
    mix = [m for m in mix if isinstance(m, dict)]
    sources = [str(m.get("name") or Path(str(m.get("path", ""))).name) for m in mix] or [
        Path(str(data.get("train", ""))).name or "?"
    ]
    return f"{name} ({'+'.join(sources)}, {data.get('tokenizer', '?')})"


def _style(n_points: int) -> dict[str, Any]:
    """A run with too few logged points for a line is drawn with markers, so it is visible."""
    return {"marker": "o", "markersize": 4} if n_points < 3 else {}


def make_figure(run_dirs: list[str | Path]):
    """A matplotlib Figure comparing runs (see `plot_runs`); the caller saves or inspects it.

    Panels: loss vs steps, loss vs tokens (train solid, val dashed), validation bits per byte vs
    steps (the measure that compares across tokenizers: loss per token does not), learning rate
    and tokens/s vs steps. A panel none of the runs has data for is left out (no empty frames),
    and the legend (each run labeled with its data and tokenizer, then the line styles) sits
    below the panels, outside the data, however many runs there are.
    """
    import math

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI toolkit imported
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    names = [Path(r).name for r in run_dirs]
    if len(set(names)) < len(names):  # same run name in two directories: show the paths
        names = [str(r) for r in run_dirs]
    panels = {  # key -> (title, x label, y label, [(xs, ys, style kwargs)])
        "step": ("loss vs steps", "step", "loss (nats/token)", []),
        "tokens": ("loss vs tokens", "tokens", "loss (nats/token)", []),
        "bpb": ("validation bits per byte (compares across tokenizers)", "step", "bits/byte", []),
        "lr": ("learning rate", "step", "lr", []),
        "tps": ("throughput", "step", "tokens/s", []),
    }
    run_handles = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_val = False
    val_style = {"linestyle": "--", "marker": "o", "markersize": 3}

    def add(key: str, xs: list, ys: list, style: dict) -> None:
        if any(y is not None for y in ys):
            panels[key][3].append((xs, ys, style))

    for i, (name, run_dir) in enumerate(zip(names, run_dirs, strict=True)):
        color = colors[i % len(colors)]
        run_handles.append(Line2D([], [], color=color, label=run_label(run_dir, name)))
        records = read_metrics(run_dir)
        train = [r for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval" and "val/loss" in r]
        # Tokens per step is constant within a run; eval lines carry only the step.
        per_step = train[-1]["tokens"] / train[-1]["step"] if train and train[-1]["step"] else 0.0
        steps = [r["step"] for r in train]
        label = run_handles[-1].get_label()
        # Each line keeps its label (for inspection); the legend is the figure's, below.
        solid = {"color": color, "label": f"{label} train", **_style(len(steps))}
        val = {"color": color, "label": f"{label} val", **val_style}
        losses = [metric_number(r.get("loss")) for r in train]
        add("step", steps, losses, solid)
        add("tokens", [r["tokens"] for r in train], losses, solid)
        if evals:
            vsteps = [r["step"] for r in evals]
            vloss = [metric_number(r["val/loss"]) for r in evals]
            any_val = any_val or any(v is not None for v in vloss)
            add("step", vsteps, vloss, val)
            add("tokens", [s * per_step for s in vsteps], vloss, val)
            bpb = [(r["step"], metric_number(r.get("val/bits_per_byte"))) for r in evals]
            bpb = [(s, b) for s, b in bpb if b is not None]
            if bpb:
                add("bpb", *map(list, zip(*bpb, strict=True)), {**val, "label": label})
        add("lr", steps, [metric_number(r.get("lr")) for r in train], {**solid, "label": label})
        tps = [metric_number(r.get("tokens_per_second")) for r in train]
        add("tps", steps, tps, {**solid, "label": label})

    shown = [k for k, p in panels.items() if p[3]] or ["step"]
    # One or two rows with every slot used: 5 panels are 3 above and 2 (wider) below.
    rows = 1 if len(shown) <= 3 else 2
    top = math.ceil(len(shown) / rows)
    bottom = len(shown) - top
    width = top * bottom if bottom else top
    fig = plt.figure(figsize=(16, 8 if rows == 2 else 4.8), layout="constrained")
    grid = fig.add_gridspec(rows, width)
    axes = {}
    for j, key in enumerate(shown):
        row, col = (0, j) if j < top else (1, j - top)
        span = width // (top if row == 0 else bottom)
        axes[key] = ax = fig.add_subplot(grid[row, col * span : (col + 1) * span])
        title, xlabel, ylabel, lines = panels[key]
        for xs, ys, style in lines:
            ax.plot(xs, ys, **style)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for key in ("step", "tokens"):
        if key in axes and panels[key][3]:
            ax = axes[key]
            ax.set_yscale("log")  # loss falls by orders of magnitude early, then slowly
            # Plain numbers at 1, 2, 3, 5 per decade (0.3, 2) rather than 3x10^-1 or no label.
            plain = FuncFormatter(lambda value, _pos: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
            ax.yaxis.set_minor_formatter(plain)
    styles = [Line2D([], [], color="0.3", label="train")]
    if any_val:
        styles.append(Line2D([], [], **{**val_style, "color": "0.3"}, label="val"))
    handles = run_handles + styles
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), 4),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(f"tinylm: {len(names)} run(s) compared: {', '.join(names)}")
    return fig


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write a PNG comparing runs (the panels of `make_figure`). Returns the path written."""
    fig = make_figure(run_dirs)  # first: it selects the file-only backend
    import io

    import matplotlib.pyplot as plt

    from tinylm.fileio import atomic_write_bytes

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # then written atomically: a figure never goes through a link at `out`
    fig.savefig(buffer, dpi=100, format=out.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())
    return out


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `tinylm runs` and `tinylm plot`."""
    p = sub.add_parser(
        "runs",
        help="list the runs in a directory: status, steps, tokens, best val loss",
        description="List runs (directories with a metrics.jsonl) with their status "
        "(running/finished/stopped/failed), steps done/max, tokens, best validation loss, "
        "last training loss and last intact checkpoint.",
    )
    p.add_argument("dir", nargs="?", default="runs", help="runs directory (default: runs)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser(
        "plot",
        help="PNG comparing runs: loss vs steps and tokens, bits per byte, learning rate, tokens/s",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", default="runs.png", help="PNG to write (default: runs.png)")
    p.set_defaults(func=cmd_plot)


def cmd_runs(args: argparse.Namespace) -> int:
    if not Path(args.dir).is_dir():
        from tinylm.suggest import nearby_path

        near = nearby_path(args.dir)
        hint = f" Did you mean '{near}'?" if near else ""
        raise FileNotFoundError(f"runs directory '{args.dir}' does not exist.{hint}")
    runs = find_runs(args.dir)
    if not runs:
        print(f"no runs in {args.dir} (a run is a directory with a {METRICS_FILE})")
        return 0
    summaries = [summarize(r) for r in runs]
    print(format_table(summaries))
    for s in summaries:
        if note := bad_lines_note(s.path, s.bad_lines):
            print(note, file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    if Path(args.out).suffix.lower() not in PLOT_FORMATS:
        from tinylm.config import ConfigError

        raise ConfigError(
            f"--out {args.out}: the figure's format comes from its extension; "
            f"use one of {', '.join(PLOT_FORMATS)}"
        )
    for run in args.runs:
        if Path(run, METRICS_FILE).is_file() and (
            note := bad_lines_note(run, read_metrics(run).bad_lines)
        ):
            print(note, file=sys.stderr)
    out = plot_runs(args.runs, args.out)
    print(f"wrote {out}")
    return 0
