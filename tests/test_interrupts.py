"""Signals before the training loop and around data preparation, an evaluation abandoned by a
signal, and SIGKILL in the middle of every write path.

A kill "in the middle of a write" is placed exactly: the subprocess runs `tinylm` with
`os.fsync` wrapped so that it SIGKILLs itself when asked to fsync a file whose path matches a
pattern — after the content is written, before it is renamed into place, the worst moment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import SMALL, CliProcess, read_metrics, run_cli

from tinylm.config import load_config
from tinylm.data.errors import DataError
from tinylm.data.shards import PreparedDataset
from tinylm.train import checkpoint as ck
from tinylm.train import validation
from tinylm.train.trainer import Trainer

EOT = "<|endoftext|>"

KILL_AT_FSYNC = """
import os, re, signal, sys
pattern = re.compile(sys.argv[1])
real_fsync = os.fsync
def fsync(fd):
    if pattern.search(os.readlink(f"/proc/self/fd/{fd}")):
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync
from tinylm.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _stories(tmp_path: Path, n: int, name: str = "stories.txt") -> Path:
    docs = [
        f"Story {i}. " + "Once upon a time the fox ran far away. " * (1 + i % 5) for i in range(n)
    ]
    path = tmp_path / name
    path.write_text(f"\n{EOT}\n".join(docs))
    return path


def _killed_at(tmp_path: Path, pattern: str, *args: object) -> CliProcess:
    proc = CliProcess(tmp_path, *args, prefix=[sys.executable, "-c", KILL_AT_FSYNC, pattern])
    assert proc.wait(120) == -signal.SIGKILL, proc.output
    return proc


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _all_gone(procs: list[psutil.Process], timeout: float = 10.0) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


def _prepared_text(directory: Path) -> str:
    ds = PreparedDataset.open(directory)
    tokens = ds.split("train")
    return ds.tokenizer().decode(tokens[0 : len(tokens)].tolist())


# ------------------------------------------------------------------ signals in data preparation


PREPARE = ["--workers", "2", "--chunk-mb", "0.002", "--val-fraction", "0", "--no-progress"]


def test_sigterm_during_prepare_stops_and_reaps_workers_then_resumes(tmp_path):
    src = _stories(tmp_path, 2500)
    out = tmp_path / "out"
    proc = CliProcess(tmp_path, "prepare", src, "--out", out, *PREPARE)
    proc.wait_until(lambda: len(list((out / ".progress").glob("0*.json"))) >= 3, "3 chunks")
    workers = _children(proc.pid)
    assert workers, "the prepare should run worker processes"
    proc.send(signal.SIGTERM)
    assert proc.wait(30) == 130, proc.output
    assert "interrupted (SIGTERM)" in proc.output and "run the same command again" in proc.output
    assert "Traceback" not in proc.output
    assert _all_gone(workers)  # pool workers and the resource tracker: none left behind
    assert not (out / "meta.json").exists()

    assert run_cli("prepare", src, "--out", out, *PREPARE) == 0  # continues from the kept chunks
    expected = "".join(d.strip() + EOT for d in src.read_text().split(EOT))
    assert _prepared_text(out) == expected  # every document once, in order
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_workers_exit_when_prepare_is_killed_with_sigkill(tmp_path):
    """SIGKILL runs no clean-up: the workers themselves notice their parent is gone (issue 21)."""
    src = _stories(tmp_path, 2500)
    out = tmp_path / "out"
    proc = CliProcess(tmp_path, "prepare", src, "--out", out, *PREPARE)
    proc.wait_until(lambda: len(list((out / ".progress").glob("0*.json"))) >= 3, "3 chunks")
    workers = [c for c in _children(proc.pid) if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2, "the prepare should run its two worker processes"
    proc.send(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert _all_gone(workers, timeout=10.0)  # they lived forever before


# A parent that starts a tokenizer worker pool with the real initializer, prints the workers'
# PIDs and waits to be killed.
POOL_PARENT = """
import multiprocessing, sys, time
from tinylm.tokenizer import CharTokenizer
from tinylm.tokenizer import bpe, bpe_train
from tinylm.tokenizer.pretokenize import GPT2_PATTERN

init, args = {
    "encode": (bpe._init_encode_worker, (CharTokenizer.fit(["abc"]),)),
    "bpe-train": (bpe_train._worker_init, (["<|endoftext|>"], GPT2_PATTERN, False)),
}[sys.argv[1]]
pool = bpe_train._mp_context().Pool(2, initializer=init, initargs=args)
pool.map(abs, range(4))
print(" ".join(str(p.pid) for p in pool._pool), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("pool", ["encode", "bpe-train"])
def test_tokenizer_worker_pools_exit_with_their_parent(tmp_path, pool):
    proc = subprocess.Popen(
        [sys.executable, "-c", POOL_PARENT, pool], stdout=subprocess.PIPE, text=True
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        workers = [psutil.Process(p) for p in pids]
        assert len(workers) == 2
        proc.kill()
        proc.wait(30)
        assert _all_gone(workers, timeout=10.0)
    finally:
        proc.kill()
        proc.stdout.close()


def test_ctrl_c_during_worker_start_up_prints_no_worker_tracebacks(tmp_path):
    src = _stories(tmp_path, 2500)
    out = tmp_path / "out"
    proc = CliProcess(tmp_path, "prepare", src, "--out", out, *PREPARE, new_session=True)

    def worker_starting() -> bool:
        return any("spawn_main" in " ".join(c.cmdline()) for c in _children(proc.pid))

    proc.wait_until(worker_starting, "a worker process starting")
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl+C does: the whole group
    assert proc.wait(30) == 130, proc.output
    assert "Traceback" not in proc.output and "KeyboardInterrupt" not in proc.output
    assert "interrupted (SIGINT)" in proc.output
    assert _all_gone(workers)


def test_sigterm_during_training_set_up_is_a_clean_stop_that_resumes(tmp_path):
    src = _stories(tmp_path, 6000)  # ~1.5 MB: fitting and preparing take a moment
    args = ["tiny", f"data.train={src}", f"out_dir={tmp_path}", "run_name=r", *SMALL]
    proc = CliProcess(tmp_path, "train", *args, "train.max_steps=2")
    proc.wait_until(lambda: "data: " in proc.output, "set-up")
    proc.send(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.output
    assert "interrupted (SIGTERM) while setting up" in proc.output
    assert "Traceback" not in proc.output
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert run_cli("train", *args, "train.max_steps=2") == 0  # the same command continues
    assert read_metrics(tmp_path / "r", "train")[-1]["step"] == 2


# ------------------------------------------------------------------ an evaluation cut by a signal


def test_evaluation_interrupted_by_a_signal_is_redone_after_resume(tmp_path, corpus, monkeypatch):
    args = [f"data.train={corpus}", f"out_dir={tmp_path}", *SMALL, "train.max_steps=6"]
    args += ["eval.interval=3", "log.interval=3", "checkpoint.interval=0"]
    Trainer(load_config("tiny", [*args, "run_name=ref"]), tmp_path / "ref").fit()

    real = validation.Validator._eval_should_stop
    calls = {"n": 0}

    def signal_during_first_eval(self):
        calls["n"] += 1
        if calls["n"] == 2:  # between the first and second batch of step 3's evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(validation.Validator, "_eval_should_stop", signal_during_first_eval)
    result = Trainer(load_config("tiny", [*args, "run_name=r"]), tmp_path / "r").fit()
    assert result.step == 3 and result.stop_reason == "signal SIGTERM"
    assert read_metrics(tmp_path / "r", "eval") == []
    monkeypatch.setattr(validation.Validator, "_eval_should_stop", real)

    assert run_cli("train", "--resume", tmp_path / "r") == 0

    def evals(run: str) -> list[tuple]:
        return [
            (r["step"], r["val/loss"], r["val/bits_per_byte"])
            for r in read_metrics(tmp_path / run, "eval")
        ]

    assert evals("r") == evals("ref") and [s for s, *_ in evals("r")] == [3, 6]
    samples = [(r["step"], r["text"]) for r in read_metrics(tmp_path / "r", "sample")]
    assert samples == [(r["step"], r["text"]) for r in read_metrics(tmp_path / "ref", "sample")]


# ------------------------------------------------------------------ SIGKILL in every write path

PREP_ONE = ["--workers", "1", "--chunk-mb", "0.002", "--no-progress"]


@pytest.mark.parametrize(
    "what,pattern",
    [
        ("shard", r"/train_000002\.bin\.\d+-\d+\.tmp$"),
        ("dataset meta.json", r"/meta\.json\.\d+-\d+\.tmp$"),
        ("tokenizer cache", r"/tokenizers/char-[0-9a-f]+\.json\.\d+-\d+\.tmp$"),
    ],
)
def test_sigkill_while_preparing_leaves_nothing_taken_for_complete(tmp_path, what, pattern):
    src = _stories(tmp_path, 300)
    out = tmp_path / "out"
    _killed_at(tmp_path, pattern, "prepare", src, "--out", out, *PREP_ONE)
    with pytest.raises(DataError, match="not a prepared dataset"):
        PreparedDataset.open(out)
    cache = Path(os.environ["TINYLM_CACHE"]) / "tokenizers"
    complete = [p for p in cache.glob("*") if p.suffix == ".json"] if cache.is_dir() else []
    if what == "tokenizer cache":
        assert complete == []  # only the temporary file: not taken for a cached tokenizer
    assert run_cli("prepare", src, "--out", out, *PREP_ONE) == 0
    assert run_cli("prepare", src, "--out", tmp_path / "ref", *PREP_ONE) == 0
    mine, ref = (json.loads((d / "meta.json").read_text()) for d in (out, tmp_path / "ref"))
    assert mine["splits"] == ref["splits"]
    for split in mine["splits"].values():
        for r in split["shards"]:
            assert (out / r["file"]).read_bytes() == (tmp_path / "ref" / r["file"]).read_bytes()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_sigkill_during_checkpoint_and_metrics_writes(tmp_path, corpus, capsys):
    args = ["tiny", f"data.train={corpus}", f"out_dir={tmp_path}", "run_name=r", *SMALL]
    args += ["train.max_steps=6", "checkpoint.interval=2", "eval.interval=0", "log.interval=1"]
    run = tmp_path / "r"
    # 1. Killed while writing checkpoint 4: checkpoint 2 is the latest, 4 is not taken for one.
    _killed_at(tmp_path, r"/\.tmp-step_00000004-\d+/meta\.json\.", "train", *args)
    assert ck.find_latest(run / "checkpoints").name == "step_00000002"
    assert not (run / "checkpoints" / "step_00000004").exists()
    # 2. Killed while the resume rewrites metrics.jsonl: the old file stays whole.
    before = (run / "metrics.jsonl").read_bytes()
    _killed_at(tmp_path, r"/metrics\.jsonl\.\d+-\d+\.tmp$", "train", "--resume", run)
    assert (run / "metrics.jsonl").read_bytes() == before
    # 3. A line cut short by a kill mid-append: readers skip it, the resume drops it.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')
    assert run_cli("runs", tmp_path) == 0
    assert run_cli("train", "--resume", run) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole JSON
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert ck.find_latest(run / "checkpoints").name == "step_00000006"
    assert "Traceback" not in capsys.readouterr().err


WORKER_MASKS = """
import multiprocessing, signal
from concurrent.futures import ProcessPoolExecutor
from tinylm.interrupts import workers_ignore_sigint

if __name__ == "__main__":
    with workers_ignore_sigint():
        pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        masks = [pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, []) for _ in range(4)]
        still_blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    print(still_blocked, all(signal.SIGINT in m.result() for m in masks))
    pool.shutdown()
"""


def test_workers_started_in_the_block_all_keep_sigint_blocked(tmp_path):
    """In a fresh process (no resource tracker yet): starting spawn workers starts the tracker,
    whose start-up once unblocked SIGINT in the parent, exposing every later worker."""
    script = tmp_path / "masks.py"
    script.write_text(WORKER_MASKS)
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]
