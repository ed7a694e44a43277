"""BPE training speed, ours vs Hugging Face `tokenizers`, side by side in one run.

    .venv/bin/python bench/bench_bpe.py            # corpus.en, the 42 plays, and a ~100 MB corpus
    .venv/bin/python bench/bench_bpe.py --quick    # skip the 100 MB corpus

Every measurement runs in a fresh subprocess (so peak RSS is its own), alternating ours and HF,
`--repeats` times; the table shows the fastest run and the median. Figures go in notes/tokenizer.md.
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

REPO = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"

# One measurement, run as `python -c CHILD '<json args>'`; prints one JSON line.
CHILD = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
if args["impl"] == "hf":
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    base = rss_mb()
    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=args["vocab"], special_tokens=[args["eot"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(args["files"], trainer)
    out = {"total_s": time.perf_counter() - t0, "vocab": tok.get_vocab_size()}
else:
    from tinylm.tokenizer.bpe_train import train_bpe
    import tinylm.tokenizer._bpe_native, regex, tqdm  # imports outside the timed region
    base = rss_mb()
    t0 = time.perf_counter()
    r = train_bpe(args["files"], args["vocab"], [args["eot"]], num_workers=args["workers"],
                  native=args["impl"] == "ours")
    out = dict(r.timings, vocab=len(r.vocab), words=r.num_words, engine=r.engine)
    out["total_s"] = time.perf_counter() - t0
self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
out.update(rss_growth_mb=self_peak - base, worker_peak_mb=child_peak)
print(json.dumps(out))
"""


def measure(impl: str, files: list[str], vocab: int, workers: int) -> dict:
    args = {"impl": impl, "files": files, "vocab": vocab, "eot": EOT, "workers": workers}
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers))  # HF's thread pool: same cores as ours
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(
    name: str, files: list[str], vocab: int, workers: int, repeats: int, impls: list[str]
) -> None:
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(repeats):
        for impl in impls:
            runs[impl].append(measure(impl, files, vocab, workers))
    size = sum(os.path.getsize(f) for f in files)
    print(
        f"\n## {name}: {len(files)} file(s), {size / 1e6:.1f} MB, vocab {vocab}, {workers} worker(s)"
    )
    print(
        "| impl | best s | median s | pre-tokenize s | merges s | RSS growth MB | worker peak MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for impl, rs in runs.items():
        best = min(rs, key=lambda r: r["total_s"])
        med = statistics.median(r["total_s"] for r in rs)
        pre = f"{best['pretokenize_s']:.3f}" if "pretokenize_s" in best else "-"
        mer = f"{best['merge_s']:.3f}" if "merge_s" in best else "-"
        print(
            f"| {impl} | {best['total_s']:.3f} | {med:.3f} | {pre} | {mer} | "
            f"{best['rss_growth_mb']:.0f} | {best['worker_peak_mb']:.0f} |"
        )
    if "hf" in runs and "ours" in runs:
        ours = min(r["total_s"] for r in runs["ours"])
        hf = min(r["total_s"] for r in runs["hf"])
        print(f"ours / hf (best): {ours / hf:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="skip the ~100 MB corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tinylm.paths import shared_data_dir

    data = shared_data_dir()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    compare(
        "corpus.en",
        [str(data / "corpus.en")],
        500,
        args.workers,
        args.repeats,
        ["ours", "python", "hf"],
    )
    plays = sorted(str(p) for p in (data / "shakespeare_plays").glob("*.txt"))
    compare("shakespeare_plays", plays, 10_000, args.workers, args.repeats, ["ours", "hf"])
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            big = Path(tmp) / "plays_x20.txt"
            with open(big, "w", encoding="utf-8") as out:
                for _ in range(20):  # each play is one document, as in the 5 MB run
                    for p in plays:
                        out.write(Path(p).read_text(encoding="utf-8"))
                        out.write(EOT)
            compare("plays x20", [str(big)], 10_000, args.workers, 1, ["ours", "hf"])
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
