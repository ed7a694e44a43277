"""`tinylm sweep` on Optuna: axes, the sweep's identity and manifest, run names confined to the
sweep, the divergence rule, the summary table, the study (claiming, adopting a killed sweep's
trials, pruning), and end to end: a killed study resumed with a losing trial pruned and best.yaml
trained; two identical sweeps into one directory at once."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import SMALL, read_metrics, run_cli

from tinylm.config import ConfigError
from tinylm.runs import summarize
from tinylm.sweep.plan import (
    Budget,
    build_spec,
    check_same_sweep,
    default_trials,
    load_manifest,
    run_dir,
    run_name,
    save_manifest,
)
from tinylm.sweep.report import collect, format_table
from tinylm.sweep.runner import Divergence, divergence_reason, outcome
from tinylm.sweep.space import expand_grid, parse_space
from tinylm.sweep.study import SweepStudy, default_storage, pruning_chances, tpe_startup_trials

REPO = Path(__file__).resolve().parents[1]


def test_axes_of_every_kind_and_fixed_overrides():
    axes, fixed = parse_space(
        ["optim.lr=log:3e-4..1e-2", "model.dropout=0..0.2", "model.n_layer=int:2..6",
         "model.d_model=choice:96,128", "optim.warmup_steps=50,100", "train.batch_size=8",
         "x.y=[1, 2]", "data.train=../a..b.txt"]
    )  # fmt: skip
    kinds = {a.key: (a.kind, a.low, a.high, a.log, a.values) for a in axes}
    assert kinds == {
        "optim.lr": ("float", 3e-4, 1e-2, True, []),
        "model.dropout": ("float", 0.0, 0.2, False, []),
        "model.n_layer": ("int", 2, 6, False, []),
        "model.d_model": ("choice", 0.0, 0.0, False, ["96", "128"]),
        "optim.warmup_steps": ("grid", 0.0, 0.0, False, ["50", "100"]),
    }
    assert fixed == ["train.batch_size=8", "x.y=[1, 2]", "data.train=../a..b.txt"]
    assert expand_grid(axes) == [
        {"model.d_model": d, "optim.warmup_steps": w} for d in ("96", "128") for w in ("50", "100")
    ]
    for bad, match in [
        ("optim.lr=log:0..1", "a > 0"),
        ("optim.lr=1e-2..1e-3", "a < b"),
        ("model.n_layer=int:1.5..4", "whole numbers"),
        ("optim.lr=1,1", "distinct"),
        ("optim.lr=choice:", "non-empty"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_space([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_space(["optim.lr=1,2", "optim.lr=log:1e-3..1e-2"])


def test_spec_budgets_validation_and_manifest(tmp_path):
    spec = build_spec(
        "tiny", ["train.batch_size=8,16", "optim.lr=1e-3"], budget=Budget("tokens", 128 * 1000)
    )
    assert spec.sampler == "grid" and default_trials(spec, None) == 2
    # tiny: context 128, so batch 8 needs 125 steps and batch 16 needs 63 (rounded up)
    assert spec.trial_overrides({"train.batch_size": "8"})[-1] == "train.max_steps=125"
    assert spec.trial_overrides({"train.batch_size": "16"})[-1] == "train.max_steps=63"
    minutes = build_spec("tiny", ["optim.lr=log:1e-3..1e-2"], budget=Budget("minutes", 1.5))
    assert minutes.sampler == "tpe"
    assert minutes.trial_overrides({"optim.lr": "0.002"})[-2:] == [
        "train.max_time_minutes=1.5",
        "train.fit_steps_to_time=true",
    ]
    with pytest.raises(ConfigError, match="needs --trials"):
        default_trials(minutes, None)
    with pytest.raises(ConfigError, match=r"model\.n_head=3.*model\.n_head"):
        build_spec("tiny", ["model.n_head=4,3"])
    with pytest.raises(ConfigError, match="at least one axis"):
        build_spec("tiny", ["optim.lr=1e-3"])
    with pytest.raises(ConfigError, match="grid needs lists"):
        build_spec("tiny", ["optim.lr=log:1e-3..1e-2"], sampler="grid")

    save_manifest(spec, tmp_path, default_storage(tmp_path))
    again = build_spec(
        "tiny", ["train.batch_size=8,16", "optim.lr=1e-3"], budget=Budget("tokens", 128 * 1000)
    )
    check_same_sweep(again, load_manifest(tmp_path), tmp_path)  # the same sweep: no error
    other = build_spec("tiny", ["train.batch_size=8,32"])
    with pytest.raises(ConfigError, match="different sweep"):
        check_same_sweep(other, load_manifest(tmp_path), tmp_path)
    assert spec.default_dir() == again.default_dir() != other.default_dir()
    for text in ("{not json", json.dumps([1]), json.dumps({"format": "tinylm-sweep"})):
        (tmp_path / "sweep.json").write_text(text)
        with pytest.raises(ConfigError, match=r"sweep\.json"):
            load_manifest(tmp_path)


def test_run_names_are_confined_to_the_sweep(tmp_path):
    """Issue 21: a run named `../escape` in the study must never become a path outside."""
    spec = build_spec("tiny", ["optim.lr=log:1e-3..1e-2", "model.d_model=choice:32,64"])
    name = run_name(7, spec, {"optim.lr": "0.0012345678", "model.d_model": "64"})
    assert name == "t007-lr0.00123-d_model64"
    assert run_dir(tmp_path, name, "x") == tmp_path / name
    for bad in ("../escape", "/etc", "a/b", "..", "", None, "a b"):
        with pytest.raises(ConfigError, match="study trial 3"):
            run_dir(tmp_path, bad, "study trial 3")


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
    assert outcome(stopped("5 consecutive non-finite losses"), 0)[0] == "pruned"
    assert outcome(stopped("signal SIGINT"), 0)[0] == "pending"
    pruned = [*stopped("signal SIGTERM"), {"kind": "event", "event": "pruned", "reason": "why"}]
    assert outcome(pruned, 0) == ("pruned", "why")
    assert outcome([start], 1) == ("failed", "exit code 1 before any end event")


def write_run(root: Path, name: str, evals: list[tuple[int, float]], done: bool = True) -> None:
    run = root / name
    run.mkdir(parents=True)
    lines = [{"kind": "event", "event": "start", "step": 0}]
    lines += [{"kind": "train", "step": s, "loss": v + 0.1, "tokens": 100 * s, "ms_per_step": 60.0}
              for s, v in evals]  # fmt: skip
    lines += [{"kind": "eval", "step": s, "val/loss": v, "val/bits_per_byte": v / math.log(2)}
              for s, v in evals]  # fmt: skip
    if done:
        lines.append({"kind": "event", "event": "done", "step": evals[-1][0] if evals else 0})
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")


def test_summary_table_sorted_by_best_bits_per_byte(tmp_path):
    def trial(number, state, lr):
        name = f"t{number:03d}-lr{lr}"
        attrs = {"run": name, "params": {"optim.lr": lr}}
        return SimpleNamespace(number=number, state=SimpleNamespace(name=state),
                               user_attrs=attrs, params={})  # fmt: skip

    trials = [trial(0, "COMPLETE", "1e-3"), trial(1, "COMPLETE", "2e-3"),
              trial(2, "PRUNED", "4e-3"), trial(3, "RUNNING", "8e-3")]  # fmt: skip
    write_run(tmp_path, "t000-lr1e-3", [(100, 2.0), (200, 1.8)])
    write_run(tmp_path, "t001-lr2e-3", [(100, 1.9), (200, 1.6), (300, 1.7)])  # best not last
    write_run(tmp_path, "t002-lr4e-3", [(100, 2.5)])
    rows = collect(trials, tmp_path)  # t003 never logged: listed last
    assert [r.trial for r in rows] == [1, 0, 2, 3]
    assert [r.status for r in rows] == ["finished", "finished", "pruned", "running"]
    assert rows[0].best_val_loss == 1.6 and rows[0].steps == 300 and rows[0].tokens == 30000
    assert rows[0].best_bits_per_byte == pytest.approx(1.6 / math.log(2))
    assert rows[0].train_minutes == pytest.approx(300 * 60.0 / 60_000)
    table = format_table(rows, ["optim.lr"]).splitlines()
    assert table[0].split() == ["#", "run", "lr", "status", "steps", "tokens", "train", "min",
                                "best", "val", "bits/byte"]  # fmt: skip
    assert table[1].split()[:3] == ["1", "t001-lr2e-3", "2e-3"] and table[1].endswith("2.3083")
    assert table[4].split()[-2:] == ["-", "-"]
    escape = trial(4, "COMPLETE", "1e-3")
    escape.user_attrs["run"] = "../escape"  # an edited study: refused before any path is used
    with pytest.raises(ConfigError, match="study trial 4"):
        collect([*trials, escape], tmp_path)


def make_study(tmp_path, overrides, n_trials, **kw) -> SweepStudy:
    spec = build_spec("tiny", overrides, pruner=kw.pop("pruner", "median"))
    return SweepStudy(spec, tmp_path, storage=default_storage(tmp_path), n_trials=n_trials,
                      max_steps=100, say=lambda _m: None, **kw)  # fmt: skip


def test_study_claims_adopts_orphans_and_requeues(tmp_path, monkeypatch):
    """Trials of a killed sweep (their owner PID is dead): one that had finished is told
    COMPLETE, one with a checkpoint is resumed as the same trial, one without is re-queued with
    its parameters under a new number; `--trials` counts each trial once."""
    study = make_study(tmp_path, ["optim.lr=1e-3,2e-3,4e-3"], n_trials=3)
    tickets = [study.claim(set()) for _ in range(3)]
    assert [t.number for t in tickets] == [0, 1, 2]
    assert sorted(t.params["optim.lr"] for t in tickets) == ["1e-3", "2e-3", "4e-3"]
    assert study.claim({0, 1, 2}) is None  # all three asked and owned by this live process

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout  # fmt: skip
    for t in tickets:  # as if a sweep that has since died owned them
        t.trial.set_user_attr("owner", {"pid": int(dead), "host": study.owner["host"],
                                        "started": 1.0})  # fmt: skip
    write_run(tmp_path, tickets[0].run, [(10, 2.0)])  # finished before the kill
    write_run(tmp_path, tickets[1].run, [(10, 2.1)], done=False)  # killed after a checkpoint
    write_run(tmp_path, tickets[2].run, [], done=False)  # killed before its first checkpoint
    has_checkpoint = {tickets[1].run}
    monkeypatch.setattr(
        "tinylm.train.checkpoint.find_latest",
        lambda root, verify_hashes=True: root if Path(root).parent.name in has_checkpoint else None,
    )
    again = make_study(tmp_path, ["optim.lr=1e-3,2e-3,4e-3"], n_trials=3)
    resumed = again.claim(set())
    assert (resumed.number, resumed.resume, resumed.last_reported) == (1, True, -1)
    requeued = again.claim({1})
    assert requeued.number == 3 and requeued.params == tickets[2].params
    assert requeued.run.startswith("t003-")
    assert again.claim({1, 3}) is None and again.counted() == 3
    states = {t.number: t.state.name for t in again.trials()}
    assert states == {0: "COMPLETE", 1: "RUNNING", 2: "FAIL", 3: "RUNNING"}
    assert again.trials()[0].value == pytest.approx(2.0 / math.log(2))


def test_median_pruner_stops_a_losing_trial(tmp_path):
    study = make_study(tmp_path, ["optim.lr=1e-3,2e-3,4e-3"], n_trials=3, prune_startup=1,
                       prune_after=0.2)  # fmt: skip
    good = study.claim(set())
    assert not study.report(good, [(10, 2.0), (20, 1.5)], max_steps=100)  # startup: never
    write_run(tmp_path, good.run, [(10, 2.0), (20, 1.5)])
    study.finish(good, "finished", "")
    bad = study.claim(set())
    assert not study.report(bad, [(10, 9.0)], max_steps=100)  # before prune_after
    assert study.report(bad, [(10, 9.0), (20, 8.0)], max_steps=100)  # worse than the median
    assert bad.last_reported == 20
    fine = study.claim(set())
    assert not study.report(fine, [(10, 1.9), (20, 1.4)], max_steps=100)


def sweep_cmd(out: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "tinylm.cli", "sweep", "tiny", f"data.train={corpus}", *SMALL,
        "log.interval=1", "eval.interval=10", "eval.samples=0", "checkpoint.interval=10",
        "optim.warmup_steps=2", "optim.min_lr=0", "--out", str(out), *extra,
    ]  # fmt: skip


def _wait_for(predicate, proc, timeout=600):  # generous: a loaded machine is slow
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_killed_study_resumes_prunes_a_loser_and_best_yaml_trains(tmp_path, corpus):
    """SIGKILL the sweep and its trainer after the first trial's first checkpoint: the same
    command adopts that trial and resumes it from the checkpoint (no trial lost or repeated);
    the second trial (lr 1e-6) is pruned by the median pruner, stops with a checkpoint and is
    `pruned` in `tinylm runs`; best.yaml trains."""
    sw = tmp_path / "sw"
    # 200 steps, judged from step 10: the loser runs ~190 more steps after the evaluation that
    # condemns it, so the sweep (polling every 0.5 s) stops it before it finishes even on a
    # loaded machine (with 40 steps and --prune-after 0.25 it once finished first in a .ci/run).
    axes = ["optim.lr=3e-3,1e-6", "--budget-steps", "200", "--prune-startup", "1",
            "--prune-after", "0.05", "--seed", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(sweep_cmd(sw, corpus, *axes), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_for(lambda: list(sw.glob("t000-*/checkpoints/step_*")), proc)
        first = next(sw.glob("t000-*"))
        assert "lr0.003" in first.name or "lr3e-3" in first.name  # seed 1: the good one first
        trainer = next(e for e in read_metrics(first, "event") if e["event"] == "start")["pid"]
        proc.kill()
        os.kill(trainer, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(sw.glob("t001-*"))

    done = subprocess.run(sweep_cmd(sw, corpus, *axes), cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming trial 0" in done.stdout
    starts = [e for e in read_metrics(first, "event") if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["step"] > 0  # resumed from its checkpoint
    assert sorted(p.name[:4] for p in sw.glob("t*")) == ["t000", "t001"]
    summary = json.loads((sw / "summary.json").read_text())["trials"]
    assert [(t["trial"], t["status"]) for t in summary] == [(0, "finished"), (1, "pruned")]
    assert summary[0]["steps"] == 200 and 10 <= summary[1]["steps"] < 200
    loser = next(sw.glob("t001-*"))
    assert summarize(loser).status == "pruned" and list(loser.glob("checkpoints/step_*"))
    for png in ("curves", "history", "intermediate"):
        assert (sw / f"{png}.png").stat().st_size > 5_000, png

    assert run_cli("sweep", *sweep_cmd(sw, corpus, *axes)[4:]) == 0  # done: nothing runs
    assert len([e for e in read_metrics(first, "event") if e["event"] == "start"]) == 2

    best = sw / "best.yaml"
    assert "trial 0" in best.read_text()
    assert run_cli("train", best, "train.max_steps=2", f"out_dir={tmp_path}", "run_name=b") == 0
    assert read_metrics(tmp_path / "b", "train")[-1]["step"] == 2


def test_two_identical_sweeps_share_one_study(tmp_path, corpus):
    """Issue 21: two identical sweeps into one --out at once. They work one SQLite study
    together: every trial runs once, none is marked failed, each child gets half the threads."""
    sw = tmp_path / "sw"
    cmd = sweep_cmd(sw, corpus, "optim.lr=2e-3,1e-3,5e-4", "--budget-steps", "10",
                    "--parallel", "2")  # fmt: skip
    procs = [subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    summary = json.loads((sw / "summary.json").read_text())["trials"]
    assert sorted(t["trial"] for t in summary) == [0, 1, 2]
    assert sorted(t["params"]["optim.lr"] for t in summary) == ["1e-3", "2e-3", "5e-4"]
    assert {t["status"] for t in summary} == {"finished"}
    expected_threads = max(1, (os.cpu_count() or 1) // 2)
    for t in summary:
        start = [e for e in read_metrics(sw / t["name"], "event") if e["event"] == "start"]
        assert len(start) == 1 and start[0]["threads"] == expected_threads
        assert read_metrics(sw / t["name"], "train")[-1]["step"] == 10


@pytest.mark.parametrize("pruner", ["hyperband", "none"])
def test_other_pruners_take_reports(tmp_path, pruner):
    study = make_study(tmp_path, ["optim.lr=log:1e-3..1e-2"], n_trials=2, pruner=pruner,
                       prune_after=0.0)  # fmt: skip
    first = study.claim(set())
    assert 1e-3 <= float(first.params["optim.lr"]) <= 1e-2  # a TPE draw within the range
    assert not study.report(first, [(10, 2.0), (50, 1.5)], max_steps=100)
    write_run(tmp_path, first.run, [(10, 2.0), (50, 1.5)])
    study.finish(first, "finished", "")
    second = study.claim(set())
    pruned = study.report(second, [(10, 9.0), (50, 9.0)], max_steps=100)
    assert isinstance(pruned, bool) and (pruner == "hyperband" or not pruned)  # none never prunes
    assert study.trials()[0].value == pytest.approx(1.5 / math.log(2))


def test_small_studies_use_tpe_and_one_hyperband_bracket(tmp_path):
    """With Optuna's defaults a study of <= 10 trials was all random draws (TPE starts after 10)
    and Hyperband spread its trials over 5 brackets at 100 steps (min_resource=1), each bracket
    a separate study for TPE and for pruning. Now: TPE after a third of the trials, and one
    bracket per 10 trials: a 2-trial study has one bracket, and prunes its loser at the rung."""
    assert [tpe_startup_trials(n) for n in (4, 6, 12, 30, 100)] == [2, 2, 4, 10, 10]
    study = make_study(tmp_path, ["optim.lr=log:1e-3..1e-2"], n_trials=2, pruner="hyperband",
                       prune_after=0.0)  # fmt: skip
    assert study.study.sampler._n_startup_trials == 2
    first = study.claim(set())
    assert not study.report(first, [(10, 2.0), (50, 1.5)], max_steps=100)
    write_run(tmp_path, first.run, [(10, 2.0), (50, 1.5)])
    study.finish(first, "finished", "")
    second = study.claim(set())
    assert not study.report(second, [(10, 9.0)], max_steps=100)  # before the rung: no verdict
    assert study.report(second, [(10, 9.0), (50, 9.0)], max_steps=100)  # past it, and losing
    assert study.study.pruner._n_brackets == 1  # Optuna's attribute: set once it has judged


def test_pruning_chances_count_the_evaluations_the_pruner_can_act_on():
    """`tinylm sweep` notes an eval.interval that leaves the pruner < 2 evaluations to act on."""
    assert pruning_chances(300, 250, 0.25) == 1  # tiny's interval at a 300-step budget: 250 only
    assert pruning_chances(300, 30, 0.25) == 7  # 90, 120, ..., 270 (300 is the end)
    assert pruning_chances(100, 10, 0.0) == 9
    assert pruning_chances(8, 4, 0.25) == 1
    assert pruning_chances(100, 0, 0.25) == pruning_chances(100, 100, 0.25) == 0
