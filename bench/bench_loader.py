"""How long the loader takes to make a batch, against how long a tiny-model step takes.

    .venv/bin/python bench/bench_loader.py [--tokens 100_000_000] [--dir /tmp]

Writes a uint16 token file of `--tokens` random ids (memory-mapped, never loaded whole), then:
1. gathering B windows: a slice per row vs one fancy index over an index array;
2. `host_batch` per micro-batch for random / sequential / two-source mixing;
3. a training loop of the tiny preset's model (if tinylm.model is importable): time per step,
   and how long the loop waits for data with prefetch 0 and 2.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tinylm.data.loader import BatchLoader, gather_windows


def per_call_us(fn, repeat: int) -> float:
    fn()  # warm the page cache and any lazy set-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e6


def fancy_gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return tokens[starts[:, None] + np.arange(length)].astype(np.int64)


def bench_gather(tokens: np.ndarray, batch: int, seq_len: int) -> None:
    rng = np.random.default_rng(0)
    high = len(tokens) - seq_len - 1

    def draw() -> np.ndarray:
        return rng.integers(0, high, size=batch)

    slice_us = per_call_us(lambda: gather_windows(tokens, draw(), seq_len + 1), 300)
    fancy_us = per_call_us(lambda: fancy_gather(tokens, draw(), seq_len + 1), 300)
    print(
        f"gather B={batch} T={seq_len}: slice per row {slice_us:7.1f} us | "
        f"fancy index {fancy_us:7.1f} us"
    )


def bench_host_batch(tokens: np.ndarray, batch: int, seq_len: int) -> None:
    half = len(tokens) // 2
    cases = {
        "random": [("a", tokens, 1.0)],
        "sequential": [("a", tokens, 1.0)],
        "random, 2 sources": [("a", tokens[:half], 0.2), ("b", tokens[half:], 0.8)],
    }
    for name, sources in cases.items():
        sampling = "sequential" if name == "sequential" else "random"
        loader = BatchLoader(sources, batch_size=batch, seq_len=seq_len, seed=1, sampling=sampling)
        steps = iter(range(10**9))
        us = per_call_us(lambda ld=loader, it=steps: ld.host_batch(next(it), 0), 300)
        print(f"host_batch B={batch} T={seq_len} {name:<18}: {us:7.1f} us")


def bench_training_wait(tokens: np.ndarray, steps: int) -> None:
    try:
        from tinylm.config import ModelConfig
        from tinylm.model import GPT
    except ImportError as e:
        print(f"(skipping the training-loop measurement: {e})")
        return
    # The tiny preset's model (configs/tiny.yaml), with a character-sized vocabulary.
    cfg = ModelConfig(vocab_size=128, context_length=128, n_layer=4, n_head=4, d_model=128)
    cfg.norm, cfg.pos_emb, cfg.bias = "rmsnorm", "rope", False
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = tokens % 128
    for prefetch in (0, 2):
        loader = BatchLoader(
            [("a", ids, 1.0)], batch_size=32, seq_len=128, seed=0, prefetch=prefetch
        )
        batches = loader.iterate(0)
        wait = compute = 0.0
        for i in range(steps + 3):
            t0 = time.perf_counter()
            x, y = next(batches)
            t1 = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if i >= 3:  # skip warm-up steps
                wait, compute = wait + (t1 - t0), compute + (t2 - t1)
        batches.close()
        print(
            f"tiny model, B=32 T=128, prefetch={prefetch}: step {compute / steps * 1e3:6.1f} ms, "
            f"waiting for data {wait / steps * 1e6:7.1f} us/step ({100 * wait / compute:.2f}%)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = Path(args.dir) / f"bench_loader_{args.tokens}.bin"
    if not path.exists() or path.stat().st_size != 2 * args.tokens:
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            for lo in range(0, args.tokens, 10_000_000):
                n = min(10_000_000, args.tokens - lo)
                rng.integers(0, 50_257, size=n, dtype=np.uint16).tofile(f)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    print(f"{len(tokens):,} uint16 tokens memory-mapped from {path}")
    for batch, seq_len in [(32, 128), (32, 1024), (8, 4096)]:
        bench_gather(tokens, batch, seq_len)
    for batch, seq_len in [(32, 128), (32, 1024)]:
        bench_host_batch(tokens, batch, seq_len)
    bench_training_wait(tokens, args.steps)


if __name__ == "__main__":
    main()
