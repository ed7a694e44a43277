"""Time per training step of the tiny preset with 1 vs 2 torch threads, alternating A/B.

On a 2-core machine shared with other busy processes, OpenMP threads that spin-wait for each
other lose whole time slices; this measures by how much, on the machine as it is right now
(report the load average with the figures). Usage:
  .venv/bin/python bench/bench_cpu_threads.py [--rounds 5] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from tinylm.config import load_config
from tinylm.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    cfg = load_config("tiny", ["log.progress=false", "log.tensorboard=false"])
    trainer = Trainer(cfg, tempfile.mkdtemp() + "/run")
    times: dict[int, list[float]] = {n: [] for n in counts}
    with trainer.loader:
        batches = iter(trainer.loader.iterate(0))
        trainer.train_step(batches)
        for _ in range(args.rounds):
            for n in counts:
                torch.set_num_threads(n)
                trainer.train_step(batches)  # settle the thread pool at this size
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step(batches)
                times[n].append(1000 * (time.perf_counter() - start) / args.steps)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    base = statistics.median(times[counts[0]])
    for n in counts:
        med = statistics.median(times[n])
        rounds = " ".join(f"{t:.0f}" for t in times[n])
        print(
            f"{n} thread(s): median {med:.0f} ms/step ({rounds}); ratio to {counts[0]}: {med / base:.2f}"
        )


if __name__ == "__main__":
    main()
