"""DDP scaling on this machine: one process vs two (torchrun, Gloo on CPU), tokens per second.

Each round runs the same short `tinylm train tiny` twice, A/B alternated: A = one process with
all the threads (`--threads`), B = `torchrun --nproc_per_node=2` with threads/2 each (the same
cores). Both use the same per-rank batch, so B processes twice the tokens per step (weak
scaling). The figure is the median `tokens_per_second` of the logged intervals after the first
(warm-up), per run; the report gives each round's B/A ratio and their median.

    .venv/bin/python bench/ddp_scaling.py --rounds 5 --steps 40

CPU Gloo says nothing about NCCL on GPUs: this measures the machinery (launch, all-reduce of a
small model's gradients over loopback TCP) on CPU cores, not a GPU cluster's scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, name: str, nproc: int, threads: int, steps: int) -> float:
    args = [
        "tiny", f"out_dir={out}", f"run_name={name}", f"train.max_steps={steps}",
        "log.interval=5", "eval.interval=0", "eval.samples=0", "checkpoint.interval=0",
        "log.tensorboard=false", "train.compile=false",
    ]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, "-m", "tinylm.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "tinylm.cli", "train", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=1800)
    lines = (out / name / "metrics.jsonl").read_text().splitlines()
    rates = [r["tokens_per_second"] for r in map(json.loads, lines) if r["kind"] == "train"]
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2, help="cores given to each variant")
    args = parser.parse_args()
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            one = run(Path(tmp), f"one-{i}", 1, args.threads, args.steps)
            two = run(Path(tmp), f"two-{i}", 2, max(args.threads // 2, 1), args.steps)
            ratios.append(two / one)
            print(f"round {i}: 1 process {one:,.0f} tok/s | 2 processes {two:,.0f} tok/s | "
                  f"ratio {two / one:.2f}", flush=True)  # fmt: skip
    print(f"median ratio (2 processes / 1): {statistics.median(ratios):.2f}")
    print(f"load average after: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
