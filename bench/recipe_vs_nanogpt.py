"""Quality at equal compute: tinylm's preset recipe against nanoGPT's README CPU recipe.

    .venv/bin/python bench/recipe_vs_nanogpt.py --nanogpt PATH [--corpus char|plays] [--runs 3]
        [--preset tiny] [--variant NAME=key=value,key=value ...] [--equal-time]
        [--skip-nanogpt] [--out DIR]
    .venv/bin/python bench/recipe_vs_nanogpt.py --nanogpt PATH --shape nano6 --concurrent \
        --minutes 15 --nanogpt-iters N

PATH is a checkout of karpathy/nanoGPT: its own `train.py` runs in a subprocess, in a scratch
directory holding our copy of the data in its format (nothing of nanoGPT is kept here). The
runs alternate (nanoGPT 1, tinylm 1, nanoGPT 2, ...) so that load from other processes on a
shared machine hits both alike; each run's wall time and CPU time (user + system of the child)
are measured, and each final model is scored by the same code on the same text.

- `--corpus char`: Tiny Shakespeare, character level, nanoGPT's split (first 90% train, last
  10% validation; tinylm's `data.val_fraction=0.1` takes the same tail of a single document).
  nanoGPT: `train.py config/train_shakespeare_char.py --device=cpu --compile=False
  --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
  --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0` (its README). Score: bits
  per character over the whole validation text.
- `--corpus plays`: the 42 Shakespeare plays; whole plays held out for validation (every 10th
  work in name order); a BPE tokenizer (`--bpe-vocab`, default 2048) trained by tinylm on the
  training plays only, used by both. Same nanoGPT recipe on those tokens. Score: bits per byte.

`--shape nano6`: nanoGPT's own `config/train_shakespeare_char.py` model and recipe as it is (6
layers, 6 heads, d_model 384, context 256, batch 64, dropout 0.2, lr 1e-3, beta2 0.99) on CPU,
with `--max_iters=N --lr_decay_iters=N` (`--nanogpt-iters`) so that its schedule ends within the
budget (its 5,000 iterations take hours on 2 CPU cores) and its warm-up scaled alike (100 of
5,000 = 2%); one evaluation at the end (`--eval_interval=N --eval_iters=10`: its in-run estimate
only decides which checkpoint it keeps). tinylm runs its `tiny` preset resized to the same
network size (6 layers, 6 heads, d_model 384, context 256) with everything else its own defaults
(batch 16, Muon, precision and compile `auto`).

`--concurrent`: nanoGPT and tinylm run at the same time, one thread each (`OMP_NUM_THREADS=1`,
`train.threads=1`), so that load from other processes on a shared machine falls on both within
the same minutes; tinylm gets `--minutes` (its steps fitted to the time), nanoGPT
`--nanogpt-iters` (pick N so that its run takes about as long: the report prints both wall times,
and tinylm's must not exceed nanoGPT's for a fair comparison).

Variants: `--variant muon=optim.name=muon` adds a tinylm run with those overrides to every round
(`tinylm` = the preset as it is always runs). `--equal-time`: each tinylm run gets the wall time
of the nanoGPT run just before it, less `--setup-seconds` (tinylm's process start, data and model
set-up, final save: measured ~5 s), as `train.max_time_minutes` with `train.fit_steps_to_time`
(its step count fitted so the LR schedule ends in time); without it tinylm runs its preset's steps.

Both scores are computed with `tinylm.eval.evaluate.evaluate_full` (non-overlapping windows of
each model's own context length, every validation token scored once) on the checkpoint each
recipe keeps (nanoGPT: the one with its best in-run val estimate; tinylm: its best).
Time-to-loss: when tinylm's in-run validation first reaches nanoGPT's final score (its eval
records' wall time since the start event, linearly interpolated between evaluations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tinylm.paths import shared_data_dir

NANOGPT_RECIPE = [
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]
# nanoGPT's train_shakespeare_char model as its config has it (--shape nano6): no overrides of
# the network or the batch; the schedule is fitted to the budget by nano6_recipe().
NANO6_TINYLM = [
    "model.n_layer=6",
    "model.n_head=6",
    "model.d_model=384",
    "model.d_ff=null",
    "model.context_length=256",
]
REPO = Path(__file__).resolve().parent.parent


def nano6_recipe(iters: int) -> list[str]:
    """nanoGPT's config/train_shakespeare_char.py on CPU, its schedule fitted to `iters`."""
    return [
        "--device=cpu",
        "--compile=False",
        "--log_interval=1",
        f"--max_iters={iters}",
        f"--lr_decay_iters={iters}",
        f"--warmup_iters={max(1, round(iters * 100 / 5000))}",
        f"--eval_interval={iters}",
        "--eval_iters=10",
    ]


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(
    cmd: list[str], cwd: Path, log_path: Path, env_extra: dict | None = None
) -> tuple[float, float, list[tuple]]:
    """Run `cmd`; returns (wall s, CPU s, [(wall s since start, line), ...])."""
    cpu0, t0 = child_cpu_seconds(), time.perf_counter()
    lines = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))
            log.write(line)
            log.flush()  # a run watched from outside, or killed, keeps its log
        if proc.wait() != 0:
            sys.exit(f"{' '.join(cmd)} failed; see {log_path}")
    return time.perf_counter() - t0, child_cpu_seconds() - cpu0, lines


# ------------------------------------------------------------------------------------ corpora


def char_corpus(work: Path) -> dict:
    """Tiny Shakespeare: nanoGPT's layout (train.bin, val.bin, meta.pkl) and tinylm's spec."""
    path = shared_data_dir() / "tinyshakespeare.txt"
    text = path.read_text()
    split = int(len(text) * 0.9)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = work / "nanogpt" / "data" / "corpus"
    data.mkdir(parents=True, exist_ok=True)
    np.array([stoi[c] for c in text[:split]], dtype=np.uint16).tofile(data / "train.bin")
    np.array([stoi[c] for c in text[split:]], dtype=np.uint16).tofile(data / "val.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    (data / "meta.pkl").write_bytes(pickle.dumps(meta))
    val_ids = np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64)
    return {
        "tinylm": [f"data.train={path}", "data.tokenizer=char", "data.val_fraction=0.1"],
        "val_text": text[split:],
        "nanogpt_val": val_ids,
        "nanogpt_token_bytes": np.ones(len(chars), dtype=np.int32),
        "unit": "bits/char",
    }


def plays_corpus(work: Path, vocab: int) -> dict:
    """The plays: whole works held out, one BPE tokenizer trained on the training works."""
    from tinylm.tokenizer.bpe_train import train_bpe

    src = shared_data_dir() / "shakespeare_plays"
    works = sorted(src.iterdir())
    val_works = works[::10]
    split_dirs = {"train": work / "plays-train", "val": work / "plays-val"}
    for name, d in split_dirs.items():
        d.mkdir(parents=True, exist_ok=True)
        for w in works:
            if (w in val_works) == (name == "val") and not (d / w.name).exists():
                (d / w.name).symlink_to(w)
    train_texts = [w.read_text() for w in works if w not in val_works]
    tok_path = work / f"plays-bpe-{vocab}.json"
    if not tok_path.exists():
        train_works = [w for w in works if w not in val_works]
        result = train_bpe(train_works, vocab_size=vocab, special_tokens=["<|endoftext|>"])
        result.tokenizer().save(tok_path)
    from tinylm.tokenizer import tokenizer_from_file

    tok = tokenizer_from_file(tok_path)
    eot = tok.eot_id

    def stream(texts: list[str]) -> np.ndarray:
        ids: list[int] = []
        for t in texts:
            ids += [*tok.encode(t), eot]
        return np.array(ids, dtype=np.int64)

    data = work / "nanogpt" / "data" / "corpus"
    data.mkdir(parents=True, exist_ok=True)
    val_ids = stream([w.read_text() for w in val_works])
    stream(train_texts).astype(np.uint16).tofile(data / "train.bin")
    val_ids.astype(np.uint16).tofile(data / "val.bin")
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": tok.vocab_size}))
    return {
        "tinylm": [
            f"data.train={split_dirs['train']}",
            f"data.val={split_dirs['val']}",
            f"data.tokenizer={tok_path}",
        ],
        "val_ids": val_ids,
        "nanogpt_val": val_ids,
        "nanogpt_token_bytes": tok.token_bytes(),
        "unit": "bits/byte",
        "val_works": [w.name for w in val_works],
    }


# ------------------------------------------------------------------------------------ scoring


def score(model, ids: np.ndarray, ctx: int, token_bytes: np.ndarray) -> float:
    """Bits per byte of `ids` (every target once, non-overlapping windows of `ctx`)."""
    from tinylm.eval.evaluate import evaluate_full

    r = evaluate_full(model, ids, seq_len=ctx, batch_size=32, device="cpu", token_bytes=token_bytes)
    return r.bits_per_byte


def score_nanogpt(nanogpt: Path, out_dir: Path, corpus: dict) -> float:
    sys.path.insert(0, str(nanogpt))
    try:
        from model import GPT, GPTConfig  # nanoGPT's module, from the user's checkout
    finally:
        sys.path.pop(0)
    ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    return score(
        model,
        corpus["nanogpt_val"],
        ckpt["model_args"]["block_size"],
        corpus["nanogpt_token_bytes"],
    )


def score_tinylm(run_dir: Path, corpus: dict) -> float:
    from tinylm.train.checkpoint import load_model

    model, cfg, tok, _ = load_model(run_dir, which="best")
    ids = corpus.get("val_ids")
    if ids is None:
        ids = np.array(tok.encode(corpus["val_text"]), dtype=np.int64)
    return score(model, ids, cfg.model.context_length, tok.token_bytes())


def tinylm_curve(run_dir: Path) -> list[tuple[float, int, float]]:
    """(seconds since start, step, val bits per byte) of each in-run evaluation."""
    start, out = None, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "start" and start is None:
            start = rec["time"]
        if rec["kind"] == "eval" and "val/bits_per_byte" in rec:
            out.append((rec["time"] - start, rec["step"], rec["val/bits_per_byte"]))
    return out


def time_to(curve: list[tuple[float, int, float]], target: float) -> float | None:
    """Interpolated wall time at which the curve first reaches `target` (None: never)."""
    prev = (0.0, 0, math.inf)
    for t, step, v in curve:
        if v <= target:
            if not math.isfinite(prev[2]):
                return t
            frac = (prev[2] - target) / (prev[2] - v)
            return prev[0] + frac * (t - prev[0])
        prev = (t, step, v)
    return None


# ------------------------------------------------------------------------------------ main


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=key=value[,key=value]")
    return name, overrides.split(",")


def run_nanogpt(
    i: int,
    work: Path,
    ng_dir: Path,
    nanogpt: Path,
    corpus: dict,
    recipe: list[str] = NANOGPT_RECIPE,
    env_extra: dict | None = None,
) -> dict:
    out = work / f"nanogpt-out-{i}"
    # (train.py seeds with a constant 1337 and has no seed option: its runs on CPU give the same
    # model; repeating them measures its time.)
    wall, cpu, _ = run_timed(
        [sys.executable, "train.py", "config/train_shakespeare_char.py", *recipe,
         "--dataset=corpus", f"--out_dir={out}"],
        ng_dir,
        work / f"nanogpt-{i}.log",
        env_extra,
    )  # fmt: skip
    s = score_nanogpt(nanogpt, out, corpus)
    print(
        f"nanoGPT run {i}: {s:.4f} {corpus['unit']}, {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True
    )
    return {"wall": wall, "cpu": cpu, "score": s}


def run_tinylm(
    i: int, label: str, work: Path, preset: str, corpus: dict, overrides: list[str]
) -> dict:
    run_dir = work / f"{label}-{i}"
    cmd = [
        str(REPO / ".venv" / "bin" / "tinylm"),
        "train",
        preset,
        *corpus["tinylm"],
        f"run_name={run_dir.name}",
        f"out_dir={work}",
        f"train.seed={1337 + i}",
        "log.progress=false",
        "log.tensorboard=false",
        f"data.cache_dir={work / 'cache'}",
        *overrides,
    ]
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    wall, cpu, _ = run_timed(cmd, REPO, work / f"{label}-{i}.log")
    s = score_tinylm(run_dir, corpus)
    curve = tinylm_curve(run_dir)
    steps = curve[-1][1] if curve else 0
    print(f"{label} run {i}: {s:.4f} {corpus['unit']}, {wall:.0f} s wall, {cpu:.0f} s CPU, "
          f"{steps} steps; curve {[(round(t), st, round(v, 3)) for t, st, v in curve]}",
          flush=True)  # fmt: skip
    return {"wall": wall, "cpu": cpu, "score": s, "steps": steps, "curve": curve}


def run_side_by_side(
    i: int,
    work: Path,
    ng_dir: Path,
    nanogpt: Path,
    corpus: dict,
    preset: str,
    recipe: list[str],
    variants: list[tuple[str, list[str]]],
    timed: list[str],
    results: dict[str, list[dict]],
) -> None:
    """Round `i` of --concurrent: nanoGPT and each tinylm variant at once, one thread each."""
    from concurrent.futures import ThreadPoolExecutor

    one = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with ThreadPoolExecutor(len(variants) + 1) as pool:
        ng = pool.submit(run_nanogpt, i, work, ng_dir, nanogpt, corpus, recipe, one)
        tl = {
            label: pool.submit(
                run_tinylm, i, label, work, preset, corpus, [*o, *timed, "train.threads=1"]
            )
            for label, o in variants
        }
        results["nanoGPT"].append(ng.result())
        for label, future in tl.items():
            results[label].append(future.result())
    walls = ", ".join(f"{k} {v[-1]['wall']:.0f} s" for k, v in results.items())
    print(f"round {i} wall times (tinylm's must not exceed nanoGPT's): {walls}", flush=True)


def report(results: dict[str, list[dict]], unit: str) -> None:
    print(f"\n{'recipe':<12} {unit + ' (median)':>18} {'runs':>28} {'wall s':>8} {'CPU s':>8}")
    for name, rs in results.items():
        if not rs:
            continue
        scores = [r["score"] for r in rs]
        print(
            f"{name:<12} {statistics.median(scores):>18.4f} "
            f"{', '.join(f'{x:.4f}' for x in scores):>28} "
            f"{statistics.median(r['wall'] for r in rs):>8.0f} "
            f"{statistics.median(r['cpu'] for r in rs):>8.0f}"
        )
    if not results["nanoGPT"]:
        return
    ng = statistics.median(r["score"] for r in results["nanoGPT"])
    ng_wall = statistics.median(r["wall"] for r in results["nanoGPT"])
    for label, rs in results.items():
        if label == "nanoGPT":
            continue
        tl = statistics.median(r["score"] for r in rs)
        print(f"\n{label} / nanoGPT {unit}: {tl / ng:.3f} ({100 * (1 - tl / ng):.1f}% lower)")
        times = [time_to(r["curve"], ng) for r in rs]
        got = [t for t in times if t is not None]
        if got:
            print(
                f"time to nanoGPT's final {ng:.4f}: {label} {statistics.median(got):.0f} s "
                f"(runs: {[t and round(t) for t in times]}) vs nanoGPT {ng_wall:.0f} s -> "
                f"ratio {statistics.median(got) / ng_wall:.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True)
    parser.add_argument("--corpus", choices=["char", "plays"], default="char")
    parser.add_argument("--bpe-vocab", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[])
    parser.add_argument("--equal-time", action="store_true")
    parser.add_argument("--setup-seconds", type=float, default=5.0)
    parser.add_argument(
        "--minutes", type=float, default=0.0, help="tinylm's time with --skip-nanogpt"
    )
    parser.add_argument("--skip-nanogpt", action="store_true", help="tinylm runs only")
    parser.add_argument("--out", type=Path, default=Path("/tmp/recipe-vs-nanogpt"))
    parser.add_argument("--shape", choices=["nano4", "nano6"], default="nano4")
    parser.add_argument("--nanogpt-iters", type=int, default=60, help="nanoGPT's with nano6")
    parser.add_argument("--concurrent", action="store_true")
    args = parser.parse_args()
    if args.concurrent and not args.minutes:
        parser.error("--concurrent needs --minutes (tinylm's time)")
    work = args.out / args.corpus / args.shape
    work.mkdir(parents=True, exist_ok=True)
    nanogpt = args.nanogpt.resolve()
    corpus = char_corpus(work) if args.corpus == "char" else plays_corpus(work, args.bpe_vocab)
    ng_dir = work / "nanogpt"
    for name in ("train.py", "model.py", "configurator.py", "config"):
        link = ng_dir / name
        if not link.exists():
            link.symlink_to(nanogpt / name)
    print(f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    base = NANO6_TINYLM if args.shape == "nano6" else []
    variants = [("tinylm", base), *((n, [*base, *o]) for n, o in args.variant)]
    results: dict[str, list[dict]] = {"nanoGPT": [], **{name: [] for name, _ in variants}}
    if args.concurrent:
        recipe = nano6_recipe(args.nanogpt_iters) if args.shape == "nano6" else NANOGPT_RECIPE
        timed = [f"train.max_time_minutes={args.minutes:.4f}", "train.fit_steps_to_time=true"]
        for i in range(args.runs):
            run_side_by_side(
                i, work, ng_dir, nanogpt, corpus, args.preset, recipe, variants, timed, results
            )
        report(results, corpus["unit"])
        (work / "results.json").write_text(json.dumps(results, indent=1))
        print(f"load average at end {os.getloadavg()[0]:.2f}")
        return
    for i in range(args.runs):
        minutes = args.minutes
        if not args.skip_nanogpt:
            ng = run_nanogpt(i, work, ng_dir, nanogpt, corpus)
            results["nanoGPT"].append(ng)
            if args.equal_time:
                minutes = (ng["wall"] - args.setup_seconds) / 60
        timed = [f"train.max_time_minutes={minutes:.4f}", "train.fit_steps_to_time=true"]
        for label, overrides in variants:
            extra = [*overrides, *timed] if minutes else overrides
            results[label].append(run_tinylm(i, label, work, args.preset, corpus, extra))
        # the order of the tinylm variants rotates, so none always runs right after nanoGPT
        variants = variants[1:] + variants[:1]
    report(results, corpus["unit"])
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
