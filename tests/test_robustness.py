"""Runs that survive anything: signals at every stage, SIGKILL chaos, non-finite losses, rotation,
early stopping and the train/val gap warning.

Signals are sent to a real `tinylm train` subprocess, at a moment picked by watching what it
writes (metrics.jsonl, a checkpoint's temporary directory); resumes run in-process to save the
interpreter start-up.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import SMALL, CliProcess, read_metrics, records, run_cli, trained_to

from tinylm.config import load_config
from tinylm.train import checkpoint
from tinylm.train.trainer import Trainer


class TrainProcess(CliProcess):
    """`tinylm train ...` in a subprocess."""

    def __init__(self, tmp_path: Path, *args: object, env: dict[str, str] | None = None) -> None:
        super().__init__(tmp_path, "train", *args, env=env)


def assert_loadable(path: Path) -> None:
    loaded = checkpoint.load_checkpoint(path)
    state = loaded.train_state()
    assert state["loop"]["step"] == loaded.meta["step"]
    assert all(torch.isfinite(t).all() for t in loaded.model_state.values())


def steps_of(run: Path) -> list[str]:
    return [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")]


def common(tmp_path: Path, corpus: Path, *extra: str) -> list[str]:
    return [f"data.train={corpus}", f"out_dir={tmp_path}", "run_name=r", *SMALL, *extra]


# ------------------------------------------------------------------------------ signals


def test_sigint_during_a_step_stops_checkpoints_and_resumes(tmp_path, corpus, capsys):
    run = tmp_path / "r"
    proc = TrainProcess(
        tmp_path,
        "tiny",
        *common(tmp_path, corpus, "train.max_steps=100000", "log.interval=2", "eval.interval=0"),
    )
    proc.wait_until(trained_to(run, 4), "training steps")
    proc.send(signal.SIGINT)
    assert proc.wait(timeout=15) == 0, proc.output
    out = proc.output
    assert "SIGINT received" in out and f"Resume with: tinylm train --resume {run}" in out
    assert "Traceback" not in out
    stopped = [r for r in records(run, "event") if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "signal SIGINT"
    step = stopped[0]["step"]
    assert steps_of(run) == [checkpoint.checkpoint_name(step)]
    assert_loadable(run / "checkpoints" / checkpoint.checkpoint_name(step))

    assert run_cli("train", "--resume", run, f"train.max_steps={step + 3}") == 0
    assert max(r["step"] for r in read_metrics(run, "train")) == step + 3
    # A shorter run shortens the LR decay too: allowed, but said.
    assert "the learning-rate decay runs to max_steps" in capsys.readouterr().out


def test_sigint_during_evaluation_abandons_it(tmp_path, corpus):
    # A long validation set (the corpus 40 times) and no cap on batches: eval takes seconds.
    val = tmp_path / "val.txt"
    val.write_text(corpus.read_text() * 40)
    run = tmp_path / "r"
    args = common(tmp_path, corpus, f"data.val={val}", "train.max_steps=100", "log.interval=4")
    proc = TrainProcess(tmp_path, "tiny", *args, "eval.interval=4", "eval.max_batches=100000")
    # The train line of step 4 is written just before the evaluation of step 4 starts.
    proc.wait_until(trained_to(run, 4), "the first evaluation")
    time.sleep(0.3)
    proc.send(signal.SIGINT)
    assert proc.wait(timeout=15) == 0, proc.output
    out = proc.output
    assert "step 4: evaluation interrupted" in out and "Resume with" in out
    assert records(run, "eval") == []  # a partial evaluation is not recorded
    assert steps_of(run) == ["step_00000004"]
    assert run_cli("train", "--resume", run, "train.max_steps=6", "eval.max_batches=2") == 0
    # The abandoned evaluation of step 4 is redone first, then step 6's.
    assert [r["step"] for r in read_metrics(run, "eval")] == [4, 6]


def test_sigterm_during_sample_generation_abandons_the_sample(tmp_path, corpus, monkeypatch):
    """In-process: a sampler that never ends (no end-of-text) signals this very process."""
    import tinylm.generate

    sampled = []

    def endless(model, prompt, **kwargs):
        while True:
            sampled.append(1)
            if len(sampled) == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer's GracefulStop
            yield 1

    monkeypatch.setattr(tinylm.generate, "generate_stream", endless)
    args = common(tmp_path, corpus, "train.max_steps=100", "log.interval=3", "eval.interval=3")
    result = Trainer(load_config("tiny", args), tmp_path / "r").fit()
    assert result.step == 3 and result.stop_reason == "signal SIGTERM"
    assert len(sampled) == 5  # abandoned at the next token
    run = tmp_path / "r"
    assert read_metrics(run, "sample") == []  # an abandoned sample is not logged
    assert [r["step"] for r in read_metrics(run, "eval")] == [3]
    assert steps_of(run) == ["step_00000003"]


def writing_checkpoint(tmp_path: Path, corpus: Path, step: int, seconds: float) -> TrainProcess:
    """A run whose checkpoint writes (every 5 steps) each sleep `seconds` once the weights are
    on disk; returns when the write of `step` is in that sleep."""
    run = tmp_path / "r"
    args = common(tmp_path, corpus, "train.max_steps=100", "checkpoint.interval=5")
    env = {"TINYLM_TEST_SLOW_CHECKPOINT": str(seconds)}
    proc = TrainProcess(tmp_path, "tiny", *args, "eval.interval=0", env=env)
    name = checkpoint.checkpoint_name(step)
    proc.wait_until(
        lambda: any((run / "checkpoints").glob(f".tmp-{name}-*/model.safetensors")),
        f"the write of {name}",
        timeout=90,
    )
    return proc


def test_sigint_during_a_checkpoint_write_finishes_the_write(tmp_path, corpus):
    run = tmp_path / "r"
    proc = writing_checkpoint(tmp_path, corpus, step=5, seconds=2)
    proc.send(signal.SIGINT)
    assert proc.wait(timeout=15) == 0, proc.output
    assert "Resume with" in proc.output
    assert steps_of(run) == ["step_00000005"]  # written once, completely, not again at the stop
    assert_loadable(run / "checkpoints" / "step_00000005")
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert run_cli("train", "--resume", run, "train.max_steps=7") == 0
    assert steps_of(run)[-1] == "step_00000007"


def test_second_sigint_exits_at_once_and_keeps_the_last_checkpoint(tmp_path, corpus):
    run = tmp_path / "r"
    proc = writing_checkpoint(tmp_path, corpus, step=10, seconds=4)
    proc.send(signal.SIGINT)
    time.sleep(0.2)
    proc.send(signal.SIGINT)
    started = time.monotonic()
    assert proc.wait(timeout=10) == 130, proc.output
    assert time.monotonic() - started < 2.5  # not after the 4 s hook
    assert "again: exiting now" in proc.output and "Traceback" not in proc.output
    latest = checkpoint.find_latest(run / "checkpoints")
    assert latest is not None and latest.name == "step_00000005"
    assert_loadable(latest)
    assert run_cli("train", "--resume", run, "train.max_steps=12") == 0
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the half-written one is cleaned up


# ------------------------------------------------------------------------------ SIGKILL chaos


def test_sigkill_chaos_resumes_to_the_same_losses(tmp_path, corpus):
    """Kill at seeded random moments (start-up, steps, checkpoint writes), resume each time: every
    checkpoint found is loadable and the history equals an uninterrupted run's, bit for bit."""
    args = [
        f"data.train={corpus}", "train.max_steps=40", "checkpoint.interval=3",
        "checkpoint.keep_last=2", "log.interval=1", "eval.interval=10", "model.dropout=0.1",
        *SMALL,
    ]  # fmt: skip
    assert run_cli("train", "tiny", *args, f"out_dir={tmp_path}", "run_name=ref") == 0
    reference = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref", "train")]
    reference_val = [(r["step"], r["val/loss"]) for r in read_metrics(tmp_path / "ref", "eval")]

    run = tmp_path / "chaos"
    rng = random.Random(5)
    start_step = 0
    for round_ in range(4):
        if checkpoint.find_latest(run / "checkpoints") is None:
            proc = TrainProcess(tmp_path, "tiny", *args, f"out_dir={tmp_path}", "run_name=chaos")
        else:
            proc = TrainProcess(tmp_path, "--resume", run)
        if round_ == 1:  # somewhere in start-up: imports, data, model, the first steps
            time.sleep(rng.uniform(0.5, 4.0))
        else:
            target = start_step + rng.randint(2, 8)
            proc.wait_until(trained_to(run, target), f"step {target}")
            time.sleep(rng.uniform(0.0, 0.05))
        proc.send(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        latest = checkpoint.find_latest(run / "checkpoints")
        if latest is not None:
            assert_loadable(latest)
            start_step = checkpoint.read_meta(latest)["step"]
        else:
            assert not any(p.is_dir() for p in (run / "checkpoints").glob("step_*"))
    assert run_cli("train", "--resume", run) == 0
    assert [(r["step"], r["loss"]) for r in read_metrics(run, "train")] == reference
    assert [(r["step"], r["val/loss"]) for r in read_metrics(run, "eval")] == reference_val


# ------------------------------------------------------------------------------ guard rails


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_losses_skip_updates_then_stop(tmp_path, corpus, monkeypatch, fused):
    from tinylm.model import GPT

    real_forward = GPT.forward
    calls = {"n": 0}
    snapshot: dict[str, torch.Tensor] = {}

    def forward(self, idx, targets=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, **kwargs)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] >= 7:  # steps 7, 8, 9, ... are non-finite
                if not snapshot:  # the weights after the last good update (step 6)
                    snapshot.update({k: v.clone() for k, v in self.state_dict().items()})
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    cfg = load_config(
        "tiny",
        [
            *common(tmp_path, corpus, "train.max_steps=50", "log.interval=1", "eval.interval=0"),
            *("checkpoint.interval=5", "train.max_nonfinite_steps=3", f"optim.fused={fused}"),
        ],
    )
    trainer = Trainer(cfg, tmp_path / "r")
    result = trainer.fit()
    run = tmp_path / "r"
    assert result.step == 9
    assert result.stop_reason.startswith("3 consecutive non-finite steps up to step 9")
    for name, tensor in trainer.raw_model.state_dict().items():
        assert torch.equal(tensor, snapshot[name]), f"{name} changed during non-finite steps"
    events = read_metrics(run, "event")
    assert [e["step"] for e in events if e.get("event") == "nonfinite"] == [7, 8, 9]
    stop = next(e for e in events if e.get("event") == "stopped")
    assert "step 9" in stop["message"] and "Last good checkpoint" in stop["message"]
    assert "step_00000005" in stop["message"]
    assert steps_of(run) == ["step_00000005"]  # nothing written after the non-finite steps
    assert_loadable(run / "checkpoints" / "step_00000005")
    assert [r["loss"] for r in read_metrics(run, "train")][6:] == ["nan"] * 3


def test_rotation_keeps_exactly_the_promised_checkpoints(tmp_path, corpus):
    args = common(
        tmp_path, corpus, "train.max_steps=30", "checkpoint.interval=5", "eval.interval=5",
        "checkpoint.keep_last=2", "checkpoint.keep_best=true", "checkpoint.milestone_interval=10",
        "log.interval=5", "eval.samples=0",
    )  # fmt: skip
    assert run_cli("train", "tiny", *args) == 0
    run = tmp_path / "r"
    evals = read_metrics(run, "eval")
    best = min(evals, key=lambda r: r["val/loss"])["step"]
    expected = {25, 30} | {10, 20, 30} | {best}
    assert steps_of(run) == [checkpoint.checkpoint_name(s) for s in sorted(expected)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == steps_of(run)  # no strays
    assert checkpoint.find_best(run / "checkpoints").name == checkpoint.checkpoint_name(best)


def test_early_stopping_says_why(tmp_path, corpus, capsys):
    args = common(
        tmp_path, corpus, "train.max_steps=100", "eval.interval=2", "log.interval=2",
        "train.early_stop_patience=2", "train.early_stop_min_delta=100", "eval.samples=0",
    )  # fmt: skip
    assert run_cli("train", "tiny", *args) == 0
    run = tmp_path / "r"
    # Evaluation 1 sets the best (anything beats inf); 2 and 3 fail to beat it by 100.
    assert [r["step"] for r in read_metrics(run, "eval")] == [2, 4, 6]
    stop = next(e for e in read_metrics(run, "event") if e.get("event") == "stopped")
    assert stop["step"] == 6
    assert "early stopping: val loss did not improve by more than 100" in stop["reason"]
    assert "for 2 evaluations" in capsys.readouterr().err  # the CLI's closing line
    assert steps_of(run)[-1] == "step_00000006"


def test_gap_warning_when_val_data_differs(tmp_path, corpus):
    # Validation text with the same characters in a scrambled order: far harder than train.
    text = corpus.read_text()
    chars = list(text)
    random.Random(0).shuffle(chars)
    val = tmp_path / "scrambled.txt"
    val.write_text("".join(chars))
    args = common(tmp_path, corpus, f"data.val={val}", "train.max_steps=60", "log.interval=10")
    assert run_cli("train", "tiny", *args, "eval.interval=30", "eval.samples=0") == 0
    gaps = [e for e in read_metrics(tmp_path / "r", "event") if e.get("event") == "gap"]
    assert gaps and gaps[-1]["step"] == 60
    assert "x the train loss" in gaps[-1]["message"]
    val_loss = read_metrics(tmp_path / "r", "eval")[-1]["val/loss"]
    assert f"val loss {val_loss:.3f}" in gaps[-1]["message"]
    assert math.isfinite(val_loss)


def test_interrupt_while_setting_up_is_a_clean_stop(tmp_path, corpus, monkeypatch, capsys):
    """Ctrl+C during data preparation (before signals become a flag): no traceback, exit 0."""
    import tinylm.data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tinylm.data, "resolve_data", interrupted)
    assert run_cli("train", "tiny", *common(tmp_path, corpus, "train.max_steps=5")) == 0
    err = capsys.readouterr().err
    assert "interrupted (SIGINT) while setting up" in err and "run the same command again" in err


def test_forwarded_signal_within_grace_is_the_same_stop(monkeypatch):
    """Under torchrun the launcher's forwarded SIGTERM follows the terminal's SIGINT at once."""
    from tinylm.train.signals import GracefulStop

    exits = []
    monkeypatch.setattr("tinylm.train.signals.os._exit", exits.append)
    stop = GracefulStop(repeat_grace_s=2.0)
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGTERM, None)  # forwarded copy: not "exit now"
    assert stop.requested and stop.reason == "signal SIGINT" and not exits
    stop._first_signal_at -= 3.0  # a deliberate second Ctrl+C, later
    stop._handle(signal.SIGINT, None)
    assert exits == [130]
    single = GracefulStop()  # single process: every second signal exits at once
    single._handle(signal.SIGINT, None)
    single._handle(signal.SIGINT, None)
    assert exits == [130, 130]


def test_a_native_crash_prints_every_threads_python_stack():
    """`tinylm train` enables faulthandler: a segfault in native code (CI once lost an XLA
    replica run that way, its output ending mid-run with no clue) names each thread's line."""
    import subprocess
    import sys

    code = (
        "import ctypes, threading, time\n"
        "from tinylm.train.signals import enable_stack_dumps\n"
        "assert enable_stack_dumps()\n"
        "def waiting_replica():\n"
        "    time.sleep(60)\n"
        "threading.Thread(target=waiting_replica, daemon=True).start()\n"
        "time.sleep(0.2)\n"
        "ctypes.string_at(0)\n"  # reads address 0: SIGSEGV in native code
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == -signal.SIGSEGV, (done.returncode, done.stderr)
    assert "Fatal Python error: Segmentation fault" in done.stderr, done.stderr
    assert "waiting_replica" in done.stderr and "line 8" in done.stderr, done.stderr
