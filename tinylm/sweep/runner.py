"""Running a sweep: each run a child `tinylm train` process, one after another or K at once.

Children run in their own session, so a terminal's Ctrl+C reaches only the sweep, which forwards
exactly one SIGINT to each running child (the trainer reads a second signal as "exit now"): each
finishes its step, writes a checkpoint and exits; the sweep records it as pending and exits 130.
Re-running the same sweep skips finished and abandoned runs and resumes pending ones through the
trainer's own `--resume`, which continues from the checkpoint bit for bit.

With `--parallel K` each child gets `cpu_count // K` torch threads (OMP_NUM_THREADS), so K runs
share the cores instead of oversubscribing them.

Early abandonment: while runs train, the sweep reads their `metrics.jsonl`. A run whose logged
train loss is non-finite, or (once `after` of its steps are done) more than `factor` times the best
loss any other run had by the same step, is sent SIGTERM: it checkpoints and stops, and is
recorded as abandoned with the reason.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tinylm.config import load_config
from tinylm.fileio import open_append
from tinylm.runs import METRICS_FILE, metric_number, read_metrics, run_status
from tinylm.sweep.plan import (
    ABANDONED,
    FAILED,
    FINISHED,
    PENDING,
    PlannedRun,
    SweepPlan,
    save_manifest,
)

RUNNING = "running"
STOP_WAIT_SECONDS = 600  # a stopping child finishes its step and checkpoint; then it is killed
Curve = list[tuple[int, float]]  # (step, train loss) as logged


@dataclass
class Divergence:
    """When a run is abandoned (module docstring)."""

    factor: float = 2.0  # loss above factor x the best run's at the same step; 0 = off
    after: float = 0.2  # ... checked once this fraction of the run's max_steps is done


def loss_curve(run_dir: Path) -> Curve:
    """The run's logged (step, train loss) pairs; NaN/inf stay as floats."""
    if not (run_dir / METRICS_FILE).is_file():
        return []
    out = []
    for record in read_metrics(run_dir):
        if (
            record.get("kind") == "train"
            and (loss := metric_number(record.get("loss"))) is not None
        ):
            out.append((int(record["step"]), loss))
    return out


def loss_at(curve: Curve, step: int) -> float | None:
    """The loss a run had logged by `step`, or None when it has not reached `step` yet."""
    if not curve or curve[-1][0] < step:
        return None
    before = [loss for s, loss in curve if s <= step]
    return before[-1] if before else None


def divergence_reason(
    curve: Curve, others: list[Curve], max_steps: int, rule: Divergence
) -> str | None:
    """Why the run with `curve` should be abandoned now, or None to let it go on."""
    if not curve:
        return None
    step, loss = curve[-1]
    if not math.isfinite(loss):
        return f"non-finite loss at step {step}"
    if rule.factor <= 0 or step < rule.after * max_steps:
        return None
    refs = [r for o in others if (r := loss_at(o, step)) is not None and math.isfinite(r)]
    if not refs or loss <= rule.factor * min(refs):
        return None
    best = min(refs)
    return f"loss {loss:.3f} at step {step} is {loss / best:.1f}x the best run's {best:.3f}"


def outcome(records: list[dict], exit_code: int) -> tuple[str, str]:
    """(status, reason) of a child that exited, from its events after the last start."""
    events = [r for r in records if r.get("kind") == "event"]
    starts = [i for i, r in enumerate(events) if r.get("event") == "start"]
    tail = events[starts[-1] + 1 :] if starts else []
    for record in reversed(tail):
        kind, reason = record.get("event"), str(record.get("reason", ""))
        if kind == "done":
            return FINISHED, "reached train.max_steps"
        if kind == "stopped":
            if reason.startswith(("time limit", "early stopping")):
                return FINISHED, reason  # the budget (or early stopping) ended it: complete
            if "non-finite" in reason:
                return ABANDONED, reason
            return PENDING, f"stopped ({reason}); re-run the sweep to resume"
        if kind == "failed":
            return FAILED, str(record.get("message", "failed"))
    return FAILED, f"exit code {exit_code} before any end event"


@dataclass
class Child:
    run: PlannedRun
    proc: subprocess.Popen
    log: IO[str]
    run_dir: Path
    max_steps: int
    abandon_reason: str = ""
    interrupted: bool = False
    evals_seen: int = 0


class SweepRunner:
    """Runs a plan's unfinished runs; `run()` returns "done" or "interrupted"."""

    def __init__(
        self,
        plan: SweepPlan,
        out_dir: Path,
        *,
        parallel: int = 1,
        divergence: Divergence | None = None,
        poll_seconds: float = 0.5,
        say: Callable[[str], None] = print,
    ) -> None:
        self.plan, self.out_dir, self.parallel = plan, Path(out_dir).resolve(), parallel
        self.divergence = divergence or Divergence()
        self.poll_seconds, self.say = poll_seconds, say
        self.curves: dict[str, Curve] = {}  # finished runs' curves, read once

    def run(self) -> str:
        todo = [r for r in self.plan.runs if r.status not in (FINISHED, ABANDONED)]
        for run in todo:
            self._refuse_live(run)
        active: list[Child] = []
        # Both installed explicitly: a SIGINT ignored by whoever started us (inherited SIG_IGN)
        # would otherwise make Ctrl+C do nothing at all.
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while todo or active:
                while todo and len(active) < self.parallel:
                    active.append(self._start(todo.pop(0)))
                time.sleep(self.poll_seconds)
                for child in list(active):
                    self._watch(child, active)
                    if child.proc.poll() is not None:
                        self._finish(child)
                        active.remove(child)
            return "done"
        except KeyboardInterrupt:
            self._stop_all(active)
            return "interrupted"
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            save_manifest(self.plan, self.out_dir)

    # ------------------------------------------------------------------ one child

    def _refuse_live(self, run: PlannedRun) -> None:
        """A run still trained by a process of an earlier sweep (killed hard) is not started twice."""
        from tinylm.config import ConfigError

        run_dir = self.out_dir / run.name
        if run.status == RUNNING and (run_dir / METRICS_FILE).is_file():
            mtime = (run_dir / METRICS_FILE).stat().st_mtime
            if run_status(read_metrics(run_dir), mtime) == "running":
                raise ConfigError(
                    f"{run_dir} is still being trained by an earlier sweep's process; wait for "
                    "it to finish or stop it, then re-run the sweep"
                )

    def _command(self, run: PlannedRun, run_dir: Path) -> tuple[list[str], bool]:
        from tinylm.train.checkpoint import find_latest

        base = [sys.executable, "-m", "tinylm.cli", "train"]
        if find_latest(run_dir / "checkpoints", verify_hashes=False) is not None:
            return [*base, "--resume", str(run_dir)], True
        own = [f"out_dir={self.out_dir}", f"run_name={run.name}", "log.progress=false"]
        return [*base, self.plan.preset, *run.overrides, *own], False

    def _start(self, run: PlannedRun) -> Child:
        run_dir = self.out_dir / run.name
        cmd, resuming = self._command(run, run_dir)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.parallel > 1:
            threads = str(max(1, (os.cpu_count() or 1) // self.parallel))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        logs = self.out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = open_append(logs / f"{run.name}.log")  # closed in _finish; never through a link
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        run.status, run.reason = RUNNING, ""
        save_manifest(self.plan, self.out_dir)
        index = self.plan.runs.index(run) + 1
        verb = "resuming" if resuming else "starting"
        self.say(f"sweep [{index}/{len(self.plan.runs)}] {verb} {run.name} (log: {log.name})")
        max_steps = load_config(self.plan.preset, run.overrides).train.max_steps
        return Child(run, proc, log, run_dir, max_steps)

    def _watch(self, child: Child, active: list[Child]) -> None:
        """Report new evaluations; abandon the run if it diverges."""
        if child.abandon_reason or child.interrupted:
            return
        curve = loss_curve(child.run_dir)
        evals = _evals(child.run_dir)
        for record in evals[child.evals_seen :]:
            self.say(f"  {child.run.name} step {record['step']}: val loss {record['val/loss']:.4f}")
        child.evals_seen = len(evals)
        others = [self._curve(r) for r in self.plan.runs if r.name != child.run.name]
        reason = divergence_reason(curve, others, child.max_steps, self.divergence)
        if reason:
            child.abandon_reason = reason
            self.say(f"  {child.run.name}: abandoning, {reason}")
            child.proc.send_signal(signal.SIGTERM)  # it checkpoints and stops (signals.py)

    def _curve(self, run: PlannedRun) -> Curve:
        if run.name in self.curves:
            return self.curves[run.name]
        curve = loss_curve(self.out_dir / run.name)
        if run.status in (FINISHED, ABANDONED):
            self.curves[run.name] = curve
        return curve

    def _finish(self, child: Child) -> None:
        child.log.close()
        records = read_metrics(child.run_dir) if (child.run_dir / METRICS_FILE).is_file() else []
        status, reason = outcome(records, child.proc.returncode)
        if child.abandon_reason:
            status, reason = ABANDONED, child.abandon_reason
        elif child.interrupted and status != FINISHED:
            status, reason = PENDING, "interrupted; re-run the sweep to resume"
        if status == FAILED:
            reason += f" (see {child.log.name})"
        child.run.status, child.run.reason = status, reason
        save_manifest(self.plan, self.out_dir)
        self.say(f"  {child.run.name}: {status}" + (f" ({reason})" if reason else ""))

    def _stop_all(self, active: list[Child]) -> None:
        """Ctrl+C: every child checkpoints and stops; a second Ctrl+C makes them exit at once."""
        if active:
            self.say("sweep: stopping (the running runs finish their step and checkpoint)...")
        for child in active:
            child.interrupted = True
            child.proc.send_signal(signal.SIGINT)
        for child in active:
            try:
                child.proc.wait(timeout=STOP_WAIT_SECONDS)
            except KeyboardInterrupt:
                child.proc.send_signal(signal.SIGINT)  # the second signal: exit now
                child.proc.wait()
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            self._finish(child)


def _evals(run_dir: Path) -> list[dict]:
    if not (run_dir / METRICS_FILE).is_file():
        return []
    return [
        r
        for r in read_metrics(run_dir)
        if r.get("kind") == "eval" and metric_number(r.get("val/loss")) is not None
    ]


def _interrupt(signum: int, frame: object) -> None:
    """SIGINT or SIGTERM to the sweep: stop it (module docstring)."""
    raise KeyboardInterrupt
