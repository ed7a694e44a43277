"""Cost of issue 21's guards: the finite-weights check and the bounded YAML loader.

    .venv/bin/python bench/bench_issue21_checks.py [--preset gpt2-124m] [--rounds 7]

Prints medians (and their ratios to what they guard) so the figures in
notes/issue-21-hardening.md can be re-measured. Not run by the tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import yaml

from tinylm.config import PRESET_DIR, load_config
from tinylm.finite import all_finite
from tinylm.model import GPT
from tinylm.yamlio import load


def _median(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()

    cfg = load_config(args.preset)
    cfg.model.vocab_size = 50304
    model = GPT(cfg.model)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    fused, per_tensor = [], []
    for _ in range(args.rounds):  # A/B alternated
        fused.append(_median(lambda: bool(all_finite(params)), 1))
        per_tensor.append(
            _median(lambda: bool(torch.stack([torch.isfinite(p).all() for p in params]).all()), 1)
        )
    check, naive = statistics.median(fused), statistics.median(per_tensor)
    x = torch.randint(0, 50304, (1, 256))
    step = _median(lambda: model(x, x)[1].backward(), max(3, args.rounds // 2))
    print(
        f"finite check, {args.preset} ({n / 1e6:.1f}M params, {torch.get_num_threads()} threads): "
        f"all_finite {check * 1e3:.1f} ms vs isfinite().all() per tensor {naive * 1e3:.1f} ms "
        f"(ratio {check / naive:.2f}); one forward+backward of 1x256 tokens {step * 1e3:.0f} ms "
        f"(check / step {check / step:.3f})"
    )

    texts = [f.read_text() for f in sorted(PRESET_DIR.glob("*.yaml"))]
    plain, bounded = [], []
    for _ in range(args.rounds):  # A/B alternated
        plain.append(_median(lambda: [yaml.safe_load(t) for t in texts], 1))
        bounded.append(_median(lambda: [load(t) for t in texts], 1))
    a, b = statistics.median(plain), statistics.median(bounded)
    print(
        f"YAML, all {len(texts)} presets: safe_load {a * 1e3:.2f} ms, bounded load "
        f"{b * 1e3:.2f} ms (ratio {b / a:.2f})"
    )


if __name__ == "__main__":
    main()
