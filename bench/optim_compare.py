"""Muon vs AdamW (and cosine vs WSD) on Tiny Shakespeare, character level, `tiny` preset, equal steps.

Trains each variant in turn with the same seed and data, then prints one table: best and final
validation loss, bits per character (= bits per byte on this ASCII text), training minutes.
Losses are deterministic (seeded); minutes depend on how busy the machine is.

    .venv/bin/python bench/optim_compare.py --steps 600 --out /tmp/optim-compare [--only muon-cosine ...]

Figures: notes/issue-10-optim.md. Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tinylm.paths import shared_data_dir

VARIANTS = {
    "adamw-cosine": [],
    "muon-cosine": ["optim.name=muon"],
    "adamw-wsd": ["optim.schedule=wsd"],
    "muon-wsd": ["optim.name=muon", "optim.schedule=wsd"],
}


def best_and_last(run: Path) -> tuple[float, float, float]:
    evals = [
        r
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "eval"
    ]
    best = min(evals, key=lambda r: r["val/loss"])
    return best["val/loss"], best["val/bits_per_byte"], evals[-1]["val/loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="/tmp/optim-compare")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("extra", nargs="*", help="more overrides for every variant")
    args = parser.parse_args()
    data = shared_data_dir() / "tinyshakespeare.txt"
    rows = []
    for name in args.only:
        overrides = [
            f"data.train={data}", f"train.max_steps={args.steps}", f"out_dir={args.out}",
            f"run_name={name}", "eval.interval=100", "log.progress=false", "log.tensorboard=false",
            "eval.samples=0", *VARIANTS[name], *args.extra,
        ]  # fmt: skip
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "tinylm.cli", "train", "tiny", *overrides]
        # One thread: on a shared 2-core machine two spinning OpenMP threads per process made
        # tiny-model steps many times slower (tests/conftest.py); override with OMP_NUM_THREADS.
        env = {"OMP_NUM_THREADS": "1", **os.environ}
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        minutes = (time.perf_counter() - start) / 60
        best, bpc, last = best_and_last(Path(args.out) / name)
        rows.append((name, best, bpc, last, minutes))
        print(f"{name:14s} best val {best:.4f}  bpc {bpc:.4f}  final {last:.4f}  {minutes:.1f} min")
    print("\n| variant | best val loss | bits/char | final val loss | minutes |")
    print("|---|---:|---:|---:|---:|")
    for name, best, bpc, last, minutes in rows:
        print(f"| {name} | {best:.4f} | {bpc:.4f} | {last:.4f} | {minutes:.1f} |")


if __name__ == "__main__":
    main()
