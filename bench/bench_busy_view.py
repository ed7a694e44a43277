"""What the start decision of `train.threads=auto` sees when a load starts with the run.

Reads the signals once on the machine as it is, then again right after starting --busy spinning
processes: the 1-minute load average (what the first version used), the runnable-task count
(`procs_running`, whole host), the busy cores of this process's CPUs (`threads.busy_cores`, what
`auto` uses now) and the resulting choice's free cores; then times a steady forward+backward
matmul loop at 1 and at all cores for --seconds each (alternated, 2 rounds) with the CPU share
the threads got. About 10 s in all. Usage:
  .venv/bin/python bench/bench_busy_view.py [--busy 2] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tinylm.train import threads


def runnable() -> int:
    """Runnable tasks on the host now, less this one (the reader)."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1


def steady(count: int, seconds: float) -> tuple[float, float]:
    """ms per forward+backward of a tiny-sized matmul pair, and the threads' CPU share."""
    torch.set_num_threads(count)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=gen, requires_grad=True)
    w1 = torch.randn(128, 512, generator=gen, requires_grad=True)
    w2 = torch.randn(512, 128, generator=gen, requires_grad=True)
    start, cpu0, n = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - start < seconds:
        (torch.relu(x @ w1) @ w2).sum().backward()
        n += 1
    wall = time.perf_counter() - start
    return 1000 * wall / n, (time.process_time() - cpu0) / (wall * count)


def report(label: str, seconds: float) -> None:
    cores, _ = threads.usable_cores()
    view = threads.busy_cores()
    busy = f"{view[0]:.2f} of {view[1]} CPUs" if view else "n/a"
    free = threads.free_cores(cores, *view) if view else "n/a"
    print(
        f"{label}: load average {os.getloadavg()[0]:.2f}, runnable tasks {runnable()}, "
        f"busy {busy} -> free cores {free}",
        flush=True,
    )
    for _ in range(2):
        for count in sorted({cores, 1}, reverse=True):
            ms, share = steady(count, seconds)
            print(f"  steady loop, {count} thread(s): {ms:.1f} ms/iter, CPU share {share:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--busy", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    report("as is", args.seconds)
    spin = [sys.executable, "-c", "while True: pass"]
    spinners = [subprocess.Popen(spin) for _ in range(args.busy)]
    try:
        time.sleep(0.05)
        report(f"{args.busy} spinners started 50 ms ago", args.seconds)
    finally:
        for p in spinners:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
