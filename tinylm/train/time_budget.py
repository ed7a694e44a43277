"""Fit a run's step count to its time limit, so that its LR schedule ends when the time does.

`train.max_time_minutes` alone stops a run when the time is up, wherever its schedule is: a
cosine run cut at 60% of its steps never decays its learning rate and ends worse than a shorter
schedule would have in the same minutes (measured: notes/issue-10-recipes.md). With
`train.fit_steps_to_time=true` the trainer times a few steps early in the run (after the first
ones, which include compilation and cold caches) and sets `train.max_steps` to the number of steps
that fit the rest of the time, counting the evaluations the run will make on the way. The time
limit stays in force as a guard, so a run that slows down later still stops in time.

The first fit happens at step `CALIBRATE_AT` (inside the warm-up of every preset, where the LR
does not depend on `max_steps`), from 20 timed steps and an estimate of the evaluations' cost.
Each evaluation while less than `REFIT_UNTIL` of the time is spent refits from the mean time per
step so far, evaluations included: a first fit of `tiny` in 2.3 minutes on 2 cores was 6% too
long (AdamW: 795 steps fitted, the guard stopped it at 750) or 4% too short (Muon: 568 steps
done in 126 of 134 s; notes/issue-10-recipes.md). The last fit is written into the run's config:
a resumed run keeps its step count and schedule instead of fitting again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Steps 1..SKIP include compilation and allocator/cache warm-up (the first compiled step is
# seconds to minutes): they are paid, but not taken as the step time.
SKIP_STEPS = 3
CALIBRATE_AT = 23  # 20 timed steps
# Checkpoints, sample generation and timing noise: the fitted run aims this much short of the
# limit so that its last steps (at min_lr) are not the ones the guard cuts.
SAFETY_MARGIN = 0.03
# Refits move the LR schedule a little (a cosine at step 250 of 795 -> 750 jumps by 2% of its
# range); after half the time the remaining decay is left as it is.
REFIT_UNTIL = 0.5
# An evaluation's forward pass (no backward, no optimizer) costs about a third of a training
# step per token.
EVAL_COST_PER_TOKEN = 1 / 3


@dataclass
class StepFit:
    """The fitted step count and the figures it came from (for the run's log line)."""

    max_steps: int
    seconds_per_step: float
    eval_fraction: float  # evaluation time as a share of training time (estimated)
    budget_seconds: float
    measured_evals: bool = False  # seconds_per_step includes the evaluations so far

    def message(self, previous: int) -> str:
        evals = (
            "including evaluations"
            if self.measured_evals
            else f"evaluations ~{100 * self.eval_fraction:.0f}% on top"
        )
        return (
            f"time budget {self.budget_seconds / 60:g} min: train.max_steps {previous} -> "
            f"{self.max_steps} ({1000 * self.seconds_per_step:.0f} ms/step measured, {evals}, "
            f"{100 * SAFETY_MARGIN:.0f}% margin)"
        )


def eval_fraction(tokens_per_step: int, eval_interval: int, eval_tokens: int) -> float:
    """Evaluation time as a share of training time: `eval_tokens` forward-only tokens every
    `eval_interval` steps of `tokens_per_step` (0 without periodic evaluations)."""
    if eval_interval <= 0:
        return 0.0
    return EVAL_COST_PER_TOKEN * eval_tokens / (tokens_per_step * eval_interval)


def fit_steps(
    *,
    step: int,
    elapsed_seconds: float,
    seconds_per_step: float,
    budget_seconds: float,
    eval_share: float,
) -> StepFit:
    """The total step count that fits `budget_seconds`, `elapsed_seconds` of it spent at `step`,
    each step costing `seconds_per_step` plus `eval_share` of it for evaluations."""
    left = budget_seconds * (1 - SAFETY_MARGIN) - elapsed_seconds
    more = max(0, math.floor(left / (seconds_per_step * (1 + eval_share))))
    return StepFit(step + more, seconds_per_step, eval_share, budget_seconds)


class StepTimer:
    """Times a run's steps from SKIP_STEPS on; fits its step count at CALIBRATE_AT and refits
    after evaluations in the first REFIT_UNTIL of the time."""

    def __init__(self, budget_seconds: float, eval_share: float) -> None:
        self.budget_seconds = budget_seconds
        self.eval_share = eval_share  # see `eval_fraction`
        self._t_skip: float | None = None

    def observe(self, step: int, elapsed_seconds: float) -> StepFit | None:
        """Call after each completed step; returns the fit at CALIBRATE_AT, else None."""
        if step == SKIP_STEPS:
            self._t_skip = elapsed_seconds
        if step != CALIBRATE_AT or self._t_skip is None:
            return None  # (a run resumed past SKIP_STEPS has been fitted before)
        per_step = (elapsed_seconds - self._t_skip) / (CALIBRATE_AT - SKIP_STEPS)
        return fit_steps(
            step=step,
            elapsed_seconds=elapsed_seconds,
            seconds_per_step=per_step,
            budget_seconds=self.budget_seconds,
            eval_share=self.eval_share,
        )

    def refit(self, step: int, elapsed_seconds: float) -> StepFit | None:
        """Call after an evaluation; the fit from the mean step time so far, or None when the
        run was not fitted in this session or more than REFIT_UNTIL of its time is spent."""
        if self._t_skip is None or step <= CALIBRATE_AT:
            return None
        if elapsed_seconds > REFIT_UNTIL * self.budget_seconds:
            return None
        fit = fit_steps(
            step=step,
            elapsed_seconds=elapsed_seconds,
            seconds_per_step=(elapsed_seconds - self._t_skip) / (step - SKIP_STEPS),
            budget_seconds=self.budget_seconds,
            eval_share=0.0,  # measured: the mean includes the evaluations made so far
        )
        fit.measured_evals = True
        return fit
