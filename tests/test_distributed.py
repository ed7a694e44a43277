"""Distributed training on the real torch.distributed stack: torchrun, Gloo, DDP and FSDP2 on CPU.

Each test launches `torchrun --standalone --nproc_per_node=2 -m tinylm.cli train ...` (the venv's
torchrun, as `python -m torch.distributed.run`) with a wall-clock timeout, so a deadlock between
ranks fails the test instead of hanging CI.

Loss parity: with `data.sampling=sequential`, global row `g` of a step is row `g // world_size` of
rank `g % world_size`, so 2 ranks x 8 rows read exactly the 16 rows a single process reads with
batch 16, and DDP's averaged gradient is that process's gradient. The two runs then differ only by
float32 summation order (two half-batch means averaged by the all-reduce vs one mean): observed
relative differences are ~1e-7 over nine steps, so PARITY_RTOL=1e-5 leaves room for other BLAS
builds while still failing on any real difference (a wrong row, a missed all-reduce). The same run
with 8 rows in one process (rank 0's rows alone) must differ by far more: rank 1 read other data.
The schedule is fixed (optim.decay_steps) so that a resume with a larger max_steps keeps it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed
from helpers import SMALL, read_metrics, run_cli

from tinylm.train import checkpoint

if not torch.distributed.is_available():  # pragma: no cover (every CPU build of torch has it)
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
PARITY_RTOL = 1e-5  # see the module docstring; observed differences are ~1e-7
TIMEOUT = 120  # seconds for one torchrun launch (they take ~10-15 s on 2 cores)


def train_args(tmp_path: Path, corpus: Path, run_name: str, *extra: str) -> list[str]:
    return [
        f"data.train={corpus}", f"out_dir={tmp_path}", f"run_name={run_name}", *SMALL,
        "data.sampling=sequential", "data.prefetch=0", "log.interval=1", "eval.interval=3",
        "checkpoint.interval=3", "eval.samples=1", "optim.warmup_steps=2", "optim.decay_steps=20",
        *extra,
    ]  # fmt: skip


def torchrun_cmd(*args: object) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "tinylm.cli", "train", *map(str, args),
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(tmp_path: Path, *args: object) -> str:
    """`tinylm train *args` under torchrun, to completion (`launch`)."""
    return launch(torchrun_cmd(*args))


def launch(cmd: list[str]) -> str:
    """Run a torchrun command to completion; returns its output, failing the test on a non-zero
    exit or after TIMEOUT seconds.

    On a timeout the ranks are sent SIGUSR1 first (tinylm's train prints every thread's stack
    on it), so the failure shows where each rank was waiting."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        ranks = psutil.Process(proc.pid).children(recursive=True)
        for sig in (signal.SIGUSR1, signal.SIGKILL):
            for rank in ranks:
                with contextlib.suppress(psutil.Error):
                    rank.send_signal(sig)
            time.sleep(3)
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {TIMEOUT} s:\n{output}") from None
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    return output


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run, "train")]


def assert_written_once(run: Path, launches: int) -> None:
    """Only rank 0 writes: one start and one end event per launch, each step logged once."""
    events = read_metrics(run, "event")
    assert sum(e.get("event") == "start" for e in events) == launches
    assert sum(e.get("event") in ("done", "stopped") for e in events) == launches
    steps = [r["step"] for r in read_metrics(run, "train")]
    assert steps == sorted(set(steps))
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.yaml", "data_check.json", "metrics.jsonl", "tokenizer.json",
    ]  # fmt: skip
    assert not list((run / "checkpoints").glob(".*"))  # no stray temporary directories


def assert_close(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=PARITY_RTOL), f"step {step}: {a} vs {b}"


def check_generate(run: Path, capsys) -> None:
    """The checkpoint is a full one (even from sharded FSDP): it loads for inference alone."""
    capsys.readouterr()
    assert run_cli("generate", run, "--prompt", "ANNA:", "--max-new-tokens", "8") == 0
    assert capsys.readouterr().out.startswith("ANNA:")


def one_process(
    tmp_path: Path, corpus: Path, name: str, steps: int, batch: int, extra: list[str] = ()
) -> list:
    args = train_args(
        tmp_path, corpus, name, f"train.max_steps={steps}", f"train.batch_size={batch}", *extra
    )
    assert run_cli("train", "tiny", *args) == 0
    return losses(tmp_path / name)


def test_leaving_the_group_does_not_deadlock_gloo_workers():
    """`teardown` then freeing the DDP model, 10 times over: before `settle_gloo_workers` a rank
    hung in the first rounds (its main thread joining a Gloo worker that waited for the GIL)."""
    out = launch([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "tests" / "teardown_worker.py"), "10",
    ])  # fmt: skip
    assert "rank 0: 10 rounds" in out and "rank 1: 10 rounds" in out


def test_ddp_trains_checkpoints_resumes_and_matches_one_process(tmp_path, corpus, capsys):
    run = tmp_path / "ddp"
    out = torchrun(tmp_path, "tiny", *train_args(tmp_path, corpus, "ddp", "train.max_steps=6"))
    assert "step      6 | val loss" in out and "--- sample 0 at step 6 ---" in out
    assert out.count("run directory:") == 1  # rank 1 reports nothing
    assert (run / "checkpoints" / "step_00000006").is_dir()
    torchrun(tmp_path, "--resume", run, "train.max_steps=9")
    assert_written_once(run, launches=2)
    assert [r["step"] for r in read_metrics(run, "eval")] == [3, 6, 9]
    assert checkpoint.find_latest(run / "checkpoints").name == "step_00000009"
    check_generate(run, capsys)

    # Same effective batch in one process: the same rows, so the same losses (module docstring);
    # rank 0's rows alone give other losses, so rank 1 read different data.
    two_ranks = losses(run)
    assert_close(two_ranks, one_process(tmp_path, corpus, "one16", 9, batch=16))
    one8 = one_process(tmp_path, corpus, "one8", 9, batch=8)
    assert (
        max(abs(a - b) / b for (_, a), (_, b) in zip(two_ranks, one8, strict=True))
        > 100 * PARITY_RTOL
    )


def test_fsdp_sigterm_to_torchrun_stops_every_rank_then_resumes(tmp_path, corpus, capsys):
    """SIGTERM to the torchrun parent mid-run: every rank stops, one checkpoint, then a resume."""
    run = tmp_path / "fsdp"
    args = train_args(tmp_path, corpus, "fsdp", "train.max_steps=100000", "train.distributed=fsdp")
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            torchrun_cmd("tiny", *args), cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + TIMEOUT
            while not (run / "metrics.jsonl").is_file() or not read_metrics(run, "train"):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "no training step logged"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = log_path.read_text()
    # torchrun forwards the signal to every rank, waits for them, then re-raises it itself: its
    # own exit status is 1 (SignalException) whatever the ranks did. The ranks' part: each said
    # it received SIGTERM, none had to be killed after the shutdown timeout, none raised.
    assert code == 1 and "SignalException" in output, output
    assert output.count("SIGTERM received") == 2, output
    assert "Unable to shutdown process" not in output, output
    assert "[rank" not in output, output  # torchrun prefixes a rank's traceback with [rankN]
    stopped = [e for e in read_metrics(run, "event") if e.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "signal SIGTERM", output
    step = stopped[0]["step"]
    latest = checkpoint.find_latest(run / "checkpoints")
    assert latest is not None and checkpoint.read_meta(latest)["step"] == step

    torchrun(tmp_path, "--resume", run, f"train.max_steps={step + 3}")
    assert_written_once(run, launches=2)
    assert read_metrics(run, "eval")[-1]["step"] == step + 3
    check_generate(run, capsys)
    assert_close(losses(run), one_process(tmp_path, corpus, "one16", step + 3, batch=16))


MUON_RTOL = 2e-4  # Muon's Newton-Schulz runs in bfloat16: see the test's docstring


def test_muon_under_fsdp_matches_one_process_and_resumes(tmp_path, corpus):
    """Muon + AdamW under FSDP2, where each rank gathers the full matrices for Newton-Schulz
    (tinylm/train/muon.py): the same losses as one process at the same effective batch, through
    a checkpoint (the optimizer pair gathered by torch.distributed.checkpoint) and a resume.

    The ranks' gradients agree with one process's to float32 rounding (~1e-7) and the runs drift
    apart slowly through Newton-Schulz: with torch's bfloat16 orthogonalization the observed
    differences were 0, 1e-6, 8e-6, 1e-5, 2.2e-5 at steps 2-6; on CPU it now runs in float32
    (muon.py), which rounds less. Hence 2e-4. Orthogonalizing each rank's shard alone (the
    mistake this guards against) changes the update itself (by 69% of its norm for a random
    384x128 gradient split in two), far outside that. DDP needs no test of its own here: its
    parameters are plain tensors (torch's Muon as in one process) and its checkpoints go through
    the same state-dict helpers.
    """
    run = tmp_path / "fsdp"
    muon = ["optim.name=muon", "train.distributed=fsdp"]
    torchrun(tmp_path, "tiny", *train_args(tmp_path, corpus, "fsdp", "train.max_steps=3", *muon))
    torchrun(tmp_path, "--resume", run, "train.max_steps=6")
    assert_written_once(run, launches=2)
    got = losses(run)
    want = one_process(tmp_path, corpus, "one16", 6, batch=16, extra=["optim.name=muon"])
    for (step, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=MUON_RTOL), f"step {step}: {a} vs {b}"
    assert got[-1][1] < got[0][1]
