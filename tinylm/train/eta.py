"""The time a run has left, from its recent pace: steps, evaluations and checkpoints apart.

The old ETA averaged the whole session, slow start included (quickstart on a busy 2-core
machine: 27.1 min predicted at step 50, 5.7 min actual). Here the step time is the mean of the
last `WINDOW` log intervals (steps only: the time spent evaluating and checkpointing is measured
on its own), so a slowdown that ends leaves the estimate within `WINDOW` intervals; each
evaluation and checkpoint still to come is counted at the cost of the last one of its kind.
"""

from __future__ import annotations

from collections import deque

WINDOW = 3  # log intervals of step time in the estimate (a slowdown is forgotten after 3)


def events_between(step: int, max_steps: int, interval: int) -> int:
    """How many multiples of `interval` lie in (step, max_steps] (0 when interval is 0)."""
    return max_steps // interval - step // interval if interval > 0 and max_steps > step else 0


class EtaEstimator:
    """Seconds left in a run; fed per log interval (`steps`) and per evaluation/checkpoint."""

    def __init__(self, max_steps: int, *, eval_interval: int, checkpoint_interval: int) -> None:
        self.max_steps = max_steps
        self.eval_interval, self.checkpoint_interval = eval_interval, checkpoint_interval
        self.window: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self.cost: dict[str, float] = {}  # the last evaluation's / checkpoint's seconds

    def steps(self, count: int, seconds: float) -> None:
        """An interval of `count` steps that took `seconds` of stepping (no evals or saves)."""
        if count > 0:
            self.window.append((count, max(0.0, seconds)))

    def overhead(self, kind: str, seconds: float) -> None:
        """An evaluation ('eval') or checkpoint ('checkpoint') that took `seconds`."""
        self.cost[kind] = seconds

    def seconds_per_step(self) -> float | None:
        steps = sum(n for n, _ in self.window)
        return sum(s for _, s in self.window) / steps if steps else None

    def remaining(self, step: int) -> float | None:
        """Seconds left after `step`, or None before the first interval."""
        per_step = self.seconds_per_step()
        if per_step is None:
            return None
        left = max(0, self.max_steps - step) * per_step
        # The final evaluation and checkpoint happen whatever the intervals.
        evals = events_between(step, self.max_steps, self.eval_interval)
        evals += self.max_steps > step and (
            self.eval_interval == 0 or self.max_steps % self.eval_interval != 0
        )
        saves = events_between(step, self.max_steps, self.checkpoint_interval)
        saves += self.max_steps > step and (
            self.checkpoint_interval == 0 or self.max_steps % self.checkpoint_interval != 0
        )
        return left + evals * self.cost.get("eval", 0.0) + saves * self.cost.get("checkpoint", 0.0)
