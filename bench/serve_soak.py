"""Serve soak: many clients against `tinylm serve` while a training run rotates checkpoints.

A real training run (`tinylm train tiny`, small model, a checkpoint every 20 steps, keep_last=2, niced)
writes and rotates checkpoints under a fresh runs directory; `tinylm serve` (loopback only)
serves it; `--clients` asyncio clients send a bounded mix of requests for `--seconds` (at most
`--max-requests` in all): plain and streamed completions of the run id and of pinned ids taken
from /v1/models (which rotation deletes: a 404 is then the right answer), other spellings of
the same ids, /v1/models, /api/runs, metrics, samples, /health and POST /api/reload. /health's
RSS is sampled every second.

Pass: 0 answers that are neither 2xx nor 4xx (5xx, dropped connections), and RSS flat: the
median of the last fifth of the samples within 10% of the median of the second fifth (the
first fifth is warm-up: models loading).

    .venv/bin/python bench/serve_soak.py --clients 32 --seconds 60 --out notes/serve-soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import SMALL  # noqa: E402  (the tests' small model: a step takes milliseconds)

RUN = [
    *SMALL,
    "model.context_length=64",
    "eval.interval=10",
    "log.interval=5",
    "train.max_steps=1000000",
    "checkpoint.keep_last=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, nice: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = await predicate()
            if value:
                return value
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


class Soak:
    def __init__(self, url: str, run: str, deadline: float, max_requests: int) -> None:
        self.url, self.run, self.deadline, self.left = url, run, deadline, max_requests
        self.codes: Counter = Counter()
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.pinned: list[str] = []
        self.seen: set[str] = set()  # every checkpoint /v1/models listed: rotation's pace

    def spellings(self) -> list[str]:
        ids = [self.run, f"{self.run}/", f"./{self.run}"]
        if self.pinned:
            p = random.choice(self.pinned)
            step = int(p.rsplit("_", 1)[1])
            ids += [p, f"{self.run}//step_{step}", f"{self.run}/./step_{step:08d}"]
        return ids

    async def one(self, client: httpx.AsyncClient) -> None:
        kind = random.choices(
            ["complete", "stream", "models", "runs", "metrics", "samples", "health", "reload"],
            weights=[40, 15, 10, 8, 8, 4, 5, 10],
        )[0]
        body = {
            "model": random.choice(self.spellings()),
            "prompt": random.choice(["", "ANNA:", "The king", "To be"]),
            "max_tokens": random.randint(1, 24),
            "temperature": random.choice([0, 0.8]),
        }
        t0 = time.monotonic()
        if kind == "complete":
            r = await client.post("/v1/completions", json=body)
        elif kind == "stream":
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    await r.aread()
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"error"' in line[:20]:
                        self.errors.append(f"stream error: {line[:200]}")
        elif kind == "models":
            r = await client.get("/v1/models")
            if r.status_code == 200:
                self.pinned = [m["id"] for m in r.json()["data"] if "/" in m["id"]]
                self.seen.update(self.pinned)
        elif kind == "runs":
            r = await client.get("/api/runs")
        elif kind == "metrics":
            r = await client.get(f"/api/runs/{self.run}/metrics")
        elif kind == "samples":
            r = await client.get(f"/api/runs/{self.run}/samples")
        elif kind == "health":
            r = await client.get("/health")
        else:
            r = await client.post("/api/reload", json={"model": self.run})
        self.latencies.append(time.monotonic() - t0)
        self.codes[r.status_code] += 1
        if r.status_code >= 500:
            self.errors.append(f"{kind} {body['model']}: {r.status_code} {r.text[:200]}")

    async def client(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            while time.monotonic() < self.deadline and self.left > 0:
                self.left -= 1
                try:
                    await self.one(client)
                except httpx.TransportError as e:
                    self.codes["transport"] += 1
                    self.errors.append(f"transport: {type(e).__name__}: {e}")


async def sample_rss(url: str, deadline: float, out: list[dict]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            try:
                memory = (await client.get("/health")).json()["memory"]
                out.append({"t": time.time(), **memory})
            except (httpx.TransportError, KeyError, ValueError):
                pass
            await asyncio.sleep(1.0)


async def main_async(args: argparse.Namespace, root: Path) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:

        async def has_checkpoint():
            ids = (await c.get("/v1/models")).json()["data"]
            return any(m["id"] == "soak" for m in ids)

        await wait_for(has_checkpoint, 600, "the run's first checkpoint")
    deadline = time.monotonic() + args.seconds
    soak = Soak(url, "soak", deadline, args.max_requests)
    rss: list[dict] = []
    t0 = time.monotonic()
    await asyncio.gather(
        sample_rss(url, deadline, rss), *(soak.client() for _ in range(args.clients))
    )
    elapsed = time.monotonic() - t0
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        health = (await c.get("/health")).json()
    ckpts = sorted(p.name for p in (root / "soak" / "checkpoints").glob("step_*"))
    values = [r["rss_bytes"] for r in rss]
    fifth = max(1, len(values) // 5)
    early = statistics.median(values[fifth : 2 * fifth] or values[:1])
    late = statistics.median(values[-fifth:])
    bad = sum(n for code, n in soak.codes.items() if code == "transport" or int(code) >= 500)
    lat = sorted(soak.latencies)
    return {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": sum(soak.codes.values()),
        "requests_per_second": round(sum(soak.codes.values()) / elapsed, 1),
        "status_codes": {str(k): v for k, v in sorted(soak.codes.items(), key=str)},
        "non_4xx_errors": bad,
        "errors_sample": soak.errors[:10],
        "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "p95_s": round(lat[int(len(lat) * 0.95)], 3) if lat else None,
        "rss_mib_second_fifth": round(early / 2**20, 1),
        "rss_mib_last_fifth": round(late / 2**20, 1),
        "rss_change": round(late / early - 1, 4),
        "rss_max_mib": round(max(values) / 2**20, 1),
        "threads_first_last": [rss[0]["threads"], rss[-1]["threads"]] if rss else None,
        "models_evicted": health["memory"]["models_evicted"],
        "models_loaded_end": health["memory"]["models_loaded"],
        "checkpoints_at_end": ckpts,
        "checkpoints_seen_in_models": len(soak.seen),
        "pass": bad == 0 and abs(late / early - 1) <= 0.10,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=50_000)
    p.add_argument("--max-models", type=int, default=2)
    p.add_argument("--checkpoint-interval", type=int, default=20, help="training steps")
    p.add_argument(
        "--train-nice",
        type=int,
        default=10,
        help="niceness of the training run (a busy shared machine starves the server otherwise)",
    )
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--out", default="", help="write the figures as JSON here too")
    args = p.parse_args()
    args.port = free_port()
    with tempfile.TemporaryDirectory(prefix="serve-soak-") as tmp:
        root = Path(tmp) / "runs"
        cli = [sys.executable, "-m", "tinylm.cli"]
        train = start(
            [
                *cli,
                "train",
                "tiny",
                "run_name=soak",
                f"out_dir={root}",
                f"data.train={args.data}",
                *RUN,
                f"checkpoint.interval={args.checkpoint_interval}",
            ],
            Path(tmp) / "train.log",
            nice=args.train_nice,
        )
        root.mkdir(parents=True, exist_ok=True)
        serve = start(
            [
                *cli,
                "serve",
                str(root),
                "--port",
                str(args.port),
                "--max-models",
                str(args.max_models),
            ],
            Path(tmp) / "serve.log",
        )
        try:
            result = asyncio.run(main_async(args, root))
        finally:
            stop(serve)
            stop(train)
        log = (Path(tmp) / "serve.log").read_text()
        result["server_log_tracebacks"] = log.count("Traceback")
        if result["server_log_tracebacks"]:
            print(log[-4000:], file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
