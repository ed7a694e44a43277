"""train.fit_steps_to_time: the step count fitted to the time limit, so the schedule ends in time."""

from __future__ import annotations

import pytest
import yaml
from helpers import SMALL, records, run_cli

from tinylm.config import ConfigError, load_config
from tinylm.train import checkpoint, optim
from tinylm.train.time_budget import (
    CALIBRATE_AT,
    REFIT_UNTIL,
    SAFETY_MARGIN,
    SKIP_STEPS,
    StepTimer,
    eval_fraction,
    fit_steps,
)


def test_fit_counts_spent_time_evaluations_and_margin():
    no_eval = fit_steps(
        step=23, elapsed_seconds=5.0, seconds_per_step=0.1, budget_seconds=60.0,
        eval_share=eval_fraction(tokens_per_step=1000, eval_interval=0, eval_tokens=0),
    )  # fmt: skip
    # 60 s less the margin, less the 5 s spent, at 0.1 s a step, after the 23 steps done
    assert no_eval.max_steps == 23 + int((60 * (1 - SAFETY_MARGIN) - 5.0) / 0.1)
    with_eval = fit_steps(
        step=23, elapsed_seconds=5.0, seconds_per_step=0.1, budget_seconds=60.0,
        eval_share=eval_fraction(tokens_per_step=1000, eval_interval=10, eval_tokens=3000),
    )  # fmt: skip
    # an evaluation of 3 steps' tokens costs one step (forward only): 10% on top of 10 steps
    assert with_eval.eval_fraction == pytest.approx(0.1)
    assert with_eval.max_steps == 23 + int((60 * (1 - SAFETY_MARGIN) - 5.0) / 0.11)
    late = fit_steps(
        step=23, elapsed_seconds=70.0, seconds_per_step=0.1, budget_seconds=60.0,
        eval_share=eval_fraction(tokens_per_step=1000, eval_interval=0, eval_tokens=0),
    )  # fmt: skip
    assert late.max_steps == 23  # the time is already spent: stop at once, never fewer steps
    assert "train.max_steps 1000 -> 23" in late.message(1000)


def test_timer_measures_after_the_first_steps_and_fits_once():
    timer = StepTimer(100.0, eval_share=0.0)
    fits = []
    for step in range(1, CALIBRATE_AT + 5):
        # the first steps are slow (compilation), the others take 0.2 s
        elapsed = 30.0 * min(step, SKIP_STEPS) + 0.2 * max(0, step - SKIP_STEPS)
        fits.append((step, timer.observe(step, elapsed)))
    done = [(s, f) for s, f in fits if f is not None]
    assert [s for s, _ in done] == [CALIBRATE_AT]
    fit = done[0][1]
    assert fit.seconds_per_step == pytest.approx(0.2)  # the slow steps are not the step time
    spent = 30.0 * SKIP_STEPS + 0.2 * (CALIBRATE_AT - SKIP_STEPS)
    assert fit.max_steps == CALIBRATE_AT + int((100 * (1 - SAFETY_MARGIN) - spent) / 0.2)
    # a run resumed past the first steps was fitted before: no second fit
    resumed = StepTimer(100.0, eval_share=0.0)
    assert all(resumed.observe(s, 1.0 * s) is None for s in range(SKIP_STEPS + 1, 40))


def test_refits_after_evaluations_from_the_mean_step_time_in_the_first_half():
    timer = StepTimer(100.0, eval_share=eval_fraction(1000, 50, 30000))
    for step in range(1, CALIBRATE_AT + 1):
        timer.observe(step, 0.1 * step)
    # steps got slower than the first ones (0.2 s each from here, evaluations included)
    step, elapsed = 100, 0.1 * CALIBRATE_AT + 0.2 * (100 - CALIBRATE_AT)
    fit = timer.refit(step, elapsed)
    mean = (elapsed - 0.1 * SKIP_STEPS) / (step - SKIP_STEPS)
    assert fit.seconds_per_step == pytest.approx(mean) and fit.measured_evals
    assert fit.max_steps == step + int((100 * (1 - SAFETY_MARGIN) - elapsed) / mean)
    assert "including evaluations" in fit.message(500)
    assert timer.refit(300, REFIT_UNTIL * 100 + 1) is None  # past the first half: left as is
    unfitted = StepTimer(100.0, eval_share=eval_fraction(1000, 50, 30000))
    assert unfitted.refit(100, 10.0) is None  # resumed past the first fit: no refits either


def test_fit_needs_a_time_limit():
    with pytest.raises(ConfigError, match=r"set train\.max_time_minutes"):
        load_config("tiny", ["train.fit_steps_to_time=true"])


def test_a_fitted_run_ends_its_schedule_in_time(tmp_path, corpus):
    """The trainer fits max_steps once, writes it into config.yaml and decays to min_lr by then."""
    args = [
        f"data.train={corpus}", f"out_dir={tmp_path}", "run_name=r", "train.max_steps=1000000",
        "train.max_time_minutes=0.15", "train.fit_steps_to_time=true", "eval.interval=0",
        "log.interval=1", "checkpoint.interval=0", *SMALL,
    ]  # fmt: skip
    assert run_cli("train", "tiny", *args) == 0
    run = tmp_path / "r"
    (fit,) = [e for e in records(run, "event") if e.get("event") == "time_fit"]
    assert fit["step"] == CALIBRATE_AT and CALIBRATE_AT < fit["max_steps"] < 1000000
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == fit["max_steps"]  # what a resume reads
    train = records(run, "train")
    cfg = load_config("tiny", [a for a in args if not a.startswith(("out_dir", "run_name"))])
    cfg.train.max_steps = fit["max_steps"]
    # every logged LR follows the fitted schedule after the fit (warm-up before it is the same)
    for r in train[CALIBRATE_AT:]:
        assert r["lr"] == pytest.approx(optim.lr_at(r["step"] - 1, cfg.optim, fit["max_steps"]))
    # it decayed: the last step ran near min_lr (unless the guard cut a slowed-down run short)
    stop = [e for e in records(run, "event") if e.get("event") in ("done", "stopped")][-1]
    if stop["event"] == "done":
        assert train[-1]["step"] == fit["max_steps"]
        assert train[-1]["lr"] < 1.1 * cfg.optim.min_lr
    else:
        assert "time limit" in stop["reason"] and train[-1]["step"] > 0.7 * fit["max_steps"]


def test_a_time_limit_ends_the_run_with_an_evaluation_of_its_last_weights(tmp_path, corpus):
    """Stopped by its time limit mid-interval, a run evaluates the weights it ends with, so its
    `best` checkpoint can be them; a checkpoint between evaluations claims no val loss."""
    common = [f"data.train={corpus}", f"out_dir={tmp_path}", *SMALL, "eval.samples=0"]
    timed = [*common, "run_name=timed", "train.max_steps=50", "eval.interval=20"]
    assert run_cli("train", "tiny", *timed, "train.max_time_minutes=1e-9") == 0
    run = tmp_path / "timed"
    (stop,) = [e for e in records(run, "event") if e["event"] in ("stopped", "done")]
    assert stop["event"] == "stopped" and stop["reason"].startswith("time limit")
    assert stop["step"] == 1
    (evaluation,) = records(run, "eval")
    assert evaluation["step"] == 1
    last = checkpoint.find_latest(run / "checkpoints")
    assert checkpoint.find_best(run / "checkpoints") == last
    assert checkpoint.read_meta(last)["val_loss"] == pytest.approx(evaluation["val/loss"])

    spaced = [*common, "run_name=spaced", "train.max_steps=6", "eval.interval=4"]
    assert run_cli("train", "tiny", *spaced, "checkpoint.interval=3", "checkpoint.keep_last=9") == 0
    saved = {
        checkpoint.read_meta(p)["step"]: checkpoint.read_meta(p)["val_loss"]
        for p in checkpoint.list_checkpoints(tmp_path / "spaced" / "checkpoints")
    }
    evaluated = {r["step"]: r["val/loss"] for r in records(tmp_path / "spaced", "eval")}
    assert sorted(evaluated) == [4, 6] and saved[3] is None  # step 3's weights were never scored
    assert all(saved[s] == pytest.approx(evaluated[s]) for s in saved if s != 3)
