"""Encoding speed on the 42 plays: one process, threads, worker processes; ours (10k) and GPT-2.

    .venv/bin/python bench/bench_encode.py [--workers 2] [--repeats 3]

Figures go in notes/tokenizer.md. The 10k tokenizer is trained here first (about a second).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tinylm.paths import shared_data_dir
    from tinylm.tokenizer.bpe import encode_parallel, gpt2_tokenizer
    from tinylm.tokenizer.bpe_train import train_bpe
    from tinylm.tokenizer.reference import ReferenceBPE

    plays = sorted((shared_data_dir() / "shakespeare_plays").glob("*.txt"))
    texts = [p.read_text(encoding="utf-8") for p in plays]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    ours = train_bpe(plays, 10_000, ["<|endoftext|>"]).tokenizer()
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; {len(texts)} plays, {mb:.2f} MB"
    )
    print("| tokenizer | way | MB/s | tokens | bytes/token |")
    print("|---|---|---:|---:|---:|")
    for name, tok in (("ours-10k", ours), ("gpt2", gpt2_tokenizer())):
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        ways = {
            "1 process": lambda tok=tok: [tok.encode(t) for t in texts],
            f"{args.workers} threads (encode_batch)": lambda tok=tok: tok.encode_batch(
                texts, num_workers=args.workers
            ),
            f"{args.workers} processes (encode_parallel)": lambda tok=tok: list(
                encode_parallel(tok, texts, num_workers=args.workers, chunksize=1)
            ),
            "encode_iterable (lines)": lambda tok=tok: sum(
                1 for t in texts for _ in tok.encode_iterable(t.splitlines(keepends=True))
            ),
        }
        for way, fn in ways.items():
            s = best_of(args.repeats, fn)
            print(f"| {name} | {way} | {mb / s:.2f} | {n_tokens:,} | {mb * 1e6 / n_tokens:.3f} |")
    ref = ReferenceBPE(ours.vocab, ours.merges, ours.special_tokens)
    sample = texts[0][:200_000]
    s = best_of(1, lambda: ref.encode(sample))
    print(f"| ours-10k | pure-Python reference | {len(sample.encode()) / 1e6 / s:.2f} | - | - |")


if __name__ == "__main__":
    main()
