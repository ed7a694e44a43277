"""The sweep's Optuna study: which trial runs next, what each reports, and how it ended.

The study (SQLite at `<sweep>/study.db` by default, any SQLAlchemy URL with `--storage`) is the
one record of the trials: several sweep processes, on one machine or several, work the same
study, each asking it for the next trial. A trial's user attributes hold its run name, its
parameters as override text, and its owner (sweep PID, host, start time, last heartbeat).

Claiming a trial happens under a file lock in the sweep directory (`.claim.lock`), so that two
processes on one machine never both adopt one orphan nor both ask for the last trial. A RUNNING
trial whose owner is gone (its PID is dead on this host, or no heartbeat for `STALE_SECONDS`
elsewhere) is an orphan of a killed sweep. It is adopted: a trainer still running in its run
directory is stopped (it checkpoints), then the run's own events decide: finished -> told
COMPLETE; stopped with a checkpoint -> resumed from it as the same trial; no checkpoint -> told
FAIL and re-queued with the same parameters (a new trial; the failed one is not counted).
So a killed study loses no trial and counts none twice.

The objective is the best validation bits per byte of the run (tokenizer-independent), or the
best validation loss when the run logs no bits per byte; the same number is reported at each
evaluation for pruning.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.config import ConfigError
from tinylm.runs import METRICS_FILE, metric_number, read_metrics
from tinylm.sweep.plan import (
    ABANDONED,
    FAILED,
    FINISHED,
    PENDING,
    PRUNED,
    SweepSpec,
    run_dir,
    run_name,
)

STALE_SECONDS = 300.0  # another host's trial with no heartbeat for this long is an orphan
HEARTBEAT_SECONDS = 30.0
STOP_WAIT_SECONDS = 600.0  # an orphaned trainer told to stop gets this long to checkpoint
CLAIM_LOCK = ".claim.lock"


def objective(records: list[dict[str, Any]]) -> tuple[float | None, list[tuple[int, float]]]:
    """(best value, [(step, value) per evaluation]) of a run's eval records."""
    evals = [r for r in records if r.get("kind") == "eval" and "step" in r]
    key = "val/bits_per_byte" if any("val/bits_per_byte" in r for r in evals) else "val/loss"
    points = [
        (int(r["step"]), v)
        for r in evals
        if (v := metric_number(r.get(key))) is not None and math.isfinite(v)
    ]
    return (min(v for _, v in points) if points else None), points


def outcome(records: list[dict], exit_code: int) -> tuple[str, str]:
    """(status, reason) of a run whose trainer exited, from its events after the last start."""
    events = [r for r in records if r.get("kind") == "event"]
    starts = [i for i, r in enumerate(events) if r.get("event") == "start"]
    tail = events[starts[-1] + 1 :] if starts else []
    for record in reversed(tail):
        kind, reason = record.get("event"), str(record.get("reason", ""))
        if kind == "done":
            return FINISHED, "reached train.max_steps"
        if kind == "pruned":
            return PRUNED, reason
        if kind == "stopped":
            if reason.startswith(("time limit", "early stopping")):
                return FINISHED, reason  # the budget (or early stopping) ended it: complete
            if "non-finite" in reason:
                return PRUNED, reason
            return PENDING, f"stopped ({reason}); re-run the sweep to resume"
        if kind == "failed":
            return FAILED, str(record.get("message", "failed"))
    return FAILED, f"exit code {exit_code} before any end event"


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{out_dir.resolve() / 'study.db'}"


@contextlib.contextmanager
def claim_lock(out_dir: Path) -> Iterator[None]:
    """Exclusive flock on `out_dir/.claim.lock` for a short critical section."""
    import fcntl

    fd = os.open(out_dir / CLAIM_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _owner() -> dict[str, Any]:
    import psutil

    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": psutil.Process().create_time(),
    }


def _alive_here(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, OverflowError):
        return False


def trainer_pid(path: Path) -> int | None:
    """The PID of a live `tinylm train` holding `path/.lock`, or None when nobody holds it."""
    import fcntl

    from tinylm.locks import LOCK_FILE, read_holder

    lock = path / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = read_holder(lock).get("pid")
        return pid if isinstance(pid, int) else -1
    finally:
        os.close(fd)
    return None


def tpe_startup_trials(n_trials: int) -> int:
    """Random trials before TPE models the results: Optuna's 10, or a third of a smaller study.

    TPE samples at random until `n_startup_trials` trials have finished (Optuna's TPESampler
    docs), so with Optuna's default of 10 a study of <= 10 trials, the size a CPU sweep affords,
    never used TPE at all: every trial was a random draw (optuna/optuna#6723; last session's
    4-trial "TPE" run was 4 random draws, notes/issue-20-experiments.md). Optuna's sampler
    benchmark (optuna/optuna#2964) scored 10 start-up trials far above 100 at its budgets: fewer
    random trials leave more of a fixed budget to the model. A third, at least 2 (the first fit
    needs a spread), leaves two thirds of a small study to TPE. (Optuna 5 already defaults to the
    multivariate TPE for one objective, which the same benchmark scored higher.)
    """
    return max(2, min(10, n_trials // 3))


def hyperband_min_resource(max_steps: int, n_trials: int, reduction_factor: int = 3) -> int:
    """Hyperband's first rung (steps) for this study size: about one bracket per 10 trials.

    Hyperband runs one successive-halving bracket per
    `floor(log_rf(max_resource / min_resource)) + 1`, and each bracket's trials are all its TPE
    sees (Optuna's HyperbandPruner docs: "each bracket needs to observe more than 10 trials" for
    TPE to adapt; they advise 4-6 brackets). With Optuna's `min_resource=1` a 300-step trial gave
    6 brackets: a 6-trial study put one trial in each, so TPE saw one point and no bracket ever
    had a rival to prune against. So: `n_trials // 10` brackets, 1 to 4, and the first rung just
    above `max_steps / rf**brackets` (one bracket: a single rung at ~1/3 of the steps, where the
    best third of the trials go on).
    """
    brackets = max(1, min(4, n_trials // 10))
    return max(1, max_steps // reduction_factor**brackets + 1)


def pruning_chances(max_steps: int, eval_interval: int, prune_after: float) -> int:
    """Evaluations at which the pruner can stop a trial: from `prune_after` of the steps on,
    before the last step (a verdict at the end saves nothing). Pruning reads only evaluations:
    with `tiny`'s eval.interval=250 and a 300-step budget there was one, at 83% of the steps."""
    if eval_interval <= 0:
        return 0
    first = max(eval_interval, math.ceil(prune_after * max_steps / eval_interval) * eval_interval)
    return max(0, (max_steps - 1 - first) // eval_interval + 1) if first < max_steps else 0


def _grid_sampler(base: type) -> type:
    """Optuna's GridSampler without its `study.stop()` when the grid is used up: that works
    only inside `study.optimize`, and the sweep counts its trials itself (`--trials`)."""

    class GridSampler(base):  # type: ignore[misc, valid-type]
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return GridSampler


@dataclass
class Ticket:
    """A trial this process runs."""

    number: int
    trial: Any  # optuna.trial.Trial
    params: dict[str, str]
    run: str
    resume: bool = False  # adopted from a killed sweep: continue its checkpoint
    last_reported: int = -1  # highest step already reported to the study


class SweepStudy:
    """The study of one sweep (module docstring)."""

    def __init__(
        self,
        spec: SweepSpec,
        out_dir: Path,
        *,
        storage: str,
        n_trials: int,
        max_steps: int,
        prune_after: float = 0.25,
        prune_startup: int = 3,
        say: Callable[[str], None] = print,
    ) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.optuna = optuna
        self.spec, self.out_dir, self.n_trials = spec, out_dir, n_trials
        self.prune_after, self.say = prune_after, say
        self.max_steps = max_steps
        self.owner = _owner()
        kwargs: dict[str, Any] = {}
        if storage.startswith("sqlite"):
            # Several processes write one SQLite file: wait for the writer instead of failing.
            kwargs = {"connect_args": {"timeout": 120}}
        # Under the claim lock: two sweeps started at once would both create the tables and
        # the study, and the loser of that race fails.
        with claim_lock(out_dir):
            try:
                self.storage = optuna.storages.RDBStorage(storage, engine_kwargs=kwargs)
            except Exception as e:  # SQLAlchemy's errors for a bad URL or an unreachable server
                raise ConfigError(f"--storage {storage}: cannot open the study ({e})") from None
            self.study = optuna.create_study(
                storage=self.storage,
                study_name=spec.study_name(),
                sampler=self._sampler(),
                pruner=self._pruner(prune_startup),
                direction="minimize",
                load_if_exists=True,
            )

    def _sampler(self) -> Any:
        samplers = self.optuna.samplers
        if self.spec.sampler == "grid":
            from tinylm.sweep.space import grid_space

            return _grid_sampler(samplers.GridSampler)(
                grid_space(self.spec.axes), seed=self.spec.seed
            )
        if self.spec.sampler == "random":
            return samplers.RandomSampler(seed=self.spec.seed)
        # constant_liar: trials running at once do not all sample the same promising point.
        return samplers.TPESampler(
            seed=self.spec.seed,
            constant_liar=True,
            n_startup_trials=tpe_startup_trials(self.n_trials),
        )

    def _pruner(self, startup: int) -> Any:
        pruners = self.optuna.pruners
        if self.spec.pruner == "median":
            return pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)
        if self.spec.pruner == "hyperband":
            steps = max(1, self.max_steps)
            return pruners.HyperbandPruner(
                min_resource=hyperband_min_resource(steps, self.n_trials),
                max_resource=steps,
                reduction_factor=3,
            )
        return pruners.NopPruner()

    # ------------------------------------------------------------------ claiming

    def trials(self) -> list[Any]:
        return self.study.get_trials(deepcopy=False)

    def counted(self) -> int:
        """Trials that count toward `--trials`: all but the failed ones that were re-queued."""
        fail = self.optuna.trial.TrialState.FAIL
        return sum(not (t.state == fail and t.user_attrs.get("requeued")) for t in self.trials())

    def claim(self, mine: set[int]) -> Ticket | None:
        """The next trial for this process (an orphan first), or None when the study is done."""
        state = self.optuna.trial.TrialState
        with claim_lock(self.out_dir):
            for frozen in self.study.get_trials(deepcopy=False, states=(state.RUNNING,)):
                if frozen.number not in mine and self._orphaned(frozen):
                    ticket = self._adopt(frozen)
                    if ticket is not None:
                        return ticket
            trials = self.trials()
            waiting = any(t.state == state.WAITING for t in trials)
            if not waiting and self.counted() >= self.n_trials:
                return None
            trial = self.study.ask()
            params = {axis.key: axis.suggest(trial) for axis in self.spec.axes}
            name = run_name(trial.number, self.spec, params)
            for key, value in (("run", name), ("params", params), ("owner", self.owner)):
                trial.set_user_attr(key, value)
            trial.set_user_attr("heartbeat", time.time())
            return Ticket(trial.number, trial, params, name)

    def _orphaned(self, frozen: Any) -> bool:
        owner = frozen.user_attrs.get("owner")
        if not isinstance(owner, dict):
            return True  # asked, but killed before it was even named
        if owner.get("host") == socket.gethostname():
            pid, started = owner.get("pid"), owner.get("started")
            if not isinstance(pid, int) or not isinstance(started, (int, float)):
                return True
            return not _alive_here(pid, float(started))
        beat = frozen.user_attrs.get("heartbeat")
        return not isinstance(beat, (int, float)) or time.time() - beat > STALE_SECONDS

    def _adopt(self, frozen: Any) -> Ticket | None:
        """Take over a killed sweep's trial (module docstring); None when it needs no run."""
        from tinylm.train.checkpoint import find_latest

        trial = self.optuna.trial.Trial(self.study, frozen._trial_id)
        name = frozen.user_attrs.get("run")
        params = frozen.user_attrs.get("params")
        if name is None or not isinstance(params, dict):
            self._requeue(trial, frozen, "killed before it started")
            return None
        path = run_dir(self.out_dir, name, f"study trial {frozen.number}")
        pid = trainer_pid(path)
        if pid is not None:
            if pid <= 0:
                return None  # held by a process we cannot name: leave it alone
            self.say(
                f"sweep: trial {frozen.number} ({name}) is still training (PID {pid}): stopping it"
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + STOP_WAIT_SECONDS
            while trainer_pid(path) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
        records = read_metrics(path) if (path / METRICS_FILE).is_file() else []
        status, reason = outcome(records, -1)
        if status in (FINISHED, PRUNED, ABANDONED):
            self.say(f"sweep: trial {frozen.number} ({name}) had ended: {status}")
            self.finish(Ticket(frozen.number, trial, params, name), status, reason)
            return None
        if find_latest(path / "checkpoints", verify_hashes=False) is None:
            self._requeue(trial, frozen, "killed before its first checkpoint")
            return None
        trial.set_user_attr("owner", self.owner)
        trial.set_user_attr("heartbeat", time.time())
        reported = [int(s) for s in frozen.intermediate_values]
        self.say(f"sweep: resuming trial {frozen.number} ({name}) from its checkpoint")
        return Ticket(frozen.number, trial, params, name, True, max(reported, default=-1))

    def _requeue(self, trial: Any, frozen: Any, why: str) -> None:
        trial.set_user_attr("requeued", True)
        trial.set_user_attr("reason", f"{why}; re-queued")
        self.study.tell(frozen.number, state=self.optuna.trial.TrialState.FAIL)
        self.study.enqueue_trial(
            dict(frozen.params), user_attrs={"requeued_from": frozen.number}, skip_if_exists=False
        )
        self.say(f"sweep: trial {frozen.number} was {why}: re-queued with the same parameters")

    # ------------------------------------------------------------------ running

    def heartbeat(self, ticket: Ticket) -> None:
        ticket.trial.set_user_attr("heartbeat", time.time())

    def report(self, ticket: Ticket, points: list[tuple[int, float]], max_steps: int) -> bool:
        """Report new evaluations; True when the pruner says the trial should stop."""
        new = [(s, v) for s, v in points if s > ticket.last_reported]
        for step, value in new:
            ticket.trial.report(value, step)
            ticket.last_reported = step
        if not new or ticket.last_reported < self.prune_after * max_steps:
            return False
        return bool(ticket.trial.should_prune())

    def finish(self, ticket: Ticket, status: str, reason: str, records: list | None = None) -> None:
        """Tell the study how the trial ended."""
        state = self.optuna.trial.TrialState
        if records is None:
            path = self.out_dir / ticket.run
            records = read_metrics(path) if (path / METRICS_FILE).is_file() else []
        best, _ = objective(records)
        ticket.trial.set_user_attr("status", status)
        ticket.trial.set_user_attr("reason", reason)
        if status == FINISHED and best is not None:
            self.study.tell(ticket.number, best)
        elif status in (PRUNED, ABANDONED):
            self.study.tell(ticket.number, state=state.PRUNED)
        else:
            self.study.tell(ticket.number, state=state.FAIL)
