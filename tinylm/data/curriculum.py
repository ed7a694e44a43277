"""Data curricula: mixture weights that change over a run (`data.phases`).

A curriculum is a list of phases `(until, weights)`: phase i is used for the steps from the end
of phase i-1 up to `round(until * total_steps)`, drawing each row's source with `weights` (one per
training source, 0 = not read). The phase of a step is arithmetic on the step number, so the
loader's batches stay a pure function of `(seed, rank, step, micro)` and a run resumed in the
middle of a phase continues the exact data stream. `total_steps` follows `train.max_steps`,
including a count fitted to a time budget (the trainer updates it; the fitted count is saved
with the run's config, so a resume places the phases where the run did).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tinylm.data.errors import DataError


class Curriculum:
    """Which mixture each step uses (module docstring)."""

    def __init__(
        self, phases: Sequence[tuple[float, Sequence[float]]], total_steps: int, n_sources: int
    ) -> None:
        if not phases:
            raise DataError("a curriculum needs at least one phase")
        probs = []
        for i, (_, weights) in enumerate(phases):
            w = np.asarray(weights, dtype=np.float64)
            if len(w) != n_sources or not np.all(np.isfinite(w) & (w >= 0)) or w.sum() <= 0:
                raise DataError(
                    f"data.phases[{i}].weights={list(weights)}: need {n_sources} weights >= 0, "
                    "at least one positive"
                )
            probs.append(w / w.sum())
        self.fractions = [float(until) for until, _ in phases]
        self.phase_probs = probs
        self.total_steps = total_steps

    def ends(self) -> list[int]:
        """The step at which each phase ends (the last one: total_steps)."""
        return [round(f * self.total_steps) for f in self.fractions[:-1]] + [self.total_steps]

    def index(self, step: int) -> int:
        """The phase (0-based) of the step that starts at `step` (0-based, as the loader's)."""
        for i, end in enumerate(self.ends()):
            if step < end:
                return i
        return len(self.fractions) - 1

    def probs(self, step: int) -> np.ndarray:
        return self.phase_probs[self.index(step)]

    def label(self, step: int) -> str:
        """`phase 2/3` for the console line."""
        return f"phase {self.index(step) + 1}/{len(self.fractions)}"


def curriculum_of(cfg: Any) -> Curriculum | None:
    """The curriculum a run's config (`data.phases`, `data.mix`) describes, or None."""
    phases = cfg.data.phases
    if not phases:
        return None
    steps = [(p.until, p.weights) for p in phases]
    return Curriculum(steps, cfg.train.max_steps, len(cfg.data.mix))
