"""`tinylm sweep`: axes and grid expansion, seeded random samples, budgets, the manifest, the
divergence rule, the summary table, and an interrupted sweep resumed end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SMALL, read_metrics, run_cli

from tinylm.config import ConfigError
from tinylm.sweep.plan import (
    Budget,
    build_plan,
    expand_grid,
    load_manifest,
    parse_axes,
    reconcile,
    run_name,
    sample_points,
    save_manifest,
)
from tinylm.sweep.report import collect, format_table
from tinylm.sweep.runner import Divergence, divergence_reason, outcome

REPO = Path(__file__).resolve().parents[1]


def test_axes_grid_order_and_names():
    axes, fixed = parse_axes(
        ["optim.lr=1e-3,2e-3", "train.batch_size=8", "model.d_model=32,64,96", "x.y=[1, 2]"]
    )
    assert axes == {"optim.lr": ["1e-3", "2e-3"], "model.d_model": ["32", "64", "96"]}
    assert fixed == ["train.batch_size=8", "x.y=[1, 2]"]  # a bracketed list is one value
    grid = expand_grid(axes)
    assert len(grid) == 6
    assert grid[0] == {"optim.lr": "1e-3", "model.d_model": "32"}
    assert grid[1] == {"optim.lr": "1e-3", "model.d_model": "64"}  # the last axis varies fastest
    assert grid[5] == {"optim.lr": "2e-3", "model.d_model": "96"}
    assert run_name(5, grid[5]) == "05-lr2e-3-d_model96"
    with pytest.raises(ConfigError, match="given twice"):
        parse_axes(["optim.lr=1,2", "optim.lr=3,4"])
    with pytest.raises(ConfigError, match="distinct"):
        parse_axes(["optim.lr=1,1"])


def test_random_samples_are_seeded_distinct_and_in_grid_order():
    grid = expand_grid({"a.b": [str(i) for i in range(6)], "c.d": ["x", "y", "z", "w"]})
    first = sample_points(grid, 5, seed=0)
    assert first == sample_points(grid, 5, seed=0)  # the same seed, the same points
    assert first != sample_points(grid, 5, seed=1)
    assert len({json.dumps(p) for p in first}) == 5
    assert [grid.index(p) for p in first] == sorted(grid.index(p) for p in first)
    assert sample_points(grid, 100, seed=3) == grid  # more than the grid: all of it


def test_plan_budgets_validation_and_manifest(tmp_path):
    plan = build_plan(
        "tiny", ["train.batch_size=8,16", "optim.lr=1e-3"], budget=Budget("tokens", 128 * 1000)
    )
    # tiny: context 128, so batch 8 needs 125 steps and batch 16 needs 63 (rounded up)
    assert [r.overrides[-1] for r in plan.runs] == ["train.max_steps=125", "train.max_steps=63"]
    minutes = build_plan("tiny", ["optim.lr=1e-3,2e-3"], budget=Budget("minutes", 1.5))
    assert minutes.runs[0].overrides[-2:] == [
        "train.max_time_minutes=1.5",
        "train.fit_steps_to_time=true",
    ]
    with pytest.raises(ConfigError, match=r"01-n_head3.*model\.n_head"):
        build_plan("tiny", ["model.n_head=4,3"])
    with pytest.raises(ConfigError, match="at least one axis"):
        build_plan("tiny", ["optim.lr=1e-3"])

    save_manifest(plan, tmp_path)
    plan.runs[0].status = "finished"
    save_manifest(plan, tmp_path)
    again = build_plan(
        "tiny", ["train.batch_size=8,16", "optim.lr=1e-3"], budget=Budget("tokens", 128 * 1000)
    )
    resumed = reconcile(again, load_manifest(tmp_path), tmp_path)
    assert [r.status for r in resumed.runs] == ["finished", "pending"]
    other = build_plan("tiny", ["train.batch_size=8,32"])
    with pytest.raises(ConfigError, match="different sweep"):
        reconcile(other, load_manifest(tmp_path), tmp_path)
    assert plan.default_dir() == again.default_dir() != other.default_dir()


def test_divergence_rule():
    rule = Divergence(factor=2.0, after=0.2)
    good = [(10, 3.0), (20, 2.0), (30, 1.5)]
    assert divergence_reason([(10, math.nan)], [good], 100, rule) == "non-finite loss at step 10"
    assert divergence_reason([(10, 9.0)], [good], 100, rule) is None  # too early to judge
    assert divergence_reason([(20, 3.9)], [good], 100, rule) is None  # 1.95x
    assert "2.1x" in divergence_reason([(25, 4.2)], [good], 100, rule)  # vs 2.0 logged by 25
    assert divergence_reason([(40, 9.0)], [good], 100, rule) is None  # nobody got to 40 yet
    assert divergence_reason([(25, 4.2)], [good], 100, Divergence(factor=0)) is None


def test_outcome_of_a_child():
    start = {"kind": "event", "event": "start"}

    def stopped(reason):
        return [start, {"kind": "event", "event": "stopped", "reason": reason}]

    assert outcome([start, {"kind": "event", "event": "done"}], 0)[0] == "finished"
    assert outcome(stopped("time limit of 3 minutes"), 0)[0] == "finished"
    assert outcome(stopped("5 consecutive non-finite losses"), 0)[0] == "abandoned"
    assert outcome(stopped("signal SIGINT"), 0)[0] == "pending"
    assert outcome([start], 1) == ("failed", "exit code 1 before any end event")


def write_run(root: Path, name: str, evals: list[tuple[int, float]]) -> None:
    run = root / name
    run.mkdir(parents=True)
    lines = [{"kind": "train", "step": s, "loss": v + 0.1, "tokens": 100 * s, "ms_per_step": 60.0}
             for s, v in evals]  # fmt: skip
    lines += [{"kind": "eval", "step": s, "val/loss": v, "val/bits_per_byte": v / math.log(2)}
              for s, v in evals]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")


def test_summary_table_sorted_by_best_val_loss(tmp_path):
    plan = build_plan("tiny", ["optim.lr=1e-3,2e-3,4e-3,8e-3"])
    names = [r.name for r in plan.runs]
    write_run(tmp_path, names[0], [(100, 2.0), (200, 1.8)])
    write_run(tmp_path, names[1], [(100, 1.9), (200, 1.6), (300, 1.7)])  # best is not the last
    write_run(tmp_path, names[2], [(100, 2.5)])
    # names[3] never ran: listed last
    rows = collect(plan, tmp_path)
    assert [r.name for r in rows] == [names[1], names[0], names[2], names[3]]
    assert rows[0].best_val_loss == 1.6 and rows[0].steps == 300 and rows[0].tokens == 30000
    assert rows[0].best_bits_per_byte == pytest.approx(1.6 / math.log(2))
    assert rows[0].train_minutes == pytest.approx(300 * 60.0 / 60_000)
    table = format_table(rows, list(plan.axes)).splitlines()
    assert table[0].split() == ["#", "run", "lr", "status", "steps", "tokens", "train", "min",
                                "best", "val", "bits/byte"]  # fmt: skip
    assert table[1].split()[:3] == ["1", names[1], "2e-3"] and table[1].endswith("2.3083")
    assert table[4].split()[-2:] == ["-", "-"]


def sweep_cmd(tmp_path: Path, corpus: Path) -> list[str]:
    return [
        sys.executable, "-m", "tinylm.cli", "sweep", "tiny", "optim.lr=2e-3,1e-3,8",
        f"data.train={corpus}", *SMALL, "log.interval=1", "eval.interval=40", "eval.samples=0",
        "checkpoint.interval=40", "optim.warmup_steps=2", "--budget-steps", "80",
        "--out", str(tmp_path / "sw"), "--abandon-after", "0.1",
    ]  # fmt: skip


def test_interrupted_sweep_resumes_skips_finished_and_abandons_divergers(tmp_path, corpus):
    """Ctrl+C (SIGINT to the sweep) mid-run: the run checkpoints and the sweep exits 130; the same
    command resumes it from its checkpoint, runs the rest (abandoning lr=8, which diverges), and
    a third time runs nothing."""
    sw = tmp_path / "sw"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(sweep_cmd(tmp_path, corpus), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    first = sw / "00-lr2e-3"
    try:
        deadline = time.monotonic() + 120
        while not ((first / "metrics.jsonl").is_file() and read_metrics(first, "train")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no training step logged"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "re-run the same command to resume" in out
    manifest = json.loads((sw / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["pending"] * 3
    stopped_at = read_metrics(first, "event")[-1]["step"]
    assert 0 < stopped_at < 80  # stopped mid-run, with a checkpoint to resume from
    assert (first / "checkpoints").is_dir()

    assert run_cli(*sweep_cmd(tmp_path, corpus)[3:]) == 0
    runs = {r["name"]: r for r in json.loads((sw / "sweep.json").read_text())["runs"]}
    assert [r["status"] for r in runs.values()] == ["finished", "finished", "abandoned"]
    assert (
        "x the best run's" in runs["02-lr8"]["reason"] or "non-finite" in runs["02-lr8"]["reason"]
    )
    starts = [e for e in read_metrics(first, "event") if e["event"] == "start"]
    assert len(starts) == 2  # resumed, not restarted
    summary = (sw / "summary.md").read_text()
    assert summary.index("01-lr1e-3") < summary.index("02-lr8")  # abandoned one sorts last
    assert (sw / "curves.png").stat().st_size > 10_000

    before = (sw / "sweep.json").read_text()
    assert run_cli(*sweep_cmd(tmp_path, corpus)[3:]) == 0  # all done: nothing runs again
    assert len([e for e in read_metrics(first, "event") if e["event"] == "start"]) == 2
    assert json.loads((sw / "sweep.json").read_text()) == json.loads(before)


def test_parallel_sweep_runs_k_at_once_with_split_threads(tmp_path, corpus):
    """`--parallel 2` over three runs: the first two start before either finishes, the third
    when a slot frees; each child trains with the machine's threads split between two runs."""
    sw = tmp_path / "sw"
    cmd = [
        sys.executable, "-m", "tinylm.cli", "sweep", "tiny", "optim.lr=2e-3,1e-3,5e-4",
        f"data.train={corpus}", *SMALL, "log.interval=5", "eval.interval=20", "eval.samples=0",
        "--budget-steps", "20", "--parallel", "2", "--out", str(sw),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line.strip() for line in done.stdout.splitlines()]
    started = [i for i, line in enumerate(lines) if " starting " in line]
    finished = [i for i, line in enumerate(lines) if ": finished" in line]
    assert len(started) == 3 and len(finished) == 3, done.stdout
    assert started[1] < finished[0] < started[2], done.stdout  # two at once, then the third
    runs = json.loads((sw / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["finished"] * 3
    expected_threads = max(1, (os.cpu_count() or 1) // 2)
    for run in runs:
        start = [e for e in read_metrics(sw / run["name"], "event") if e["event"] == "start"]
        assert start[0]["threads"] == expected_threads
        assert read_metrics(sw / run["name"], "train")[-1]["step"] == 20
    assert (sw / "summary.md").read_text().count(": finished: reached train.max_steps") == 3
