"""Optimizer-step cost of the `tiny` model: AdamW vs Muon + AdamW (float32 and bfloat16
Newton-Schulz), interleaved A/B/C `--rounds` times, one thread, random gradients.

    OMP_NUM_THREADS=1 .venv/bin/python bench/muon_step_cost.py --rounds 5

Figures: notes/issue-10-optim.md. Never run by the tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinylm.config import load_config
from tinylm.model import GPT
from tinylm.train.optim import build_optimizer

VARIANTS = {
    "adamw": ["optim.name=adamw"],
    "muon-fp32": ["optim.name=muon", "optim.muon_ns_dtype=float32"],
    "muon-bf16": ["optim.name=muon", "optim.muon_ns_dtype=bfloat16"],
}


def step_ms(overrides: list[str], steps: int) -> float:
    cfg = load_config("tiny", ["model.vocab_size=65", *overrides])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # state allocation outside the timing
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-bf16", action="store_true", help="bfloat16 is very slow on AVX2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [n for n in VARIANTS if not (args.skip_bf16 and n == "muon-bf16")]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            times[name].append(step_ms(VARIANTS[name], args.steps))
    base = statistics.median(times["adamw"])
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:10s} median {med:8.1f} ms/step  ({med / base:5.1f}x adamw)  {times[name]}")


if __name__ == "__main__":
    main()
