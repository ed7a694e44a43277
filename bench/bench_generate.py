"""Generation speed with and without the KV cache.

    .venv/bin/python bench/bench_generate.py [--shapes tiny,10m] [--rounds 3]

For each model shape of bench/bench_model.py (random weights: speed does not depend on them)
generates `context - 1` tokens from a one-token prompt (the longest run that fits the context,
so the cached path never falls back to recomputing), sampling with temperature 1 and top-k 50,
batch 1 and batch 8, with the cache and without. Variants alternate within each round and the
median is reported. Also a long prompt (half the context) to show the prefill's share.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_model import SHAPES  # the sibling script (this folder is on sys.path when run)

from tinylm.config import load_config
from tinylm.generate import generate
from tinylm.model import GPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,10m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )

    for shape in args.shapes.split(","):
        preset, overrides = SHAPES[shape]
        cfg = load_config(preset, overrides)
        torch.manual_seed(0)
        model = GPT(cfg.model).eval()
        ctx = cfg.model.context_length
        cases = {}
        for batch in (1, 8):
            for prompt_len in (1, ctx // 2):
                prompts = [[1 + i] * prompt_len for i in range(batch)]
                new = ctx - prompt_len
                for use_cache in (True, False):
                    name = f"batch {batch}, prompt {prompt_len:>3}, {'cache' if use_cache else 'no cache'}"
                    cases[name] = (prompts if batch > 1 else prompts[0], new, use_cache, batch)
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, (prompts, new, use_cache, _) in cases.items():
                t0 = time.perf_counter()
                generate(model, prompts, max_new_tokens=new, top_k=50, seed=0, use_cache=use_cache)
                times.setdefault(name, []).append(time.perf_counter() - t0)
        print(f"\n== {shape}: {model.num_params() / 1e6:.2f}M parameters, context {ctx}")
        print(f"{'case':<36} {'new tokens':>10} {'seconds':>8} {'tokens/s':>9}")
        for name, (_, new, _, batch) in cases.items():
            s = statistics.median(times[name])
            print(f"{name:<36} {new * batch:>10} {s:>8.2f} {new * batch / s:>9.0f}")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
