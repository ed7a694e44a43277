"""Throughput (MB/s) and peak memory of `tinylm prepare` on a generated multi-gigabyte text file.

    .venv/bin/python bench/bench_prepare.py                      # 2.1 GB, char, 1 and 2 workers
    .venv/bin/python bench/bench_prepare.py --size-gb 0.3 --tokenizer gpt2

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
    while proc.poll() is None:
        try:
            procs = [proc, *proc.children(recursive=True)]
            rss = [p.memory_info().rss for p in procs]
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
        "tokens": sum(s["tokens"] for s in meta["splits"].values()),
    }


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
    args = ap.parse_args()
    scratch = Path(args.dir)
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
