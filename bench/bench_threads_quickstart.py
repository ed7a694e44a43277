"""Wall time of the quickstart run: train.threads=auto vs today's behaviour vs OMP_NUM_THREADS=1.

Each variant runs `tinylm train tiny` (shortened with --steps) as a fresh process, alternated
over --rounds rounds, with and without a background load of --busy spinning processes (the
issue's "machine loaded by 2 busy background processes"). "today" is the code at --base (a git
revision, default: the fork point from main), checked out into a temporary worktree: 2 threads
from the start, dropped by the `slow` check once it fires. Reports the median wall time of each
variant and its ratio to auto, with the CPU flags and the load average before each condition.
Usage:
  .venv/bin/python bench/bench_threads_quickstart.py [--steps 150] [--rounds 3] [--busy 2]
      [--conditions loaded,idle] [--base REV] [--variants auto,today,omp1]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def spin() -> None:
    while True:
        pass


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    found = sorted(set(re.findall(r"\b(amx_\w+|avx512_bf16|avx512f|avx2)\b", text)))
    return " ".join(found) or "?"


def run_once(code_dir: Path, env_threads: str | None, steps: int, out: Path, name: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if env_threads:
        env["OMP_NUM_THREADS"] = env_threads
    env["PYTHONPATH"] = str(code_dir)
    cmd = [
        sys.executable, "-c", "import sys; from tinylm.cli import main; sys.exit(main())",
        "train", "tiny", f"train.max_steps={steps}", f"out_dir={out}", f"run_name={name}",
        "log.progress=false", "log.tensorboard=false", "eval.samples=0",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=code_dir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    shown = (re.findall(r"threads: (\d+)", proc.stdout)[:1] or ["-"])[0]
    # a change during the run: the governor's `slow` (drop) or `threads` (raise) event
    changes = r"step (\d+): (?:slow: .*?Using (\d+) thread|threads \d+ -> (\d+))"
    for step, fewer, more in re.findall(changes, proc.stdout):
        shown += f" -> {fewer or more} at step {step}"
    slow = "slow" in proc.stdout
    print(f"  {name}: {wall:.1f} s (threads {shown}; slow event: {slow})", flush=True)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy", type=int, default=2)
    ap.add_argument("--conditions", default="loaded,idle")
    ap.add_argument("--base", default="", help="git revision of today's behaviour")
    ap.add_argument("--variants", default="auto,today,omp1", help="a subset of auto,today,omp1")
    args = ap.parse_args()
    # `timeout` or kill: still stop the spinners and remove the worktree (the finally blocks)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = (
        args.base
        or subprocess.run(
            ["git", "merge-base", "HEAD", "main"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    base_dir = tmp / "base"
    subprocess.run(
        ["git", "worktree", "add", "-q", "--detach", str(base_dir), base], cwd=REPO, check=True
    )
    variants = {
        "auto": (REPO, None),
        "today": (base_dir, None),
        "omp1": (REPO, "1"),
    }
    variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    print(
        f"CPU flags: {cpu_flags()}; {os.cpu_count()} cores; {args.steps} steps of tiny; base {base[:10]}"
    )
    try:
        print("warm-up (prepares the data once, for every variant):")
        run_once(REPO, None, 1, tmp / "warm", "warm-up")
        for condition in args.conditions.split(","):
            spinners = []
            if condition == "loaded":
                spinners = [
                    multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)
                ]
                for p in spinners:
                    p.start()
                time.sleep(2)
            print(f"{condition}: load average before: {loadavg()}")
            times: dict[str, list[float]] = {v: [] for v in variants}
            try:
                for r in range(args.rounds):
                    for name, (code, env_threads) in variants.items():
                        out = tmp / "runs"
                        times[name].append(
                            run_once(code, env_threads, args.steps, out, f"{condition}-{name}-{r}")
                        )
                        shutil.rmtree(out, ignore_errors=True)
            finally:
                for p in spinners:
                    p.terminate()
            first = next(iter(times))  # auto, unless --variants leaves it out
            ref = statistics.median(times[first])
            print(f"{condition}: load average after: {loadavg()}")
            for name, values in times.items():
                med = statistics.median(values)
                print(
                    f"{condition:>7} {name:>6}: median {med:.1f} s "
                    f"({' '.join(f'{v:.1f}' for v in values)}); ratio to {first} {med / ref:.2f}"
                )
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_dir)], cwd=REPO)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
