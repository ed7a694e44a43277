"""Throughput (MB/s) and peak memory of `tinylm prepare` on a generated multi-gigabyte text file.

    .venv/bin/python bench/bench_prepare.py                      # 2.1 GB, char, 1 and 2 workers
    .venv/bin/python bench/bench_prepare.py --size-gb 0.3 --tokenizer gpt2
    # issue 23: GPT-2 prepare (2 workers) vs tiktoken in one process, interleaved, on >= 1 GB of
    # real text (the shared plays + stories repeated into /tmp), and a 1 GB pretokenized .bin
    .venv/bin/python bench/bench_prepare.py --vs-tiktoken --size-gb 1.0 --rounds 3
    .venv/bin/python bench/bench_prepare.py --read-bin-gb 1.0

Generates `<dir>/stories.txt` (synthetic stories, `<|endoftext|>`-separated; reused if present),
then runs `tinylm prepare` on it in a subprocess per worker count, sampling the RSS of the whole
process tree (main + workers) every 0.2 s. Peak RSS is the largest sampled sum over the tree.
The output directory is deleted after each run (a 2 GB char dataset is 4 GB of uint16 shards).
Figures go in notes/data.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tinylm.data.prepare import fit_char_tokenizer
from tinylm.data.synthetic import generate_stories

SEP = "\n<|endoftext|>\n"


def make_corpus(path: Path, size_bytes: int) -> None:
    """Write >= size_bytes of stories: a ~64 MB block of distinct stories, repeated."""
    if path.is_file() and path.stat().st_size >= size_bytes:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    block = (
        SEP.join(s for seed in range(22) for s in generate_stories(5000, seed)).encode()
        + SEP.encode()
    )
    write_repeated(path, block, size_bytes)


def write_repeated(path: Path, block: bytes, size_bytes: int) -> None:
    """`block` written again and again until `path` holds >= size_bytes (renamed when complete)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        written = 0
        while written < size_bytes:
            f.write(block)
            written += len(block)
    tmp.replace(path)


def run_prepare(corpus: Path, out: Path, tokenizer: str, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tinylm.cli", "prepare", str(corpus), "--out", str(out)]
    cmd += ["--tokenizer", tokenizer, "--workers", str(workers), "--no-progress"]
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_tree = peak_main = 0
    cpu: dict[int, float] = {}  # pid -> last seen user + system seconds (the tree's CPU time)
    while proc.poll() is None:
        try:
            procs = [proc, *proc.children(recursive=True)]
            rss = [p.memory_info().rss for p in procs]
            for p in procs:
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            continue
        peak_tree, peak_main = max(peak_tree, sum(rss)), max(peak_main, rss[0])
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}):\n{output}")
    meta = json.loads((out / "meta.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    size = corpus.stat().st_size
    return {
        "workers": workers,
        "tokenizer": tokenizer,
        "gb": round(size / 1e9, 3),
        "seconds": round(seconds, 1),
        "mb_per_s": round(size / 1e6 / seconds, 1),
        "peak_rss_tree_mb": round(peak_tree / 2**20),
        "peak_rss_main_mb": round(peak_main / 2**20),
        "cpu_s": round(sum(cpu.values()), 1),  # on a loaded machine: MB per CPU-second is fairer
        "tokens": sum(s["tokens"] for s in meta["splits"].values()),
    }


def make_real_corpus(path: Path, size_bytes: int) -> None:
    """Write >= size_bytes by repeating the shared data's text (plays, Tiny Shakespeare, stories)."""
    from tinylm.paths import shared_data_dir

    if path.is_file() and path.stat().st_size >= size_bytes:
        return
    data = shared_data_dir()
    files = [
        *sorted((data / "shakespeare_plays").glob("*")),
        data / "tinyshakespeare.txt",
        data / "tinystories_sample.txt",
    ]
    block = SEP.join(f.read_text(encoding="utf-8", errors="replace") for f in files).encode()
    block += SEP.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_repeated(path, block, size_bytes)


def tiktoken_single(corpus: Path) -> dict:
    """tiktoken's GPT-2 encoder in this one process (one thread), the file read in 4 MB pieces."""
    from tinylm.tokenizer.bpe import gpt2_tokenizer

    enc = gpt2_tokenizer()._enc  # the same tiktoken Encoding prepare's workers use
    tokens = 0
    start, cpu = time.perf_counter(), time.process_time()
    with open(corpus, encoding="utf-8") as f:
        while piece := f.read(4 << 20):
            tokens += len(enc.encode(piece, allowed_special="all"))
    seconds = time.perf_counter() - start
    size = corpus.stat().st_size
    return {"what": "tiktoken 1 process", "seconds": round(seconds, 1), "tokens": tokens,
            "mb_per_s": round(size / 1e6 / seconds, 2),
            "cpu_s": round(time.process_time() - cpu, 1)}  # fmt: skip


def vs_tiktoken(scratch: Path, size_gb: float, rounds: int, workers: int) -> None:
    """Interleaved rounds: tiktoken single-process, then `prepare --workers N`; median ratio."""
    import os
    import statistics

    corpus = scratch / f"real_{size_gb:g}gb.txt"
    make_real_corpus(corpus, int(size_gb * 1e9))
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e9:.2f} GB)", flush=True)
    ratios = []
    for r in range(rounds):
        base = tiktoken_single(corpus)
        ours = run_prepare(corpus, scratch / "prepared", "gpt2", workers)
        ratios.append(ours["mb_per_s"] / base["mb_per_s"])
        print(json.dumps({"round": r, "tiktoken": base, "prepare": ours,
                          "ratio": round(ratios[-1], 2), "loadavg": os.getloadavg()}), flush=True)  # fmt: skip
    print(json.dumps({"median_ratio": round(statistics.median(ratios), 2),
                      "ratios": [round(x, 2) for x in ratios]}))  # fmt: skip


def read_bin(scratch: Path, size_gb: float) -> None:
    """Seconds from a pretokenized 1 GB nanoGPT .bin to token arrays ready to train (in place)."""
    import os

    import numpy as np

    from tinylm.config import DataConfig
    from tinylm.data import resolve_data

    path = scratch / f"tokens_{size_gb:g}gb.bin"
    n = int(size_gb * 1e9) // 2
    if not path.is_file() or path.stat().st_size != 2 * n:
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            for i in range(0, n, 1 << 24):
                ids = rng.integers(0, 50256, size=min(1 << 24, n - i), dtype=np.uint16)
                ids[::1000] = 50256  # a document every 1,000 tokens
                ids.tofile(f)
    cache = scratch / "bin_cache"
    for attempt in ("first (scan + meta)", "again (cached meta)"):
        if attempt.startswith("first"):
            shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        data = resolve_data(
            DataConfig(train=str(path), tokenizer="gpt2", cache_dir=str(cache)),
            None,
            1024,
            log=lambda _: None,
        )
        seconds = time.perf_counter() - start
        print(json.dumps({"bin_gb": round(path.stat().st_size / 1e9, 2), "attempt": attempt,
                          "seconds": round(seconds, 2), "train_tokens": len(data.train[0][1]),
                          "loadavg": os.getloadavg()}), flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.1)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--tokenizer", default="char", help="char (fitted on one block) | gpt2 | tok.json"
    )
    ap.add_argument(
        "--dir", default="/tmp/tinylm_bench", help="scratch directory (not the repository)"
    )
    ap.add_argument("--vs-tiktoken", action="store_true", help="GPT-2 prepare vs tiktoken")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (--vs-tiktoken)")
    ap.add_argument("--read-bin-gb", type=float, default=0, help="time reading a pretokenized .bin")
    args = ap.parse_args()
    scratch = Path(args.dir)
    if args.vs_tiktoken or args.read_bin_gb:
        scratch.mkdir(parents=True, exist_ok=True)
        if args.read_bin_gb:
            read_bin(scratch, args.read_bin_gb)
        if args.vs_tiktoken:
            vs_tiktoken(scratch, args.size_gb, args.rounds, max(args.workers))
        return
    corpus = scratch / f"stories_{args.size_gb:g}gb.txt"
    t = time.perf_counter()
    make_corpus(corpus, int(args.size_gb * 1e9))
    print(
        f"corpus: {corpus} ({corpus.stat().st_size / 1e9:.2f} GB, ready in {time.perf_counter() - t:.0f} s)"
    )
    tokenizer = args.tokenizer
    if (
        tokenizer == "char"
    ):  # the block repeats, so its alphabet is the file's: fit on one story set
        tokenizer = str(
            fit_char_tokenizer(["synthetic-stories"]).save(scratch / "char_tokenizer.json")
        )
    for w in args.workers:
        print(json.dumps(run_prepare(corpus, scratch / "prepared", tokenizer, w)), flush=True)


if __name__ == "__main__":
    main()
