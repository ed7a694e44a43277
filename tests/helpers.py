"""Helpers shared by the end-to-end tests: small-model overrides, CLI/metrics shortcuts, and a
`tinylm` command in a subprocess (for signals, kills and concurrent runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tinylm.cli import main

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a step takes milliseconds on one core.
SMALL = [
    "model.context_length=32",
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "train.batch_size=8",
    "eval.max_batches=2",
    "eval.sample_tokens=16",
    "log.tensorboard=false",
    "log.progress=false",
    "data.num_workers=1",
]


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


def train_two_steps(root: Path, corpus: Path) -> Path:
    """`root/r`: a two-step run of the small model, with its own cache under `root` (for
    module-scoped fixtures: the autouse cache fixture is function-scoped)."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLM_CACHE", str(root / "cache"))
        code = run_cli(
            "train", "tiny", *SMALL, f"data.train={corpus}", f"out_dir={root}", "run_name=r",
            "train.max_steps=2", "eval.interval=0", "eval.samples=0",
        )  # fmt: skip
    assert code == 0
    return root / "r"


def read_metrics(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def full_and_split_losses(tmp_path: Path, common: list[str], steps: int) -> tuple[list, list]:
    """(step, loss) of each train record of two runs of the tiny preset with `common`: `steps`
    in one go (`full`), and half of them, then a resume to `steps` (`split`)."""
    assert run_cli("train", "tiny", "run_name=full", f"train.max_steps={steps}", *common) == 0
    assert run_cli("train", "tiny", "run_name=split", f"train.max_steps={steps // 2}", *common) == 0
    assert run_cli("train", "--resume", tmp_path / "split", f"train.max_steps={steps}") == 0
    return tuple(
        [(r["step"], r["loss"]) for r in read_metrics(tmp_path / name, "train")]
        for name in ("full", "split")
    )


def records(run: Path, kind: str) -> list[dict]:
    """metrics.jsonl records of `kind`, tolerating a line being written right now."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == kind:
            out.append(record)
    return out


def trained_to(run: Path, step: int) -> Callable[[], bool]:
    return lambda: any(r["step"] >= step for r in records(run, "train"))


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class CliProcess:
    """`tinylm ARGS...` in a subprocess, with its output in a file (no pipe to fill up).

    `new_session=True` puts it in its own process group, so a test can signal the group as a
    terminal's Ctrl+C does. Output is unbuffered, so a test can wait for a line.
    """

    def __init__(
        self,
        tmp_path: Path,
        *args: object,
        env: dict[str, str] | None = None,
        new_session: bool = False,
        prefix: list[str] | None = None,
    ) -> None:
        self.log_path = tmp_path / f"proc-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in wait())
        self.proc = subprocess.Popen(
            [*(prefix or [sys.executable, "-m", "tinylm.cli"]), *map(str, args)],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=new_session,
            # As from a terminal: a shell without job control starts background commands with
            # SIGINT ignored, and Python then never turns Ctrl+C into KeyboardInterrupt.
            preexec_fn=_default_sigint,
        )
        self.pid = self.proc.pid

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"exited ({self.proc.returncode}) before {what}:\n{self.output}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output}")
            time.sleep(0.02)

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Exit status within `timeout` seconds (the process is killed and the test fails if not)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"did not exit within {timeout} s:\n{self.output}") from None
        finally:
            self._log.close()
        return code

    @property
    def output(self) -> str:
        return self.log_path.read_text()


def forge_nan(ckpt: Path) -> None:
    """Put NaN into a checkpoint's first weight and re-hash it (a consistent forgery)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from tinylm.train import checkpoint

    weights = load_file(ckpt / checkpoint.MODEL_FILE)
    name = sorted(weights)[0]
    weights[name].view(-1)[:3] = float("nan")
    save_file(weights, ckpt / checkpoint.MODEL_FILE)
    meta = json.loads((ckpt / checkpoint.META_FILE).read_text())
    for file in meta["files"]:
        data = (ckpt / file).read_bytes()
        meta["files"][file] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / checkpoint.META_FILE).write_text(json.dumps(meta))
