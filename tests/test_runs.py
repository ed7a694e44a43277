"""`tinylm runs` and `tinylm plot` on real tiny runs, and the status rules on written logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import SMALL, read_metrics, run_cli

from tinylm.runs import format_table, run_status, summarize


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, corpus):
    """A finished run of 8 steps and one stopped early by early stopping."""
    root = tmp_path_factory.mktemp("runs")
    common = [
        f"data.train={corpus}",
        f"out_dir={root}",
        "log.interval=2",
        "eval.interval=4",
        *SMALL,
    ]
    early = ["train.early_stop_patience=1", "train.early_stop_min_delta=100", "eval.samples=0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The autouse cache fixture is function-scoped; this module-scoped one needs its own.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLM_CACHE", str(root / "cache"))
        assert run_cli("train", "tiny", "run_name=a", "train.max_steps=8", *common) == 0
        assert run_cli("train", "tiny", "run_name=b", "train.max_steps=20", *early, *common) == 0
    torch.set_num_threads(threads)
    return root


def test_runs_lists_status_and_figures(two_runs, capsys):
    capsys.readouterr()
    assert run_cli("runs", two_runs) == 0
    lines = capsys.readouterr().out.splitlines()
    header = "run status steps tokens best val last train last checkpoint"
    assert lines[0].split() == header.split()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"a", "b"}  # the dataset cache directory is not a run
    a = rows["a"]
    train = read_metrics(two_runs / "a", "train")
    best = min(r["val/loss"] for r in read_metrics(two_runs / "a", "eval"))
    assert a[1:4] == ["finished", "8/8", f"{train[-1]['tokens'] / 1e3:.1f}K"]
    assert a[4:] == [f"{best:.4f}", f"{train[-1]['loss']:.4f}", "step_00000008"]
    assert rows["b"][1:3] == ["stopped", "8/20"]  # evals at 4 and 8: the second stops it


def test_status_of_live_and_killed_processes(tmp_path):
    start = {"kind": "event", "event": "start", "host": socket.gethostname(), "step": 0}
    live = [{**start, "pid": os.getpid(), "time": time.time()}]
    assert run_status(live, time.time()) == "running"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert run_status([{**start, "pid": dead.pid, "time": time.time()}], time.time()) == "failed"
    # A pid reused by a process started after the run's start event is not the run.
    assert run_status([{**start, "pid": os.getpid(), "time": 0.0}], time.time()) == "failed"
    other_host = [{**start, "host": "elsewhere", "pid": 1, "time": time.time()}]
    assert run_status(other_host, time.time()) == "running"
    assert run_status(other_host, time.time() - 3600) == "failed"
    ended = [*live, {"kind": "event", "event": "failed", "step": 3}]
    assert run_status(ended, time.time()) == "failed"


def test_killed_run_shows_failed_with_its_last_checkpoint(tmp_path):
    run = tmp_path / "k"
    run.mkdir()
    start = {"kind": "event", "event": "start", "step": 0, "max_steps": 100}
    start.update(host=socket.gethostname(), pid=2**22 + 1, time=time.time())  # no such pid
    train = {"kind": "train", "step": 10, "loss": "nan", "tokens": 2560}
    (run / "metrics.jsonl").write_text(json.dumps(start) + "\n" + json.dumps(train) + "\n")
    summary = summarize(run)
    assert (summary.status, summary.step, summary.max_steps) == ("failed", 10, 100)
    assert summary.last_checkpoint is None and summary.best_val_loss is None
    assert "failed  10/100  2.6K    -         nan" in format_table([summary])


def test_plot_writes_a_png_for_two_runs(two_runs, tmp_path):
    out = tmp_path / "cmp.png"
    assert run_cli("plot", two_runs / "a", two_runs / "b", "--out", out) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1600, 800) and len(data) > 20_000


def test_plot_refuses_a_directory_without_metrics(tmp_path, capsys):
    assert run_cli("plot", tmp_path, "--out", tmp_path / "x.png") == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


# Lines a hand edit, a disk error or another tool can leave in metrics.jsonl (issue 21, item 7):
# each broke `tinylm runs`, `tinylm plot` and the dashboard's /api/runs for every run.
MALFORMED = [
    b"not json at all",
    b"[1, 2]",
    b"5",
    b'{"kind": "train", "step": "x", "tokens": 1, "loss": 1.0}',
    b'{"kind": "train", "step": 3, "loss": 1.0}',
    b'{"kind": "event", "event": "start", "pid": "abc", "time": 1.0}',
    b'{"kind": "eval", "step": -1, "val/loss": 1.0}',
    b'{"kind": 7, "step": 1}',
    b'\xff\xfe{"kind": "train"}',
]


def test_malformed_metrics_lines_are_skipped_and_counted_per_run(two_runs, tmp_path, capsys):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(two_runs / "a", root / "a")
    shutil.copytree(two_runs / "b", root / "b")
    metrics = root / "a" / "metrics.jsonl"
    good = metrics.read_bytes()
    lines = good.splitlines(keepends=True)
    # Bad lines in the middle (and a line being written at the end, which is not counted).
    metrics.write_bytes(
        b"".join(lines[:3]) + b"\n".join(MALFORMED) + b"\n" + b"".join(lines[3:]) + b'{"kind": "tr'
    )
    capsys.readouterr()
    assert run_cli("runs", root) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["a"][1:3] == ["finished", "8/8"] and rows["b"][1:3] == ["stopped", "8/20"]
    assert f"{metrics}: {len(MALFORMED)} malformed line(s) skipped" in err
    assert "b/metrics.jsonl" not in err
    assert summarize(root / "a").bad_lines == len(MALFORMED)
    assert run_cli("plot", root / "a", root / "b", "--out", tmp_path / "p.png") == 0
    assert "malformed" in capsys.readouterr().err


def test_dashboard_reads_malformed_metrics_lines_with_the_shared_reader(two_runs, tmp_path):
    pytest.importorskip("fastapi")
    from tinylm.serve.dashboard import read_new_records, run_row

    run = tmp_path / "a"
    import shutil

    shutil.copytree(two_runs / "a", run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\n".join(MALFORMED) + b"\n")
    row = run_row(run)
    assert row["status"] == "finished" and row["bad_lines"] == len(MALFORMED)
    records = read_new_records(run / "metrics.jsonl", 0, "")["records"]
    assert records and all(isinstance(r["step"], int) for r in records)
