"""The search space of a sweep, from its command-line overrides.

An override is an axis when its value has one of these forms; any other override is fixed for
every trial (`train.batch_size=16`, `model.d_ff=[1, 2]` is one value):

  key=log:a..b       float in [a, b], sampled on a log scale     optim.lr=log:3e-4..1e-2
  key=a..b           float in [a, b], uniform                    model.dropout=0..0.2
  key=int:a..b       integer in [a, b], uniform                  model.n_layer=int:2..6
  key=choice:a,b,c   one of the values                           model.d_model=choice:96,128
  key=a,b,c          a grid axis (a comma outside brackets)      optim.warmup_steps=50,100

Grid axes and choices are categorical values for the TPE and random samplers; `--sampler grid`
takes every combination of them (ranges have no grid and are refused there). Values stay the
strings the user wrote (a choice of `96` is the override `model.d_model=96`), so a trial's
overrides are exactly what `tinylm train` would be given.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from tinylm.config import ConfigError, parse_override

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"^({_NUMBER})\.\.({_NUMBER})$")
# Grid axes are as many runs as their product; beyond this it is a typo, not a plan.
MAX_GRID = 100_000


@dataclass
class Axis:
    """One searched config key: `kind` float | int | choice | grid."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    values: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.kind in ("choice", "grid"):
            return ",".join(self.values)
        prefix = {"float": "log:" if self.log else "", "int": "int:"}[self.kind]
        return f"{prefix}{self.low:g}..{self.high:g}"

    def suggest(self, trial: Any) -> str:
        """Ask an Optuna trial for this axis's value; returned as the override's text."""
        if self.kind == "float":
            return repr(float(trial.suggest_float(self.key, self.low, self.high, log=self.log)))
        if self.kind == "int":
            return str(int(trial.suggest_int(self.key, int(self.low), int(self.high))))
        return str(trial.suggest_categorical(self.key, list(self.values)))


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


def _range(key: str, text: str, raw: str) -> tuple[float, float]:
    match = _RANGE.match(text.strip())
    if not match:
        raise ConfigError(f"sweep axis '{key}={raw}': expected a range a..b (e.g. 1e-4..1e-2)")
    low, high = float(match.group(1)), float(match.group(2))
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"sweep axis '{key}={raw}': the range needs finite a < b")
    return low, high


def _values(key: str, raw: str, values: list[str]) -> list[str]:
    if any(v == "" for v in values) or len(set(values)) < len(values):
        raise ConfigError(f"sweep axis '{key}={raw}': values must be non-empty and distinct")
    return values


def parse_axis(key: str, raw: str) -> Axis | None:
    """The axis `key=raw` describes, or None when it is a fixed value."""
    if raw.startswith("log:"):
        low, high = _range(key, raw[4:], raw)
        if low <= 0:
            raise ConfigError(f"sweep axis '{key}={raw}': a log range needs a > 0")
        return Axis(key, "float", low, high, log=True)
    if raw.startswith("int:"):
        low, high = _range(key, raw[4:], raw)
        if low != int(low) or high != int(high):
            raise ConfigError(f"sweep axis '{key}={raw}': an int range needs whole numbers")
        return Axis(key, "int", low, high)
    if raw.startswith("choice:"):
        values = _values(key, raw, split_values(raw[7:]))
        return Axis(key, "choice", values=values)
    if _RANGE.match(raw.strip()):
        low, high = _range(key, raw, raw)
        return Axis(key, "float", low, high)
    values = split_values(raw)
    if len(values) > 1:
        return Axis(key, "grid", values=_values(key, raw, values))
    return None


def parse_space(overrides: list[str]) -> tuple[list[Axis], list[str]]:
    """Split overrides into axes (in the order given) and fixed overrides."""
    axes: list[Axis] = []
    fixed: list[str] = []
    for text in overrides:
        parse_override(text)  # the form `section.key=value`, or a ConfigError saying so
        key, raw = (s.strip() for s in text.split("=", 1))
        axis = parse_axis(key, raw)
        if axis is None:
            fixed.append(f"{key}={raw}")
            continue
        if any(a.key == key for a in axes):
            raise ConfigError(f"sweep axis '{key}' is given twice; list all its values once")
        axes.append(axis)
    fixed_keys = {f.split("=", 1)[0] for f in fixed}
    if both := fixed_keys & {a.key for a in axes}:
        raise ConfigError(f"'{sorted(both)[0]}' is both a sweep axis and a fixed override")
    return axes, fixed


def grid_space(axes: list[Axis]) -> dict[str, list[str]]:
    """The grid sampler's search space (every axis must be a list of values)."""
    ranges = [a.key for a in axes if a.kind not in ("grid", "choice")]
    if ranges:
        raise ConfigError(
            f"--sampler grid needs lists of values; '{ranges[0]}' is a range: give values "
            "(key=a,b,c) or use --sampler tpe|random"
        )
    return {a.key: list(a.values) for a in axes}


def grid_size(axes: list[Axis]) -> int:
    """Points in the grid of the list axes (ranges excluded)."""
    return math.prod(len(a.values) for a in axes if a.kind in ("grid", "choice"))


def expand_grid(axes: list[Axis]) -> list[dict[str, str]]:
    """Every combination of the list axes, the first varying slowest."""
    lists = [a for a in axes if a.kind in ("grid", "choice")]
    keys = [a.key for a in lists]
    return [dict(zip(keys, c, strict=True)) for c in itertools.product(*(a.values for a in lists))]


def axes_identity(axes: list[Axis]) -> list[dict[str, Any]]:
    """The axes as plain data (what makes two sweeps the same)."""
    return [asdict(a) for a in axes]
