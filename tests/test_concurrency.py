"""Several processes on one directory: train locks, prepare waits, readers during training.

Real `tinylm` subprocesses, started together; the in-process side resumes or reads to save the
interpreter start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import SMALL, CliProcess, read_metrics, run_cli, trained_to

from tinylm.data.prepare import SplitSettings, fit_char_tokenizer, prepare
from tinylm.locks import LOCK_FILE, DirectoryLock
from tinylm.train import checkpoint as ck

EOT = "<|endoftext|>"


def _corpus(tmp_path: Path) -> Path:
    docs = [f"Story {i}: " + "the cat sat on the mat " * (1 + i % 9) for i in range(300)]
    path = tmp_path / "corpus.txt"
    path.write_text(f"\n{EOT}\n".join(docs))
    return path


def _train_args(tmp_path: Path, corpus: Path, *extra: str) -> list[str]:
    return ["tiny", f"data.train={corpus}", f"out_dir={tmp_path}", "run_name=r", *SMALL, *extra]


def test_two_trains_started_together_one_is_refused_with_the_others_pid(tmp_path, corpus):
    # Both runs are long, so the one that wins the lock still holds it whenever the other starts
    # (a 20-step winner could finish before a slow second start-up, which then sees checkpoints).
    run = tmp_path / "r"
    args = _train_args(tmp_path, corpus, "train.max_steps=100000", "log.interval=2")
    procs = [CliProcess(tmp_path, "train", *args, "eval.interval=0") for _ in range(2)]
    deadline = time.monotonic() + 120
    while all(p.proc.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    loser = next((p for p in procs if p.proc.poll() is not None), None)
    assert loser is not None, "neither run was refused within 120 s"
    winner = procs[1] if loser is procs[0] else procs[0]
    assert loser.wait(1) == 2, loser.output
    assert f"is in use by PID {winner.pid}" in loser.output and "Traceback" not in loser.output
    winner.wait_until(trained_to(run, 4), "training steps")
    winner.send(signal.SIGINT)
    assert winner.wait(30) == 0, winner.output
    events = [e["event"] for e in read_metrics(run, "event")]
    assert events.count("start") == 1  # the refused one wrote nothing into the run
    assert not (run / LOCK_FILE).exists()  # released and removed at the end


def test_resume_while_running_is_refused_and_a_killed_holders_lock_is_stale(
    tmp_path, corpus, capsys
):
    run = tmp_path / "r"
    args = _train_args(tmp_path, corpus, "train.max_steps=100000", "log.interval=2")
    proc = CliProcess(tmp_path, "train", *args, "checkpoint.interval=2", "eval.interval=0")
    proc.wait_until(trained_to(run, 4), "training steps")
    started = time.monotonic()
    assert run_cli("train", "--resume", run) == 2
    assert time.monotonic() - started < 10  # refused at once, not after loading anything
    assert f"is in use by PID {proc.pid}" in capsys.readouterr().err
    proc.send(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind by the kill
    step = ck.read_meta(ck.find_latest(run / "checkpoints"))["step"]
    assert run_cli("train", "--resume", run, f"train.max_steps={step + 2}") == 0
    assert f"the previous run (PID {proc.pid}) ended without releasing its lock" in (
        capsys.readouterr().out
    )
    assert read_metrics(run, "train")[-1]["step"] == step + 2


def _hold_lock(directory: Path, ready: Path) -> subprocess.Popen:
    """Another process holding `directory`'s lock until killed."""
    code = (
        "import sys, time; from pathlib import Path; from tinylm.locks import DirectoryLock\n"
        "lock = DirectoryLock(Path(sys.argv[1]), 'test', wait=False).acquire()\n"
        "Path(sys.argv[2]).write_text('held'); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory), str(ready)])
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return proc


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = _hold_lock(tmp_path, tmp_path / "ready")
    try:
        lock = DirectoryLock(tmp_path, "train a run", wait=False, error=ValueError)
        try:
            lock.acquire()
            raise AssertionError("a held lock was acquired")
        except ValueError as e:
            assert f"PID {holder.pid}" in str(e) and "(test)" in str(e)
    finally:
        holder.kill()
        holder.wait()
    with DirectoryLock(tmp_path, "train a run", wait=False) as lock:  # the kill released it
        assert lock.stale["pid"] == holder.pid
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_holder_refused_before_it_wrote_its_record_is_still_named(tmp_path):
    # The race of two trains started together: the winner holds the flock but has not yet
    # written its PID when the loser is refused; the loser waits briefly for the record.
    import fcntl
    import threading

    fd = os.open(tmp_path / LOCK_FILE, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: conflicts in-process too
    record = json.dumps({"pid": 424242, "purpose": "train a run"}).encode()
    writer = threading.Timer(0.2, os.pwrite, (fd, record, 0))
    writer.start()
    try:
        DirectoryLock(tmp_path, "train a run", wait=False, error=ValueError).acquire()
        raise AssertionError("a held lock was acquired")
    except ValueError as e:
        assert "PID 424242" in str(e), str(e)
    finally:
        writer.join()
        os.close(fd)


def test_two_prepares_into_one_output_wait_and_give_the_single_run_result(tmp_path):
    src = _corpus(tmp_path)
    tok = fit_char_tokenizer([str(src)])
    reference = prepare(
        [str(src)], tmp_path / "ref", tok, settings=SplitSettings(), workers=1, log=lambda _: None
    )
    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out, tmp_path / "ready")  # both must wait for it, then for each other
    args = [
        "prepare",
        src,
        "--out",
        out,
        "--workers",
        "1",
        "--no-progress",
        "--val-fraction",
        "0.1",
    ]
    procs = [CliProcess(tmp_path, *args) for _ in range(2)]
    try:
        for p in procs:
            p.wait_until(lambda p=p: f"waiting for PID {holder.pid}" in p.output, "waiting")
    finally:
        holder.kill()
        holder.wait()
    assert [p.wait(120) for p in procs] == [0, 0], [p.output for p in procs]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == reference.meta["splits"]
    for split in meta["splits"].values():
        for r in split["shards"]:
            assert (out / r["file"]).read_bytes() == (reference.directory / r["file"]).read_bytes()
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == [
        "meta.json",
        "tokenizer.json",
    ]


def test_readers_always_see_a_complete_checkpoint_while_a_run_trains(tmp_path, corpus):
    """A checkpoint every step, only the last kept: rotation deletes what readers just found."""
    run = tmp_path / "r"
    args = _train_args(tmp_path, corpus, "train.max_steps=100000", "log.interval=1")
    args += ["checkpoint.interval=1", "checkpoint.keep_last=1", "eval.interval=0"]
    proc = CliProcess(tmp_path, "train", *args)
    try:
        proc.wait_until(lambda: ck.find_latest(run / "checkpoints") is not None, "a checkpoint")
        seen: set[int] = set()
        reads = 0
        deadline = time.monotonic() + 60
        # Until the reads have really raced several checkpoint writes and deletions.
        while len(seen) < 4 and time.monotonic() < deadline:
            loaded = ck.load_checkpoint(run)  # must never fail, whatever the writer is doing
            assert ck.check_weights(loaded.path, loaded.model_state, loaded.config) is None
            seen.add(loaded.meta["step"])
            reads += 1
            time.sleep(0.005)  # leave the writer some of the two cores
        assert len(seen) >= 4, f"{reads} reads saw only steps {sorted(seen)}"
    finally:
        proc.send(signal.SIGTERM)
        assert proc.wait(30) == 0
