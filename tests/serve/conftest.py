"""Fixtures of the serve tests: small trained runs, and `tinylm serve` in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers import SMALL, run_cli

# Context 64 leaves room for real prompts; the rest is tests/helpers.py's small model.
SERVE_MODEL = [
    *SMALL,
    "model.context_length=64",
    "log.interval=5",
    "eval.interval=10",
    "optim.warmup_steps=5",
]
API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tinylm serve ROOT` on 127.0.0.1 at a free port, in its own process."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root.parent / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "tinylm.cli", "serve", str(root), "--port", str(self.port)]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [*cmd, *args],
                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # Generous: on a loaded shared machine importing torch alone took 50 s.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tinylm serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"tinylm serve did not answer in 180 s:\n{self.log.read_text()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ThreadServer:
    """The same app on a real uvicorn server in a thread of this process: no second start-up
    of torch (seconds; a minute on a loaded machine). `Server` covers the command itself."""

    def __init__(self, root: Path, **settings) -> None:
        import uvicorn

        from tinylm.serve.app import ServeSettings, create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(ServeSettings(root=root, **settings))
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                pytest.fail("uvicorn did not start")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="session")
def serve_root(tmp_path_factory, corpus) -> Path:
    """Two finished runs: `alpha` (30 steps, checkpoints at 15 and 30) and `beta` (10 steps)."""
    root = tmp_path_factory.mktemp("serve") / "runs"
    common = [f"data.train={corpus}", f"out_dir={root}", *SERVE_MODEL]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLM_CACHE", str(root.parent / "cache"))
        assert (
            run_cli(
                "train",
                "tiny",
                "run_name=alpha",
                "train.max_steps=30",
                "checkpoint.interval=15",
                "checkpoint.keep_last=5",
                *common,
            )
            == 0
        )
        assert (
            run_cli("train", "tiny", "run_name=beta", "train.max_steps=10", "train.seed=3", *common)
            == 0
        )
    torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def client(server):
    """An httpx client with the API key, for the test module's own `server` fixture."""
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as c:
        yield c
