"""`tinylm serve` throughput and latency at 1, 4 and 16 concurrent clients.

    .venv/bin/python bench/bench_serve.py [--run RUN_DIR] [--rounds 3] [--requests 48]

Without --run, trains the `tiny` preset (0.8M parameters, context 128, synthetic stories) for 30
steps into bench/out/serve-runs (speed does not depend on how well it is trained). Starts
`tinylm serve` on 127.0.0.1 in a subprocess; each client sends requests one after another
(prompt "Once upon a time", max_tokens 64, temperature 0.8, top-k 50, its own seed) until the
level's `--requests` are done. Levels alternate within each round (1, 4, 16, 1, 4, 16, ...);
the median round per level is reported: requests/s, completion tokens/s, p50/p99 latency. The
reference is the single-request rate of `tinylm.generate` (what `tinylm generate` runs) on the
same checkpoint in this process, alternated with the server rounds. Both use `--threads` torch
threads (default 1: a tiny model gains nothing from more, and on a shared machine spinning
threads make it much slower).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from tinylm.generate import generate
from tinylm.train.checkpoint import load_model

PROMPT = "Once upon a time"
MAX_TOKENS = 64
LEVELS = (1, 4, 16)


def ensure_run(run: str | None) -> Path:
    if run:
        return Path(run)
    root = Path(__file__).parent / "out" / "serve-runs"
    if not (root / "tiny" / "checkpoints").is_dir():
        subprocess.run(
            [sys.executable, "-m", "tinylm.cli", "train", "tiny", "run_name=tiny",
             f"out_dir={root}", "train.max_steps=30", "log.progress=false",
             "log.tensorboard=false", "eval.interval=30"],
            check=True,
        )  # fmt: skip
    return root / "tiny"


def start_server(run: Path, port: int, threads: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinylm.cli", "serve", str(run), "--port", str(port),
         "--threads", str(threads)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(1500):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def level(url: str, model: str, clients: int, requests: int) -> dict[str, float]:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                        "temperature": 0.8, "top_k": 50, "seed": i}  # fmt: skip
                t0 = time.perf_counter()
                r = c.post("/v1/completions", json=body)
                dt = time.perf_counter() - t0
                r.raise_for_status()
                with lock:
                    latencies.append(dt)
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "req/s": requests / wall,
        "tok/s": tokens[0] / wall,
        "p50 ms": 1000 * latencies[len(latencies) // 2],
        "p99 ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def direct(run: Path, requests: int) -> float:
    """Tokens/s of one-at-a-time `generate` calls (the `tinylm generate` path)."""
    model, _, tok, _ = load_model(run, "latest")
    ids = tok.encode(PROMPT)
    n, t0 = 0, time.perf_counter()
    for i in range(requests):
        out = generate(model, ids, max_new_tokens=MAX_TOKENS, temperature=0.8, top_k=50,
                       eot_id=tok.eot_id, seed=i)  # fmt: skip
        n += len(out)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and direct")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = ensure_run(args.run)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, {args.threads} torch threads, "
        f"load average at start {os.getloadavg()[0]:.2f}; run {run}"
    )
    proc = start_server(run, args.port, args.threads)
    url = f"http://127.0.0.1:{args.port}"
    results: dict[str, list[dict[str, float]]] = {}
    try:
        level(url, run.name, 1, 2)  # load the model
        for _ in range(args.rounds):
            for clients in LEVELS:
                results.setdefault(f"serve, {clients:>2} clients", []).append(
                    level(url, run.name, clients, args.requests)
                )
            rate = direct(run, max(4, args.requests // 4))
            results.setdefault("generate(), 1 at a time", []).append({"tok/s": rate})
    finally:
        proc.terminate()
        proc.wait(10)
    base = statistics.median(r["tok/s"] for r in results["generate(), 1 at a time"])
    print(
        f"\n{'case':<26} {'req/s':>7} {'tok/s':>8} {'x generate':>10} {'p50 ms':>8} {'p99 ms':>8}"
    )
    for name, rounds in results.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        cells = [f"{med[k]:.1f}" if k in med else "-" for k in ("req/s", "tok/s")]
        lat = [f"{med[k]:.0f}" if k in med else "-" for k in ("p50 ms", "p99 ms")]
        print(
            f"{name:<26} {cells[0]:>7} {cells[1]:>8} {med['tok/s'] / base:>10.2f} {lat[0]:>8} {lat[1]:>8}"
        )
    print(
        f"(medians of {args.rounds} rounds, {args.requests} requests of {MAX_TOKENS} tokens per level)"
    )


if __name__ == "__main__":
    main()
