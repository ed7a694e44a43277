"""What a sweep is: its preset, search space, fixed overrides, per-trial budget, sampler and
pruner; the name and overrides of each trial's run; and the manifest that identifies the sweep.

Budgets make trials comparable: `steps` sets train.max_steps; `tokens` sets train.max_steps to
ceil(tokens / tokens per step) of each trial's own config (so a batch-size axis sees equal
tokens); `minutes` sets train.max_time_minutes and train.fit_steps_to_time (each run times its
first steps and fits its step count, so its LR schedule ends when its time does).

`sweep.json` (written atomically once, when the sweep is created) holds the sweep's identity and
where its study lives; the trials themselves live in the Optuna study (`study.db`). Re-running
the same command finds the manifest (the default directory is named after a hash of the
identity) and continues the study; a different sweep in the same directory is refused, naming
what differs. Everything read back (the manifest, run names stored in the study) is checked
before use: a run name is one plain directory name inside the sweep, never a path.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinylm.config import ConfigError, load_config, resolve_preset
from tinylm.fileio import atomic_write_text, confined
from tinylm.sweep.space import Axis, axes_identity, grid_size, parse_space

MANIFEST = "sweep.json"
FORMAT = "tinylm-sweep"
VERSION = 2
BUDGET_KINDS = ("steps", "tokens", "minutes")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
# Statuses of a trial in tables and summary.json.
FINISHED, PRUNED, ABANDONED, FAILED, RUNNING, PENDING = (
    "finished",
    "pruned",
    "abandoned",
    "failed",
    "running",
    "pending",
)
_NAME_OK = re.compile(r"^[A-Za-z0-9._=+-]{1,160}$")


@dataclass
class Budget:
    kind: str | None = None  # steps | tokens | minutes | None (the preset's own max_steps)
    value: float = 0.0

    def overrides(self, cfg: Any) -> list[str]:
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
class SweepSpec:
    """A sweep's identity: two commands with equal specs are the same sweep."""

    preset: str
    axes: list[Axis]
    fixed: list[str]
    budget: Budget = field(default_factory=Budget)
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0

    def identity(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "axes": axes_identity(self.axes),
            "fixed": self.fixed,
            "budget": asdict(self.budget),
            "sampler": self.sampler,
            "pruner": self.pruner,
            "seed": self.seed,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]

    def default_dir(self) -> Path:
        return Path("sweeps") / f"{Path(self.preset).stem}-{self.digest()}"

    def study_name(self) -> str:
        """One name per sweep, so that a shared `--storage` database can hold many sweeps."""
        return f"tinylm-{Path(self.preset).stem}-{self.digest()}"

    def trial_overrides(self, params: dict[str, str]) -> list[str]:
        """Everything passed to `tinylm train PRESET ...` for a trial (not out_dir/run_name)."""
        base = self.fixed + [f"{a.key}={params[a.key]}" for a in self.axes]
        return base + self.budget.overrides(load_config(self.preset, base))


def build_spec(
    preset: str,
    overrides: list[str],
    *,
    budget: Budget | None = None,
    sampler: str | None = None,
    pruner: str = "median",
    seed: int = 0,
) -> SweepSpec:
    """The sweep `tinylm sweep PRESET OVERRIDES...` describes, its configs checked now.

    `sampler=None` picks grid when every axis is a list of values, else TPE. Each axis value (list
    values and both ends of a range) is loaded with the other axes at their first value, so a
    config that cannot exist is refused before any training, naming the axis value.
    """
    resolve_preset(preset)
    budget = budget or Budget()
    if budget.kind is not None and (
        budget.kind not in BUDGET_KINDS or not 0 < budget.value < math.inf
    ):
        raise ConfigError(
            f"sweep budget: {budget.kind}={budget.value} must be a positive number of "
            f"{' / '.join(BUDGET_KINDS)}"
        )
    axes, fixed = parse_space(overrides)
    if not axes:
        raise ConfigError(
            "a sweep needs at least one axis: key=v1,v2, key=log:a..b, key=int:a..b or "
            "key=choice:a,b (e.g. optim.lr=log:1e-4..1e-2)"
        )
    if sampler is None:
        sampler = "grid" if all(a.kind in ("grid", "choice") for a in axes) else "tpe"
    if sampler not in SAMPLERS or pruner not in PRUNERS:
        raise ConfigError(f"--sampler is one of {SAMPLERS}, --pruner one of {PRUNERS}")
    spec = SweepSpec(preset, axes, fixed, budget, sampler, pruner, seed)
    if sampler == "grid":
        from tinylm.sweep.space import grid_space

        grid_space(axes)  # ranges refused here
    first = {a.key: axis_ends(a)[0] for a in axes}
    for axis in axes:
        for value in axis_ends(axis):
            params = {**first, axis.key: value}
            try:
                load_config(preset, spec.trial_overrides(params))
            except ConfigError as e:
                raise ConfigError(f"sweep value {axis.key}={value}: {e}") from None
    return spec


def axis_ends(axis: Axis) -> list[str]:
    if axis.kind in ("grid", "choice"):
        return list(axis.values)
    if axis.kind == "int":
        return [str(int(axis.low)), str(int(axis.high))]
    return [repr(axis.low), repr(axis.high)]


def default_trials(spec: SweepSpec, trials: int | None) -> int:
    """How many trials the study runs: `--trials`, or the whole grid for the grid sampler."""
    size = grid_size(spec.axes)
    if spec.sampler == "grid":
        return size if trials is None else min(trials, size)
    if trials is None:
        raise ConfigError(f"--sampler {spec.sampler} needs --trials N (how many runs to try)")
    return trials


def run_name(number: int, spec: SweepSpec, params: dict[str, str]) -> str:
    """`t003-lr0.00123-d_model128`: the trial number keeps names unique and in trial order."""
    parts = []
    for axis in spec.axes:
        value = params[axis.key]
        if axis.kind == "float":
            value = f"{float(value):.3g}"
        parts.append(f"{axis.key.rsplit('.', 1)[-1]}{value}")
    name = "-".join([f"t{number:03d}", *parts])
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)[:120]


def run_dir(out_dir: Path, name: object, source: str) -> Path:
    """`out_dir/name` for a run name read from `source`, refused unless it is one plain name."""
    path = confined(out_dir, name, source, ConfigError)
    if not _NAME_OK.match(str(name)):
        raise ConfigError(
            f"{source}: run name {name!r} is not a sweep run name (letters, digits, ._=+-); "
            "the study was edited or is not tinylm's"
        )
    return path


def save_manifest(spec: SweepSpec, out_dir: Path, storage: str) -> None:
    """Write `out_dir/sweep.json` (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "format": FORMAT,
        "version": VERSION,
        "study": spec.study_name(),
        "storage": storage,
        "identity": spec.identity(),
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(data, indent=1))


def load_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest saved in `out_dir` (checked), or None when there is none."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(
            f"{path} is not readable JSON ({e}); move it away to start over"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a tinylm sweep manifest; choose another --out")
    if data.get("version") != VERSION:
        raise ConfigError(
            f"{path} was written by another version of tinylm sweep (format "
            f"{data.get('version')!r}, this one reads {VERSION}); choose another --out"
        )
    ok = (
        isinstance(data.get("identity"), dict)
        and isinstance(data.get("study"), str)
        and isinstance(data.get("storage"), str)
    )
    if not ok:
        raise ConfigError(f"{path}: missing or malformed fields; move it away to start over")
    return data


def check_same_sweep(spec: SweepSpec, saved: dict[str, Any] | None, out_dir: Path) -> None:
    """Refuse to continue a different sweep in `out_dir` (naming what differs)."""
    if saved is None:
        return
    new, old = spec.identity(), saved["identity"]
    if new != old:
        diffs = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if new[k] != old.get(k)]
        raise ConfigError(
            f"{out_dir} holds a different sweep ({'; '.join(diffs)}); re-run the original "
            "command to continue it, or choose another --out"
        )
