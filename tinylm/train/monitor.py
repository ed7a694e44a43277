"""What the training loop reports: the start event, and each log interval's record and warnings.

`TrainMonitor.record(loss, nonfinite)` runs every step and only adds to tensors on the device
(interval loss sum and max, non-finite streak and total), so the step never waits for the GPU.
`flush(...)` runs every `log.interval` steps: it reads those tensors once, writes the `train`
record (loss, lr, grad norm, ms/step, tokens/s, MFU, memory, skipped steps) and the console line,
and logs `nonfinite` and `spike` events. Under torchrun the interval's loss is averaged over the
ranks there (one collective per interval), so the logged loss is that of the global batch.

The console line ends with an ETA from the recent pace (`eta.EtaEstimator`: the last log
intervals' step time, plus each evaluation and checkpoint still to come at the cost of the last
one; the trainer times those through `pause(kind)`). A line that averages fewer steps than
`log.interval` (the first after a resume, the last of a run) says how many. On a CPU, when the
process got less than `SLOW_CPU_SHARE` of the CPU time its threads could use (other processes
hold the cores), one `slow` event says so with the figures, so a run that takes 10x the README's
time says why. Whether the thread count changes is `threads.ThreadGovernor`'s call, which
`record` feeds after every step with the wall, CPU and idle clocks (its own windows of about a
second, not the log interval: at log.interval=50 a 100-step run had no second interval to act
on; never the warm-up or compile steps; only until the count is settled); a change is logged at
once (`slow` for a drop, `threads` for a raise). OpenMP threads that wait for each other lose whole time slices when the cores are shared (tiny
preset, 2 cores, load average 19.5: 18.3 s per step with 2 threads, 2.6 s with 1;
`bench/bench_cpu_threads.py`, notes/issue-11-first-hour.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch

from tinylm.config import Config
from tinylm.finite import all_finite
from tinylm.train import distributed, runtime
from tinylm.train.eta import EtaEstimator
from tinylm.train.sinks import RunLogger
from tinylm.train.threads import STARVED_SHARE, WARMUP_STEPS, ThreadGovernor, idle_seconds

if TYPE_CHECKING:
    from tinylm.data.curriculum import Curriculum

SLOW_CPU_SHARE = STARVED_SHARE


def format_eta(seconds: float) -> str:
    """A duration as 45s, 3m05s or 2h07m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def slow_cpu_message(
    step: int,
    *,
    cpu_seconds: float,
    wall_seconds: float,
    threads: int,
    tokens_per_second: float,
    flops_per_token: float,
    fewer: int | None = None,
) -> str | None:
    """Why a CPU run is slow, when other processes take the cores it should have; else None.

    `fewer`: the thread count the run drops to now (None: it keeps its count)."""
    if wall_seconds <= 0 or threads <= 0:
        return None
    share = cpu_seconds / (wall_seconds * threads)
    if share >= SLOW_CPU_SHARE:
        return None
    cores = psutil.cpu_count() or threads
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gflops = flops_per_token * tokens_per_second / 1e9
    if fewer is not None and fewer < threads:
        action = (
            f" Using {fewer} thread(s) from now on (was {threads}; kept for the rest of the run): "
            "threads that wait for each other lose their time slices on busy cores."
        )
    elif threads > 1:
        action = (
            f" Keeping {threads} threads: this run's count is fixed (a step's sums depend on it); "
            "a new run with train.threads=1 (or OMP_NUM_THREADS=1) may be faster here."
        )
    else:
        action = ""
    return (
        f"step {step}: slow: {tokens_per_second:,.0f} tokens/s ({gflops:.2f} GFLOP/s of model "
        f"compute). This process got {share:.0%} of the CPU time its {threads} thread(s) could use "
        f"(load average {load:.1f} on {cores} cores): other processes hold the cores. Alone on "
        f"this machine it would run about {1 / max(share, 1e-3):.1f}x faster.{action}"
    )


def command_line() -> str | None:
    """The `tinylm ...` command this process runs (for model cards), or None when tinylm is used
    as a library (where argv belongs to another program)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "tinylm" or argv0.parts[-2:] == ("tinylm", "cli.py"):
        return shlex.join(["tinylm", *sys.argv[1:]])
    return None


class TrainMonitor:
    """Accumulates per-step losses on the device and reports them once per log interval."""

    def __init__(
        self,
        log: RunLogger,
        cfg: Config,
        *,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        precision: runtime.Precision,
        dist: distributed.DistInfo,
        flops_per_token: float,
        governor: ThreadGovernor | None = None,
        curriculum: Curriculum | None = None,
    ) -> None:
        self.log, self.cfg, self.optimizer = log, cfg.train, optimizer
        self.curriculum = curriculum  # data.phases: the phase goes in the record and the line
        self.device, self.precision, self.dist = device, precision, dist
        self.max_steps = cfg.train.max_steps
        self.tokens_per_step = (
            cfg.train.batch_size * cfg.model.context_length * cfg.train.grad_accum * dist.world_size
        )
        self.flops_per_token = flops_per_token
        self.peak_flops, self.peak_reason = runtime.peak_flops(device, precision)
        self.interval_loss, self.interval_max, self.nonfinite_streak, self.nonfinite_total = (
            torch.zeros((), device=device) for _ in range(4)
        )
        self.skipped_reported = 0
        self.loss_ema: float | None = None
        self.last_loss: float | None = None  # mean train loss of the last interval
        self.history: list[dict[str, Any]] = []  # every train record of this session
        self.interval_steps, self.interval_start = 0, time.perf_counter()
        self.log_interval = cfg.log.interval
        self.session_start, self.session_start_step = time.perf_counter(), 0
        self.slow_reported = False
        self.session_steps = 0  # steps recorded since log_start (the governor's step count)
        self.interval_cpu = self._cpu_seconds()
        self.scaler: torch.amp.GradScaler | None = None  # fp16: its scale goes in the record
        self.governor = governor
        self.eta = EtaEstimator(
            self.max_steps,
            eval_interval=cfg.eval.interval,
            checkpoint_interval=cfg.checkpoint.interval,
        )
        self.paused = 0.0  # seconds of this interval spent evaluating or checkpointing

    @contextlib.contextmanager
    def pause(self, kind: str) -> Iterator[None]:
        """Time an evaluation or checkpoint: the ETA counts it apart from the step time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.paused += seconds
            if self.governor is not None:  # not a step: the thread check's window restarts
                self.governor.restart()
            self.eta.overhead(kind, seconds)

    def log_start(self, step: int, run_dir: Path, messages: list[str]) -> None:
        """The set-up messages, the run line, and the `start` event."""
        for message in messages:
            self.log.print(message)
        self.log.print(
            f"run: {run_dir} | {self.tokens_per_step:,} tokens/step | "
            f"steps {step}->{self.max_steps} | MFU peak: {self.peak_reason}"
        )
        # pid and host let `tinylm runs` tell a live run from one that was killed.
        self.log.event(
            f"start at step {step}",
            event="start",
            step=step,
            max_steps=self.max_steps,
            pid=os.getpid(),
            host=socket.gethostname(),
            device=str(self.device),
            precision=self.precision.name,
            threads=torch.get_num_threads(),  # a sweep's --parallel splits them between runs
            command=command_line(),
        )
        self.interval_start = self.session_start = time.perf_counter()
        self.session_start_step = step
        self.session_steps = 0
        self.interval_cpu = self._cpu_seconds()

    def record(self, loss: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """Add one step's loss and non-finite flag (device tensors; no host sync)."""
        loss = loss.detach()
        self.interval_loss += loss
        self.interval_max = torch.maximum(self.interval_max, loss)
        self.nonfinite_streak = (self.nonfinite_streak + 1) * nonfinite
        self.nonfinite_total += nonfinite
        self.interval_steps += 1
        self.session_steps += 1
        if self.governor is not None and not self.governor.settled and self.device.type == "cpu":
            self._check_threads()

    def _check_threads(self) -> None:
        """Feed the governor this step's clocks; apply and log a change of the thread count."""
        governor, step = self.governor, self.session_start_step + self.session_steps
        assert governor is not None
        before = governor.threads
        count = governor.tick(
            step=step,
            session_start=self.session_start_step,
            wall=time.perf_counter(),
            cpu=self._cpu_seconds(),
            idle=idle_seconds(),
        )
        if count is None:
            return
        torch.set_num_threads(count)
        last = governor.last
        if count < before:
            tokens_per_second = last["steps"] * self.tokens_per_step / last["seconds"]
            message = slow_cpu_message(
                step,
                cpu_seconds=last["cpu"],
                wall_seconds=last["seconds"],
                threads=before,
                tokens_per_second=tokens_per_second,
                flops_per_token=self.flops_per_token,
                fewer=count,
            )
            self.slow_reported = True
            self.log.event(message or "", event="slow", step=step, threads=count)
            return
        self.log.event(
            f"step {step}: threads {before} -> {count}: {last.get('idle_cores', 0):.1f} of this "
            f"process's CPUs stayed idle in each of the last windows (other processes left "
            f"them); kept for the rest of the run (a step's sums depend on the count)",
            event="threads",
            step=step,
            threads=count,
        )

    def flush(self, step: int, tokens_seen: int, grad_norm: torch.Tensor) -> dict[str, Any]:
        """Log the interval that ends at `step` and start the next; returns the train record."""
        elapsed = time.perf_counter() - self.interval_start
        steps = self.interval_steps
        loss_sum = distributed.all_reduce_mean(self.interval_loss, self.dist)
        max_loss = distributed.all_reduce_max(self.interval_max, self.dist)
        mean_loss = loss_sum.item() / steps  # the one host sync per interval
        tokens_per_second = steps * self.tokens_per_step / max(elapsed, 1e-9)
        record: dict[str, Any] = {
            "loss": mean_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm.item()),
            "ms_per_step": 1000 * elapsed / steps,
            "tokens_per_second": tokens_per_second,
            "tokens": tokens_seen,
        }
        if self.peak_flops:
            flops = self.flops_per_token * tokens_per_second / self.dist.world_size
            record["mfu"] = flops / self.peak_flops
        record["memory_gb"] = self._memory_gb()
        if self.scaler is not None:  # halves on each overflow, grows after clean steps
            record["grad_scale"] = self.scaler.get_scale()
        skipped = int(self.nonfinite_total.item())
        if skipped:
            record["skipped_steps"] = skipped
        if steps != self.log_interval:  # the first line after a resume, or a run's last
            record["window_steps"] = steps
        phase = ""
        if self.curriculum is not None:  # the phase of the interval's last step
            record["phase"] = self.curriculum.index(step - 1) + 1
            phase = f" | {self.curriculum.label(step - 1)}"
        self._warn(step, skipped, max_loss.item())
        self._warn_slow(step, elapsed, tokens_per_second)
        self.eta.steps(steps, elapsed - self.paused)
        self.log.log(step, "train", record)
        mfu = f" | mfu {100 * record['mfu']:.1f}%" if "mfu" in record else ""
        plural = "s" if steps != 1 else ""
        window = f" (mean of {steps} step{plural})" if steps != self.log_interval else ""
        self.log.print(
            f"step {step:>6} | loss {mean_loss:.4f}{window} | lr {record['lr']:.2e} | norm {record['grad_norm']:.2f} | "
            f"{record['ms_per_step']:.0f} ms/step | {tokens_per_second:,.0f} tok/s{mfu}{phase}{self._eta(step)}"
        )
        self.log.advance(step, f"loss {mean_loss:.3f}")

        self.history.append(record)
        self.last_loss = mean_loss
        if math.isfinite(mean_loss):
            ema = self.loss_ema
            self.loss_ema = mean_loss if ema is None else 0.9 * ema + 0.1 * mean_loss
        self.interval_loss.zero_()
        self.interval_max.zero_()
        self.interval_steps, self.interval_start = 0, time.perf_counter()
        self.interval_cpu = self._cpu_seconds()
        self.paused = 0.0
        return record

    def _eta(self, step: int) -> str:
        """' | ETA 3m05s' from the recent pace (see eta.py), or '' at the end."""
        self.eta.max_steps = self.max_steps  # a time-fitted run changes it
        left = self.eta.remaining(step)
        if left is None or step >= self.max_steps:
            return ""
        return f" | ETA {format_eta(left)}"

    def _cpu_seconds(self) -> float:
        times = psutil.Process().cpu_times()
        return times.user + times.system

    def _warn_slow(self, step: int, elapsed: float, tokens_per_second: float) -> None:
        """One `slow` event per session when other processes starve this one of CPU time (the
        thread count is the governor's, fed by `record`). An interval that holds the session's
        first steps is not judged: their allocations and torch.compile run on one thread, which
        read as contention (a compile=true run once dropped to 1 thread at step 1)."""
        first_step = step - self.interval_steps + 1
        if self.device.type != "cpu" or first_step <= self.session_start_step + WARMUP_STEPS:
            return
        threads, cpu_seconds = torch.get_num_threads(), self._cpu_seconds() - self.interval_cpu
        wall = max(elapsed - self.paused, 1e-9)  # evaluations and saves are not steps
        message = slow_cpu_message(
            step,
            cpu_seconds=cpu_seconds,
            wall_seconds=wall,
            threads=threads,
            tokens_per_second=tokens_per_second,
            flops_per_token=self.flops_per_token,
        )
        # While the governor may still change the count, the message would be premature.
        pending = self.governor is not None and not self.governor.settled
        if message and not pending and not self.slow_reported:
            self.slow_reported = True
            self.log.event(message, event="slow", step=step, threads=torch.get_num_threads())

    def nonfinite_stop_reason(self, step: int) -> str | None:
        """Why the run must stop after `train.max_nonfinite_steps` non-finite steps in a row.

        Agreed across ranks (a collective; call it on every rank at the same step), so that every
        process takes the same exit path: a stop for non-finite steps writes no checkpoint.
        """
        streak = int(self.nonfinite_streak.item())
        limit = self.cfg.max_nonfinite_steps
        if not distributed.any_rank(streak >= limit, self.dist, self.device):
            return None
        return (
            f"{streak} consecutive non-finite steps up to step {step} "
            "(updates were skipped; lower optim.lr or check the data)"
        )

    def diverged_reason(self, step: int, params: list[torch.Tensor]) -> str | None:
        """Why the run must stop: its weights are no longer finite (a collective, like
        `nonfinite_stop_reason`). A step with a finite loss can still overflow its update; the
        loss guard does not see that, and every later step, sample and checkpoint would be NaN."""
        diverged = not bool(all_finite(params))
        if not distributed.any_rank(diverged, self.dist, self.device):
            return None
        return (
            f"diverged: the weights became NaN or infinite by step {step} although the losses "
            "before were finite (an update overflowed); nothing after the last checkpoint was "
            "saved. Lower optim.lr (or raise optim.warmup_steps, set optim.grad_clip)"
        )

    def _warn(self, step: int, skipped: int, max_loss: float) -> None:
        """`nonfinite` event for new skipped steps, `spike` event for a loss far above its average."""
        if skipped > self.skipped_reported:  # one event per interval that had new ones
            self.log.event(
                f"step {step}: {skipped - self.skipped_reported} non-finite step(s) since the "
                f"last log line ({skipped} this session), their updates skipped",
                event="nonfinite",
                step=step,
            )
            self.skipped_reported = skipped
        ema = self.loss_ema
        if ema is not None and max_loss > self.cfg.spike_factor * ema:
            self.log.event(
                f"loss spike at step ~{step}: {max_loss:.3f} vs recent average {ema:.3f}",
                event="spike",
                step=step,
            )

    def _memory_gb(self) -> float:
        """Peak CUDA memory allocated, or the process's resident memory elsewhere."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return psutil.Process().memory_info().rss / 2**30
