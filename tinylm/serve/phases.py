"""A run's curriculum (`data.phases`) for the dashboard: the current phase, each phase's mixture
and steps.

Everything comes from the run's own files: the phases, the `data.mix` sources and the step count
from its config.yaml (a count fitted to a time budget is saved there, so the phases sit where the
run put them: data/curriculum.py), the current phase from its newest train record (`phase`,
1-based, written by train/monitor.py for the interval's last step). Steps are the 1-based steps
of the train records (the x of the loss chart): a phase ending at loader step `end` covers the
records `start + 1 .. end`, and the chart marks the boundary at `end`.

A run without phases, or whose config cannot be read, has no curriculum (`None`): the page shows
"-". The parsed config is kept per (path, mtime, size), so a page polling every few seconds reads
each run's config.yaml once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinylm.config import ConfigError, load_config_file
from tinylm.data.curriculum import curriculum_of
from tinylm.data.errors import DataError
from tinylm.data.resolve import mix_names

_cache: dict[str, tuple[tuple[int, int], dict[str, Any] | None]] = {}


def _schedule(config_file: Path) -> dict[str, Any] | None:
    """The phases of the run whose config this is (no current phase), or None."""
    try:
        st = config_file.stat()
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _cache.get(str(config_file))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        cfg = load_config_file(config_file)
        curriculum = curriculum_of(cfg)
    except (ConfigError, DataError, OSError):
        curriculum = None
    schedule = None
    if curriculum is not None:
        names = mix_names(cfg.data.mix)
        phases, start = [], 0
        for i, (end, probs) in enumerate(
            zip(curriculum.ends(), curriculum.phase_probs, strict=True)
        ):
            weights = {name: round(float(p), 6) for name, p in zip(names, probs, strict=True)}
            phases.append({"index": i + 1, "first": start + 1, "last": end, "weights": weights})
            start = end
        schedule = {"count": len(phases), "phases": phases}
    _cache[str(config_file)] = (stamp, schedule)
    return schedule


def run_phases(run_dir: Path, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`{count, current, phases: [{index, first, last, weights: {source: share}}]}` or None.

    `current` is the phase of the newest train record; 1 before the first one.
    """
    schedule = _schedule(run_dir / "config.yaml")
    if schedule is None:
        return None
    current = next(
        (
            r["phase"]
            for r in reversed(records)
            if r.get("kind") == "train" and isinstance(r.get("phase"), int)
        ),
        1,
    )
    return {**schedule, "current": min(max(current, 1), schedule["count"])}
