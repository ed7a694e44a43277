"""Running a sweep's trials: each a child `tinylm train` process, one after another or K at once.

The sweep never imports the trainer. A child trains in its own session into a normal run
directory; the sweep watches its `metrics.jsonl`: each new evaluation is reported to the study
(study.py) and, when the pruner says the trial is losing, the child is sent SIGTERM: it finishes
its step, writes a checkpoint and stops like any stopped run; the sweep then appends a `pruned`
event to its `metrics.jsonl` (after the child has exited, so lines never interleave), which
`tinylm runs` and the dashboard show as the run's status.

Children run in their own session, so a terminal's Ctrl+C reaches only the sweep, which forwards
exactly one SIGINT to each running child (the trainer reads a second signal as "exit now"): each
checkpoints and exits, its trial stays RUNNING in the study, and the sweep exits 130. Re-running
the same command adopts those trials (their owner is gone) and resumes them from their
checkpoints through the trainer's own `--resume`, which continues bit for bit.

With `--parallel K` each child gets `cpu_count // K` torch threads (OMP_NUM_THREADS), so K runs
share the cores instead of oversubscribing them.

Divergence: independently of the pruner, a run whose logged train loss is non-finite, or (once
`after` of its steps are done) more than `factor` times the best loss any other trial had by the
same step, is stopped and pruned with that reason.
"""

from __future__ import annotations

import json
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
from tinylm.runs import METRICS_FILE, metric_number, read_metrics
from tinylm.sweep.plan import FAILED, FINISHED, PENDING, PRUNED, SweepSpec, run_dir
from tinylm.sweep.study import (
    HEARTBEAT_SECONDS,
    STOP_WAIT_SECONDS,
    SweepStudy,
    Ticket,
    objective,
    outcome,
)

Curve = list[tuple[int, float]]  # (step, train loss) as logged


@dataclass
class Divergence:
    """When a run is stopped as diverging (module docstring)."""

    factor: float = 2.0  # loss above factor x the best run's at the same step; 0 = off
    after: float = 0.2  # ... checked once this fraction of the run's max_steps is done


def loss_curve(records: list[dict]) -> Curve:
    """The run's logged (step, train loss) pairs; NaN/inf stay as floats."""
    return [
        (int(r["step"]), loss)
        for r in records
        if r.get("kind") == "train" and (loss := metric_number(r.get("loss"))) is not None
    ]


def loss_at(curve: Curve, step: int) -> float | None:
    """The loss a run had logged by `step`, or None when it has not reached `step` yet."""
    if not curve or curve[-1][0] < step:
        return None
    before = [loss for s, loss in curve if s <= step]
    return before[-1] if before else None


def divergence_reason(
    curve: Curve, others: list[Curve], max_steps: int, rule: Divergence
) -> str | None:
    """Why the run with `curve` should be stopped as diverging now, or None to let it go on."""
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
    return (
        f"diverging: loss {loss:.3f} at step {step} is {loss / best:.1f}x the best run's {best:.3f}"
    )


def append_event(path: Path, event: str, step: int, reason: str) -> None:
    """Append one event line to a run's metrics.jsonl (its trainer has exited)."""
    record = {
        "kind": "event",
        "time": round(time.time(), 3),
        "message": f"{event} at step {step}: {reason}",
        "event": event,
        "reason": reason,
        "step": step,
    }
    fd = os.open(path / METRICS_FILE, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


@dataclass
class Child:
    ticket: Ticket
    proc: subprocess.Popen
    log: IO[str]
    run_dir: Path
    max_steps: int
    stop_reason: str = ""  # pruned / diverging: why the sweep stopped it
    interrupted: bool = False
    evals_seen: int = 0
    beat: float = 0.0


class SweepRunner:
    """Works the study's trials until none is left; `run()` returns "done" or "interrupted"."""

    def __init__(
        self,
        spec: SweepSpec,
        study: SweepStudy,
        out_dir: Path,
        *,
        parallel: int = 1,
        divergence: Divergence | None = None,
        poll_seconds: float = 0.5,
        say: Callable[[str], None] = print,
        after_trial: Callable[[], object] | None = None,
    ) -> None:
        self.spec, self.study, self.out_dir = spec, study, Path(out_dir).resolve()
        self.after_trial = after_trial  # e.g. rewrite summary.json for the dashboard
        self.parallel = parallel
        self.divergence = divergence or Divergence()
        self.poll_seconds, self.say = poll_seconds, say
        self.curves: dict[str, Curve] = {}  # ended trials' curves, read once

    def run(self) -> str:
        active: list[Child] = []
        # Both installed explicitly: a SIGINT ignored by whoever started us (inherited SIG_IGN)
        # would otherwise make Ctrl+C do nothing at all.
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            more = True
            while True:
                while more and len(active) < self.parallel:
                    ticket = self.study.claim({c.ticket.number for c in active})
                    if ticket is None:
                        more = False
                        break
                    active.append(self._start(ticket))
                if not active:
                    return "done"
                time.sleep(self.poll_seconds)
                for child in list(active):
                    self._watch(child)
                    if child.proc.poll() is not None:
                        self._finish(child)
                        active.remove(child)
                        more = True  # a re-queued trial may be waiting
        except KeyboardInterrupt:
            self._stop_all(active)
            return "interrupted"
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ------------------------------------------------------------------ one child

    def _command(self, ticket: Ticket, path: Path) -> tuple[list[str], bool]:
        from tinylm.train.checkpoint import find_latest

        base = [sys.executable, "-m", "tinylm.cli", "train"]
        if find_latest(path / "checkpoints", verify_hashes=False) is not None:
            return [*base, "--resume", str(path)], True
        overrides = self.spec.trial_overrides(ticket.params)
        own = [f"out_dir={self.out_dir}", f"run_name={ticket.run}", "log.progress=false"]
        return [*base, self.spec.preset, *overrides, *own], False

    def _start(self, ticket: Ticket) -> Child:
        path = run_dir(self.out_dir, ticket.run, f"study trial {ticket.number}")
        cmd, resuming = self._command(ticket, path)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.parallel > 1:
            threads = str(max(1, (os.cpu_count() or 1) // self.parallel))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        logs = self.out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = open_append(logs / f"{ticket.run}.log")  # closed in _finish; never through a link
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        verb = "resuming" if resuming else "starting"
        params = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in ticket.params.items())
        self.say(f"sweep trial {ticket.number}: {verb} {ticket.run} ({params}; log: {log.name})")
        max_steps = load_config(self.spec.preset, self.spec.trial_overrides(ticket.params))
        return Child(ticket, proc, log, path, max_steps.train.max_steps, beat=time.monotonic())

    def _watch(self, child: Child) -> None:
        """Report new evaluations; stop the run when it is pruned or diverges."""
        if child.stop_reason or child.interrupted:
            return
        if time.monotonic() - child.beat > HEARTBEAT_SECONDS:
            self.study.heartbeat(child.ticket)
            child.beat = time.monotonic()
        if not (child.run_dir / METRICS_FILE).is_file():
            return
        records = read_metrics(child.run_dir)
        for record in records:  # fit_steps_to_time: the step count the run fitted
            if record.get("event") == "start" and isinstance(record.get("max_steps"), int):
                child.max_steps = record["max_steps"]
        _, points = objective(records)
        for step, value in points[child.evals_seen :]:
            self.say(f"  {child.ticket.run} step {step}: val {value:.4f} (the objective)")
        child.evals_seen = len(points)
        reason = None
        if self.study.report(child.ticket, points, child.max_steps):
            reason = f"pruned by the {self.spec.pruner} pruner after step {points[-1][0]}"
        else:
            others = [
                self._curve(t) for t in self.study.trials() if t.number != child.ticket.number
            ]
            reason = divergence_reason(
                loss_curve(records), others, child.max_steps, self.divergence
            )
        if reason:
            child.stop_reason = reason
            self.say(f"  {child.ticket.run}: stopping, {reason}")
            child.proc.send_signal(signal.SIGTERM)  # it checkpoints and stops (signals.py)

    def _curve(self, frozen) -> Curve:
        name = frozen.user_attrs.get("run")
        if not isinstance(name, str):
            return []
        if name in self.curves:
            return self.curves[name]
        path = run_dir(self.out_dir, name, f"study trial {frozen.number}")
        curve = loss_curve(read_metrics(path)) if (path / METRICS_FILE).is_file() else []
        if frozen.state.is_finished():
            self.curves[name] = curve
        return curve

    def _finish(self, child: Child) -> None:
        child.log.close()
        path = child.run_dir
        records = read_metrics(path) if (path / METRICS_FILE).is_file() else []
        status, reason = outcome(records, child.proc.returncode)
        if child.stop_reason and status != FINISHED:
            status, reason = PRUNED, child.stop_reason
            step = max((int(r["step"]) for r in records if "step" in r), default=0)
            append_event(path, "pruned", step, reason)
        elif child.interrupted and status not in (FINISHED, FAILED):
            self.say(f"  {child.ticket.run}: interrupted; re-run the sweep to resume it")
            return  # the trial stays RUNNING: the next sweep adopts and resumes it
        if status == PENDING:  # stopped from outside (not by us): resumable, not finished
            status = FAILED
        if status == FAILED:
            reason += f" (see {child.log.name})"
        self.study.finish(child.ticket, status, reason)
        self.say(f"  {child.ticket.run}: {status}" + (f" ({reason})" if reason else ""))
        if self.after_trial is not None:
            self.after_trial()

    def _stop_all(self, active: list[Child]) -> None:
        """Ctrl+C: every child checkpoints and stops; a second Ctrl+C makes them exit at once."""
        if active:
            self.say("sweep: stopping (the running trials finish their step and checkpoint)...")
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


def _interrupt(signum: int, frame: object) -> None:
    """SIGINT or SIGTERM to the sweep: stop it (module docstring)."""
    raise KeyboardInterrupt
