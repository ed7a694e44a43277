"""How many CPU threads a run's torch ops use: decided before the first step, kept, checkpointed.

On a CPU the thread count is part of what a step computes, not only how fast: a linear layer's
weight gradient (MKL's matmul reducing over the batch) and LayerNorm's backward sum in
per-thread partials, so 1 and 2 threads give gradients that differ in the last bits (torch 2.13,
bench/thread_determinism.py: every Linear weight gradient differs, by 1e-9 to 1e-8, whenever the
batch is large enough to be split). torch offers no mode that makes these reductions independent
of the thread count, so a run keeps ONE count:

1. `train.threads=N` in the config;
2. a resumed run: the count its checkpoint recorded (the run's own), whatever the load or
   `OMP_NUM_THREADS` now, so that the resume is bit-identical to an uninterrupted run;
3. the environment variables users already know (`OMP_NUM_THREADS`, `MKL_NUM_THREADS`), as
   torch itself honours them;
4. `auto`: the cores this process may use (CPU affinity, cgroup CPU quota), the load average
   (the cores other processes hold), and a short probe of the run's own matmul shape at each
   candidate count: the fewest threads within `PROBE_MARGIN` of the fastest.

During the first log intervals `ThreadGovernor` re-checks the choice from the CPU time the
process actually got: only after `PATIENCE` starved intervals in a row (warm-up and compile
intervals never count) does it drop to the threads the process gets; once a change was made, or
`SETTLE_CHECKS` intervals passed without one, the count is settled and never changes again in
this run (its checkpoints record it, and `threads_settled`).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# Environment variables that set the thread count torch uses, in the order honoured.
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# A larger count must be this much faster in the probe to be chosen: fewer threads are the
# safer bet on a shared machine (OpenMP threads that wait for each other lose whole time slices
# when another process takes a core: tiny preset, 2 cores, 2 busy background processes,
# bench/bench_threads_quickstart.py, notes/issue-24-busy-machine.md).
PROBE_MARGIN = 0.10
PROBE_ROUNDS = 3  # alternated rounds; the median of each count is compared
PROBE_SECONDS = 0.02  # target length of one timed measurement (about 0.2 s of probe in all)
# Re-checking during the run (ThreadGovernor). Below this share of its threads' CPU time the
# process is starved (a run alone on its cores gets close to all of it): with ~20 busy processes
# on 2 cores, a 1-thread tiny run got 8-20%.
STARVED_SHARE = 0.5
PATIENCE = 2  # starved intervals in a row before the count drops (one busy moment is not a trend)
SETTLE_CHECKS = 4  # checked intervals without a change after which the count is settled
WARMUP_STEPS = 2  # a session's first steps (allocation, torch.compile) never count as starved


@dataclass(frozen=True)
class ThreadChoice:
    count: int
    source: str  # config | checkpoint | env | auto | device
    reason: str  # what the header prints after "threads: "


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 `cpu.max`, v1 cfs files), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> tuple[int, str]:
    """The cores this process may run on (affinity), capped by its cgroup quota, and how."""
    try:
        cores = len(os.sched_getaffinity(0))
        how = f"{cores} in its CPU affinity"
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
        how = f"{cores} cores"
    quota = cgroup_cpu_limit()
    if quota is not None and math.ceil(quota) < cores:
        cores = max(1, math.ceil(quota))
        how += f", cgroup quota {quota:g} CPUs"
    return cores, how


def env_threads() -> tuple[int, str] | None:
    """The count an environment variable sets (first of `ENV_VARS` with a positive integer)."""
    for name in ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), f"{name}={value}"
    return None


def saved_count(run_dir: Path) -> tuple[int, bool] | None:
    """(threads, settled) recorded in the run's latest checkpoint, or None (none, or older)."""
    from tinylm.train import checkpoint

    latest = checkpoint.find_latest(run_dir / "checkpoints", verify_hashes=False)
    if latest is None:
        return None
    loop = checkpoint.read_meta(latest).get("loop") or {}
    count = loop.get("threads")
    if not isinstance(count, int) or count < 1:
        return None
    return count, bool(loop.get("threads_settled"))


def probe(counts: list[int], rows: int, width: int) -> dict[int, float]:
    """Median seconds of a (rows x width) @ (width x 4 width) matmul and its weight-gradient
    matmul at each thread count, alternated over `PROBE_ROUNDS` rounds (the load changes while
    it runs). The current thread count is restored."""
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)  # the run's own RNG streams are not touched
    x = torch.randn(rows, width, generator=gen)
    w = torch.randn(width, 4 * width, generator=gen)

    def once() -> None:
        y = x @ w
        _ = x.T @ y  # the batch-reducing matmul of a backward pass

    try:
        torch.set_num_threads(min(counts))
        once()
        start = time.perf_counter()
        once()
        reps = max(1, min(200, round(PROBE_SECONDS / max(time.perf_counter() - start, 1e-6))))
        times: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(PROBE_ROUNDS):
            for n in counts:
                torch.set_num_threads(n)
                once()  # wake the pool at this size
                start = time.perf_counter()
                for _ in range(reps):
                    once()
                times[n].append((time.perf_counter() - start) / reps)
    finally:
        torch.set_num_threads(before)
    return {n: statistics.median(t) for n, t in times.items()}


def threads_to_use(threads: int, share: float) -> int:
    """The torch threads a starved process should keep: the cores' worth of CPU time it gets."""
    return max(1, min(threads, int(threads * share)))


def pick(timings: dict[int, float]) -> int:
    """The fewest threads whose time is within `PROBE_MARGIN` of the fastest count's."""
    best = min(timings.values())
    return min(n for n, t in timings.items() if t <= best * (1 + PROBE_MARGIN))


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def decide_auto(rows: int, width: int) -> ThreadChoice:
    """`train.threads=auto` on a CPU: cores, load and a probe (see the module docstring)."""
    cores, how = usable_cores()
    load = load_average()
    load_note = f", load average {load:.1f}" if load is not None else ""
    if cores <= 1:
        return ThreadChoice(1, "auto", f"1 (auto: {how}{load_note})")
    # Candidates: 1, all usable cores, and the cores the load average leaves free (it counts
    # this process's own recent work too, which is at most one core while it prepares data).
    free = cores if load is None else max(1, round(cores - max(0.0, load - 1)))
    counts = sorted({1, free, cores})
    timings = probe(counts, rows, width)
    count = pick(timings)
    shown = ", ".join(f"{n}: {1000 * t:.1f} ms" for n, t in sorted(timings.items()))
    return ThreadChoice(count, "auto", f"{count} (auto: {how}{load_note}; probe {shown})")


def decide(
    setting: int | str,
    device: torch.device,
    *,
    run_dir: Path | None = None,
    rows: int = 1024,
    width: int = 128,
) -> ThreadChoice:
    """The thread count for a run (`run_dir`: the run being resumed, else None)."""
    env = env_threads()
    ignored = f"; {env[1]} ignored" if env else ""
    if isinstance(setting, int):
        return ThreadChoice(setting, "config", f"{setting} (train.threads={setting}{ignored})")
    saved = saved_count(run_dir) if run_dir is not None else None
    if saved is not None:
        count = saved[0]
        note = ignored if env and env[0] != count else ""
        return ThreadChoice(
            count,
            "checkpoint",
            f"{count}, this run's own count from its checkpoint (a step's sums depend on the "
            f"thread count, so the resume stays bit-identical{note}; --force train.threads=N "
            "changes it)",
        )
    if env is not None:
        return ThreadChoice(env[0], "env", f"{env[0]} ({env[1]})")
    if device.type != "cpu":
        count = torch.get_num_threads()
        return ThreadChoice(
            count, "device", f"{count} (torch's default; the steps run on {device.type})"
        )
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    local_ranks = int(value) if value.isdigit() else 1
    if local_ranks > 1:  # torchrun on CPU: the ranks share the cores; no probe racing the others
        cores, how = usable_cores()
        count = max(1, cores // local_ranks)
        return ThreadChoice(count, "auto", f"{count} (auto: {how}, shared by {local_ranks} ranks)")
    return decide_auto(rows, width)


def apply(choice: ThreadChoice) -> None:
    """Use the chosen count for every torch op of this process from now on."""
    torch.set_num_threads(choice.count)


@contextlib.contextmanager
def restored() -> Iterator[None]:
    """Give the process its thread count back afterwards (tinylm used as a library, tests)."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ThreadGovernor:
    """Re-checks the thread count during a run's first log intervals (see the module docstring).

    `observe(...)` runs once per log interval with the CPU time the process got; it returns the
    new thread count when the count should drop, else None.
    """

    def __init__(self, threads: int, *, settled: bool, adjustable: bool) -> None:
        self.threads = threads
        self.settled = settled or not adjustable or threads <= 1
        self.checks = 0
        self.starved_in_a_row = 0

    def observe(self, *, first_step: int, session_start: int, share: float) -> int | None:
        """`first_step`: the interval's first step; `share`: CPU seconds / (wall x threads)."""
        if self.settled or first_step <= session_start + WARMUP_STEPS:
            return None  # warm-up and compile time are one thread's work, not contention
        self.checks += 1
        self.starved_in_a_row = self.starved_in_a_row + 1 if share < STARVED_SHARE else 0
        if self.starved_in_a_row >= PATIENCE:
            fewer = threads_to_use(self.threads, share)
            self.settled = True
            if fewer < self.threads:
                self.threads = fewer
                return fewer
        if self.checks >= SETTLE_CHECKS:
            self.settled = True
        return None
