"""What a sweep runs: axes from `key=v1,v2` overrides, the grid or a seeded random sample of it,
the equal budget each run gets, run names, and the manifest that makes a sweep resumable.

An override whose value has a comma outside brackets is an axis (`optim.lr=1e-3,2e-3`); the
others are fixed for every run (`train.batch_size=16`, `model.d_ff=[1, 2]` is one value). Each
point of the grid is a normal run directory `OUT/<NN>-<leaf><value>...` (`00-lr0.001-d_model128`).

Budgets make runs comparable: `steps` sets train.max_steps; `tokens` sets train.max_steps to
ceil(tokens / tokens per step) of each run's own config (so a batch-size axis sees equal tokens);
`minutes` sets train.max_time_minutes and train.fit_steps_to_time (each run times its first steps
and fits its step count, so its LR schedule ends when its time does: train/time_budget.py).

`sweep.json` (written atomically) holds the plan and each run's status. Re-running the same command
finds it (the default directory is named after a hash of the plan) and continues; a different plan
in the same directory is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinylm.config import ConfigError, load_config, parse_override, resolve_preset
from tinylm.fileio import atomic_write_text

MANIFEST = "sweep.json"
FORMAT = "tinylm-sweep"
BUDGET_KINDS = ("steps", "tokens", "minutes")
# Statuses a run can have in the manifest; the first two are final (a re-run skips them).
FINISHED, ABANDONED, PENDING, FAILED = "finished", "abandoned", "pending", "failed"


def split_values(raw: str) -> list[str]:
    """`a,b,[c, d]` -> ['a', 'b', '[c, d]']: commas inside brackets or braces do not split."""
    parts, depth, current = [], 0, ""
    for char in raw:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return parts


def parse_axes(overrides: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split overrides into axes (key -> raw values, in the order given) and fixed overrides."""
    axes: dict[str, list[str]] = {}
    fixed: list[str] = []
    for text in overrides:
        parse_override(text)  # the form `section.key=value`, or a ConfigError saying so
        key, raw = (s.strip() for s in text.split("=", 1))
        values = split_values(raw)
        if len(values) == 1:
            fixed.append(f"{key}={raw}")
            continue
        if key in axes:
            raise ConfigError(f"sweep axis '{key}' is given twice; list all its values once")
        if any(v == "" for v in values) or len(set(values)) < len(values):
            raise ConfigError(f"sweep axis '{key}={raw}': values must be non-empty and distinct")
        axes[key] = values
    fixed_keys = {f.split("=", 1)[0] for f in fixed}
    if both := fixed_keys & set(axes):
        raise ConfigError(f"'{sorted(both)[0]}' is both a sweep axis and a fixed override")
    return axes, fixed


def expand_grid(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination, the first axis varying slowest: [{key: raw value, ...}, ...]."""
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes.values())]


def sample_points(grid: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """`n` distinct grid points drawn with `seed` (the whole grid when n >= its size), in grid order."""
    if n <= 0 or n >= len(grid):
        return list(grid)
    picked = random.Random(seed).sample(range(len(grid)), n)
    return [grid[i] for i in sorted(picked)]


def run_name(index: int, point: dict[str, str]) -> str:
    """`03-lr0.002-d_model192`: the index keeps names unique and sorted in plan order."""
    parts = [f"{key.rsplit('.', 1)[-1]}{value}" for key, value in point.items()]
    name = "-".join([f"{index:02d}", *parts])
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)[:120]


@dataclass
class Budget:
    kind: str | None = None  # steps | tokens | minutes | None (the preset's own max_steps)
    value: float = 0.0

    def overrides(self, cfg) -> list[str]:
        """The train.* overrides that give the run `cfg` this budget."""
        if self.kind == "steps":
            return [f"train.max_steps={int(self.value)}"]
        if self.kind == "tokens":
            t = cfg.train
            per_step = t.batch_size * t.grad_accum * cfg.model.context_length
            return [f"train.max_steps={max(1, math.ceil(self.value / per_step))}"]
        if self.kind == "minutes":
            return [f"train.max_time_minutes={self.value:g}", "train.fit_steps_to_time=true"]
        return []


@dataclass
class PlannedRun:
    name: str
    params: dict[str, str]  # axis key -> raw value
    overrides: list[str]  # everything passed to `tinylm train PRESET ...` (not out_dir/run_name)
    status: str = PENDING
    reason: str = ""


@dataclass
class SweepPlan:
    preset: str
    axes: dict[str, list[str]]
    fixed: list[str]
    random: int = 0
    seed: int = 0
    budget: Budget = field(default_factory=Budget)
    runs: list[PlannedRun] = field(default_factory=list)

    def identity(self) -> dict[str, Any]:
        """What makes two invocations the same sweep (statuses and run details excluded)."""
        return {
            "preset": self.preset,
            "axes": self.axes,
            "fixed": self.fixed,
            "random": self.random,
            "seed": self.seed,
            "budget": asdict(self.budget),
        }

    def default_dir(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()
        return Path("sweeps") / f"{Path(self.preset).stem}-{digest[:8]}"


def build_plan(
    preset: str,
    overrides: list[str],
    *,
    random_samples: int = 0,
    seed: int = 0,
    budget: Budget | None = None,
) -> SweepPlan:
    """The runs of a sweep, each config loaded and validated now (errors name the run)."""
    resolve_preset(preset)
    budget = budget or Budget()
    if budget.kind is not None and (budget.kind not in BUDGET_KINDS or budget.value <= 0):
        raise ConfigError(
            f"sweep budget: {budget.kind}={budget.value} must be a positive number of "
            f"{' / '.join(BUDGET_KINDS)}"
        )
    axes, fixed = parse_axes(overrides)
    if not axes:
        raise ConfigError(
            "a sweep needs at least one axis: key=v1,v2 (e.g. optim.lr=1e-3,2e-3,4e-3)"
        )
    if random_samples < 0:
        raise ConfigError(f"--random must be >= 0, got {random_samples}")
    points = sample_points(expand_grid(axes), random_samples, seed)
    plan = SweepPlan(preset, axes, fixed, random_samples, seed, budget)
    for index, point in enumerate(points):
        name = run_name(index, point)
        base = fixed + [f"{k}={v}" for k, v in point.items()]
        try:
            cfg = load_config(preset, base)
            extra = budget.overrides(cfg)
            load_config(preset, base + extra)
        except ConfigError as e:
            raise ConfigError(f"sweep run {name}: {e}") from None
        plan.runs.append(PlannedRun(name, point, base + extra))
    return plan


def save_manifest(plan: SweepPlan, out_dir: Path) -> None:
    """Write `out_dir/sweep.json` atomically (a copy renamed over the old one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": 1, **asdict(plan)}
    atomic_write_text(out_dir / MANIFEST, json.dumps(data, indent=1))


def load_manifest(out_dir: Path) -> SweepPlan | None:
    """The plan saved in `out_dir`, or None when there is none."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); move it away to start over") from None
    if data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a tinylm sweep manifest")
    runs = [PlannedRun(**r) for r in data.pop("runs")]
    budget = Budget(**data.pop("budget"))
    for key in ("format", "version"):
        data.pop(key)
    return SweepPlan(**data, budget=budget, runs=runs)


def reconcile(plan: SweepPlan, saved: SweepPlan | None, out_dir: Path) -> SweepPlan:
    """The plan to run: `plan` with the statuses from `saved` (the same sweep, resumed)."""
    if saved is None:
        return plan
    new, old = plan.identity(), saved.identity()
    if new != old:
        diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if new[k] != old[k]]
        raise ConfigError(
            f"{out_dir} holds a different sweep ({'; '.join(diffs)}); re-run the original "
            "command to continue it, or choose another --out"
        )
    plan.runs = saved.runs
    return plan
