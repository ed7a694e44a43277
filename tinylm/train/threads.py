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
4. `auto`: the cores this process may use (CPU affinity, cgroup CPU quota), the cores other
   processes keep busy RIGHT NOW, and a short probe of the run's own matmul shape at each
   count those leave free: the fewest threads within `PROBE_MARGIN` of the fastest.

"Right now" is the point. The first version read the 1-minute load average and trusted a 0.2 s
probe; with 2 busy processes started just before the quickstart run (2 cores) the load average
still read 1.38 and the probe's 20 ms pieces looked fine (freshly woken threads are favoured by
the scheduler), so the run kept 2 threads and took 122.4 s against 54.3 s on 1 thread
(notes/issue-24-busy-machine.md). The busy cores are now measured from the per-CPU counters of
/proc/stat over `BUSY_SAMPLE_SECONDS` while this process sleeps: only the CPUs in its affinity,
steal time counted as busy, exact over the window rather than a point sample. Measured on the
shared 2-core machine (bench/bench_busy_view.py, /tmp experiments of the same shape): 2.0 busy
cores within 50 ms of starting 2 spinners while the load average read 1.64; a steady 2-thread
forward+backward matmul loop beside them got 19-27% of its CPU time and ran 1.9-2.8x slower than
1 thread (at load average 8.5 from other work: 5-14% and 3-6x), while the old probe saw 7.2 vs
7.7 ms; alone, the loop got 99% and 2 threads were 1.8x faster. (The runnable-task count,
`procs_running`, said the same here, 1 alone and 3-5 with the spinners, but it counts the whole
host: in a container pinned to 2 of 64 CPUs it would see everyone's tasks; the per-CPU counters
see only this process's CPUs.)

During the run `ThreadGovernor` re-checks the choice on its own clock, not the log interval:
windows of `WINDOW_SECONDS` of steps from the session's third step (the first steps, allocation
and torch.compile, run on one thread and would read as contention), each judged by the CPU
share the threads got and by the idle time of the cores. `PATIENCE` starved windows in a row
(< `STARVED_SHARE` while the cores were busy) drop the count to the cores' worth the process
gets; `PATIENCE` windows with a whole core idle raise it (only where busy cores held the start
count down, to at most the cores `auto` may use). One change, or `SETTLE_CHECKS` calm windows,
settle it for the rest of the run: the count changes numerics, so only this early window may
change it, and the change is an event in the log (`slow` for a drop, `threads` for a raise).
Checkpoints record the count and whether it is settled; a resume uses them, so it stays
bit-identical.
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
# How long the start decision watches the cores (the process sleeps meanwhile): /proc/stat
# counts in 10 ms ticks, so 0.3 s on 2 cores resolves 1/30 of a core.
BUSY_SAMPLE_SECONDS = 0.3
# Re-checking during the run (ThreadGovernor). Below this share of its threads' CPU time the
# process is starved (a run alone on its cores gets close to all of it): with ~20 busy processes
# on 2 cores, a 1-thread tiny run got 8-20%; a steady 2-thread matmul loop beside 2 spinners
# got 19-27% (bench/bench_busy_view.py); alone, 99%.
STARVED_SHARE = 0.5
PATIENCE = 2  # windows in a row before the count changes (one busy moment is not a trend)
SETTLE_CHECKS = 4  # judged windows without a change after which the count is settled
WARMUP_STEPS = 2  # a session's first steps (allocation, torch.compile) never count as starved
# A governor window: at least this long (whole steps). A tiny step is ~0.15 s alone and ~1.2 s
# on 2 threads beside 2 spinners, so a drop comes within ~2-4 s of the warm-up whatever
# log.interval is; a second covers ~40 scheduler slices, enough for a steady CPU share.
WINDOW_SECONDS = 1.0
RAISE_IDLE = 0.75  # idle cores in each of PATIENCE windows before a thread is added
# A low share only counts as starved while the CPUs were busy (idle below this many cores):
# threads that wait for data, a lock or the disk leave the cores idle; other processes don't.
CONTENDED_IDLE = 0.5


@dataclass(frozen=True)
class ThreadChoice:
    count: int
    source: str  # config | checkpoint | env | auto | device
    reason: str  # what the header prints after "threads: "
    ceiling: int = 0  # the most threads the governor may raise the count to (0: the count)


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


def cpu_ticks(cpus: set[int], stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(busy, idle) clock ticks of `cpus` since boot from /proc/stat, or None (not Linux).
    Steal time (the hypervisor gave the CPU to another guest) counts as busy: not ours either."""
    busy = idle = 0
    try:
        with stat.open() as f:
            for line in f:
                if not line.startswith("cpu") or not line[3:4].isdigit():
                    continue
                fields = line.split()
                if int(fields[0][3:]) not in cpus:
                    continue
                # user nice system idle iowait irq softirq steal
                values = [int(v) for v in fields[1:9]]
                idle += values[3] + values[4]
                busy += sum(values) - values[3] - values[4]
    except (OSError, ValueError, IndexError):
        return None
    return (busy, idle) if busy + idle else None


def affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:
        return set(range(os.cpu_count() or 1))


def idle_seconds() -> float | None:
    """Idle CPU seconds of this process's CPUs since boot (the governor's raise check)."""
    ticks = cpu_ticks(affinity())
    return None if ticks is None else ticks[1] / os.sysconf("SC_CLK_TCK")


def busy_cores(seconds: float = BUSY_SAMPLE_SECONDS) -> tuple[float, int] | None:
    """(cores other processes keep busy, CPUs watched): the busy time of this process's CPUs
    over `seconds` while it sleeps, or None where /proc/stat is not available."""
    cpus = affinity()
    before, start = cpu_ticks(cpus), time.perf_counter()
    if before is None:
        return None
    time.sleep(seconds)
    after, wall = cpu_ticks(cpus), time.perf_counter() - start
    if after is None:
        return None
    busy = (after[0] - before[0]) / os.sysconf("SC_CLK_TCK") / max(wall, 1e-6)
    return max(0.0, min(float(len(cpus)), busy)), len(cpus)


def free_cores(cores: int, busy: float, watched: int) -> int:
    """The threads the idle CPUs leave room for: their idle share rounded to whole cores (a core
    more than half idle counts), at least 1 and at most `cores` (a cgroup quota may cap it
    below the CPUs watched)."""
    return max(1, min(cores, math.floor(watched - busy + 0.5)))


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
    """`train.threads=auto` on a CPU: cores, their busy time now and a probe (module docstring)."""
    cores, how = usable_cores()
    load = load_average()
    load_note = f", load average {load:.1f}" if load is not None else ""
    if cores <= 1:
        return ThreadChoice(1, "auto", f"1 (auto: {how}{load_note})")
    view = busy_cores()
    if view is not None:
        busy, watched = view
        free = free_cores(cores, busy, watched)
        seen = f"; other processes kept {busy:.1f} of its {watched} CPUs busy just now{load_note}"
        counts = sorted({1, free})  # never more threads than idle cores: they wait at barriers
    else:  # no per-CPU counters: the load average (it counts this process's recent work too),
        # which may lag, so the probe also tries all cores
        free = cores if load is None else max(1, round(cores - max(0.0, load - 1)))
        seen = load_note
        counts = sorted({1, free, cores})
    timings = probe(counts, rows, width) if len(counts) > 1 else {}
    count = pick(timings) if timings else 1
    shown = ", ".join(f"{n}: {1000 * t:.1f} ms" for n, t in sorted(timings.items()))
    probed = f"; probe {shown}" if shown else ""
    # The governor may add threads only where busy cores held the count down, not where the
    # probe found more threads no faster.
    ceiling = cores if view is not None and count == free < cores else count
    return ThreadChoice(
        count,
        "auto",
        f"{count} (auto: {how}{seen}{probed}; re-checked over the first seconds of steps)",
        ceiling=ceiling,
    )


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
    """Re-checks the thread count during a run's first seconds of steps (module docstring).

    `tick(...)` runs after every step with the clocks; every `WINDOW_SECONDS` it judges the
    window (`observe`) and returns the new thread count when the count should change, else None.
    `restart()` drops the window in progress (an evaluation or checkpoint is not a step).
    """

    def __init__(self, threads: int, *, settled: bool, adjustable: bool, ceiling: int = 0) -> None:
        self.threads = threads
        self.ceiling = max(ceiling, threads)
        self.settled = settled or not adjustable or (threads <= 1 and self.ceiling <= 1)
        self.checks = 0
        self.starved_in_a_row = 0
        self.roomy: list[float] = []  # idle cores of the windows in a row that had a core idle
        # (step, wall, cpu, idle) at the start of the window in progress
        self.window: tuple[int, float, float, float | None] | None = None
        self.last: dict[str, float] = {}  # the last window's figures (for the event message)

    def restart(self) -> None:
        self.window = None

    def tick(
        self, *, step: int, session_start: int, wall: float, cpu: float, idle: float | None
    ) -> int | None:
        """After step `step`: `wall` seconds, `cpu` process CPU seconds and `idle` idle seconds
        of its CPUs (None: unknown), each a running clock."""
        if self.settled:
            return None
        if step <= session_start + WARMUP_STEPS or self.window is None:
            self.window = (step, wall, cpu, idle)  # the window starts after this step
            return None
        first, wall0, cpu0, idle0 = self.window
        seconds = wall - wall0
        if seconds < WINDOW_SECONDS:
            return None
        self.window = (step, wall, cpu, idle)
        share = (cpu - cpu0) / (seconds * self.threads)
        idle_cores = None if idle is None or idle0 is None else (idle - idle0) / seconds
        self.last = {"steps": step - first, "seconds": seconds, "cpu": cpu - cpu0, "share": share}
        if idle_cores is not None:
            self.last["idle_cores"] = idle_cores
        return self.observe(
            first_step=first + 1, session_start=session_start, share=share, idle_cores=idle_cores
        )

    def observe(
        self,
        *,
        first_step: int,
        session_start: int,
        share: float,
        idle_cores: float | None = None,
    ) -> int | None:
        """Judge one window. `first_step`: its first step; `share`: CPU seconds / (wall x
        threads); `idle_cores`: idle CPU seconds of the process's CPUs / wall."""
        if self.settled or first_step <= session_start + WARMUP_STEPS:
            return None  # warm-up and compile time are one thread's work, not contention
        self.checks += 1
        busy = idle_cores is None or idle_cores < CONTENDED_IDLE
        starved = share < STARVED_SHARE and busy
        self.starved_in_a_row = self.starved_in_a_row + 1 if starved else 0
        roomy = (
            not starved
            and idle_cores is not None
            and idle_cores >= RAISE_IDLE
            and self.threads < self.ceiling
        )
        self.roomy = [*self.roomy, idle_cores] if roomy and idle_cores is not None else []
        if self.starved_in_a_row >= PATIENCE:
            return self._change(threads_to_use(self.threads, share))
        if len(self.roomy) >= PATIENCE:
            more = self.threads + max(1, math.floor(min(self.roomy) + 1 - RAISE_IDLE))
            return self._change(min(self.ceiling, more))
        if self.checks >= SETTLE_CHECKS:
            self.settled = True
        return None

    def _change(self, count: int) -> int | None:
        """Settle on `count`: one change per run (each one alters the numerics)."""
        self.settled = True
        if count == self.threads:
            return None
        self.threads = count
        return count
