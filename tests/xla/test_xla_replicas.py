"""Two XLA replicas in one process (`CPU_NUM_DEVICES=2` on XLA's CPU device; train/xla_replicas.py):
the same losses as one CPU process at the same global batch, Ctrl+C stops both cleanly with a
checkpoint, the stopped run resumes on the replicas, and only the master ordinal writes.

Loss parity as in tests/test_distributed.py: with `data.sampling=sequential`, 2 replicas x 4
rows read the 8 rows one process reads at batch 8, and the all-reduced gradient is that
process's gradient up to float32 summation order (measured: losses within 7.2e-7, val losses
within 1.2e-7). A replica count other than 2, or gradients not averaged, reads or steps on
other data and misses the tolerance by far. The replica runs are subprocesses: the device count
is fixed when the XLA runtime starts, and this test process started it with one device.
"""

from __future__ import annotations

import signal
import warnings

import pytest
from helpers import SMALL, CliProcess, read_metrics, run_cli, trained_to

pytest.importorskip("torch_xla", reason="torch_xla is not installed: run in .venv-xla (.ci/run)")

STEPS = 20
TOLERANCE = 1e-4
REPLICAS = {"CPU_NUM_DEVICES": "2"}


def _common(tmp_path, corpus) -> list[str]:
    return [
        f"data.train={corpus}", f"out_dir={tmp_path}", f"train.max_steps={STEPS}", "optim.name=adamw",
        "data.sampling=sequential", "log.interval=1", "eval.interval=10", "checkpoint.interval=10",
        "checkpoint.keep_last=5", "eval.samples=1", "train.compile=false", *SMALL,
    ]  # fmt: skip


def _by_step(run, kind="train", key="loss") -> dict[int, float]:
    records = read_metrics(run, kind)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicate {kind} records (a replica wrote): {steps}"
    return {r["step"]: r[key] for r in records}


def _assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= TOLERANCE, (worst, got, want)


def _resume(tmp_path, run) -> CliProcess:
    """`tinylm train --resume RUN` on the two replicas, once more if it died by a signal.

    Why the second try: CI saw one resume die of SIGSEGV inside the native runtime right after
    set-up (its output ended at "start at step 4"), which ~240 resumes here did not reproduce.
    Running the same resume again is what a user does after a crash, and what tinylm's exact
    resume makes safe: metrics past the checkpoint are truncated, so the assertions below hold
    the retried run to the same losses. The crash is reported as a warning, with the stacks
    faulthandler printed; a second crash, or any other failure, fails the test.
    """
    resumed = CliProcess(tmp_path, "train", "--resume", run, env=REPLICAS)
    code = resumed.wait(timeout=600)
    if code < 0:  # killed by a signal: a native crash, not a Python error
        warnings.warn(
            f"two-replica resume died of signal {-code}; retrying once:\n{resumed.output[-6000:]}",
            stacklevel=1,
        )
        resumed = CliProcess(tmp_path, "train", "--resume", run, env=REPLICAS)
        code = resumed.wait(timeout=600)
    assert code == 0, resumed.output
    return resumed


def test_two_replicas_match_cpu_stop_on_ctrl_c_and_resume(tmp_path, corpus):
    common = _common(tmp_path, corpus)
    args = [*common, "train.batch_size=4"]  # per replica: a global batch of 8
    assert run_cli("train", "tiny", "run_name=cpu", "train.device=cpu", *common) == 0

    run = tmp_path / "rep"
    proc = CliProcess(
        tmp_path, "train", "tiny", "run_name=rep", "train.device=xla", *args,
        env=REPLICAS, new_session=True,
    )  # fmt: skip
    proc.wait_until(trained_to(run, 3), "step 3", timeout=600)
    proc.send(signal.SIGINT)  # to the process: its main thread stops both replicas
    assert proc.wait(timeout=300) == 0, proc.output
    out = proc.output
    assert out.count("xla replicas: 2") == 1 and out.count("device: xla (CPU") == 1, out
    assert out.count("SIGINT received") == 1 and "--resume" in out, out
    stopped = [r for r in read_metrics(run, "event") if r["event"] == "stopped"]
    assert len(stopped) == 1, stopped
    step = stopped[0]["step"]
    assert step < STEPS and (run / "checkpoints" / f"step_{step:08d}" / "meta.json").is_file()

    resumed = _resume(tmp_path, run)
    cpu = tmp_path / "cpu"
    _assert_close(_by_step(run), _by_step(cpu))
    _assert_close(_by_step(run, key="grad_norm"), _by_step(cpu, key="grad_norm"))
    _assert_close(_by_step(run, "eval", "val/loss"), _by_step(cpu, "eval", "val/loss"))
    # The master alone logs: one start per session, one sample per evaluation.
    starts = [r for r in read_metrics(run, "event") if r["event"] == "start"]
    assert len(starts) == 2, starts
    assert resumed.output.count(f"--- sample 0 at step {STEPS} ---") == 1, resumed.output
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert saved == sorted({f"step_{s:08d}" for s in (10, step, STEPS) if s <= STEPS}), saved
