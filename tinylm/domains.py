"""Declared value domains of config fields: a range per numeric field, checked generically.

A config field declares where it is defined what values it accepts:

    batch_size: int = ranged(32, ge=1, le=65536)
    n_kv_head: int | None = ranged(None, ge=1, le=1024, none="n_head (multi-head)")

`ranged` is `dataclasses.field` with a `Domain` in its metadata. `config.validate()` walks every
field of the tree and asks each domain for its `problem(value)`, so a new field is checked by
declaring it, and `numeric_fields_without_domain()` lets a test fail for a numeric field that
declares nothing. Every numeric domain is finite (NaN and infinity are never a setting) and has
an upper bound: a huge value is a typo, and for sizes it would be a runaway allocation.

This module imports nothing from tinylm (config.py imports it), and no torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

DOMAIN_KEY = "tinylm_domain"
# auto | cpu | cuda | cuda:N | mps | xpu[:N] | xla: the devices torch names and tinylm can run on.
DEVICE_RE = re.compile(r"auto|cpu|mps|xla|(cuda|xpu)(:\d{1,3})?")


def is_device(text: str) -> bool:
    """True for a device name (train.device, --device)."""
    return DEVICE_RE.fullmatch(text) is not None


@dataclass(frozen=True)
class Domain:
    """Allowed values of one numeric field: bounds (inclusive ge/le, exclusive gt/lt), and what
    None means when the field may be None (`none=None`: None is not allowed)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    none: str | None = None  # meaning of None, shown in messages; None = not allowed
    note: str = ""  # meaning of special values (e.g. "0 = off"), shown in messages

    def describe(self, integer: bool) -> str:
        """E.g. 'an integer in [1, 65536]' or 'a number in (0, 1)'."""
        lo = "[" + _fmt(self.ge) if self.ge is not None else "(" + _fmt(self.gt)
        hi = _fmt(self.le) + "]" if self.le is not None else _fmt(self.lt) + ")"
        text = f"{'an integer' if integer else 'a finite number'} in {lo}, {hi}"
        if self.note:
            text += f" ({self.note})"
        if self.none is not None:
            text += f", or null ({self.none})"
        return text

    def problem(self, value: Any, integer: bool) -> str | None:
        """Why `value` is outside the domain, or None when it is inside."""
        if value is None:
            return None if self.none is not None else "null is not allowed"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        if not math.isfinite(value):
            return "not a finite number"
        if self.ge is not None and not value >= self.ge:
            return "too small"
        if self.gt is not None and not value > self.gt:
            return "too small"
        if self.le is not None and not value <= self.le:
            return "too large"
        if self.lt is not None and not value < self.lt:
            return "too large"
        return None


def _fmt(x: float | None) -> str:
    if x is None:
        return "?"
    if float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:g}"


def ranged(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    none: str | None = None,
    note: str = "",
) -> Any:
    """A dataclass field with a declared domain: exactly one lower and one upper bound."""
    if (ge is None) == (gt is None) or (le is None) == (lt is None):
        raise TypeError("ranged() needs exactly one of ge/gt and exactly one of le/lt")
    domain = Domain(ge=ge, gt=gt, le=le, lt=lt, none=none, note=note)
    return dataclasses.field(default=default, metadata={DOMAIN_KEY: domain})


def field_domain(f: dataclasses.Field) -> Domain | None:
    """The domain a field declares, or None."""
    return f.metadata.get(DOMAIN_KEY)


def numeric_kind(tp: Any) -> str | None:
    """'int' or 'float' for an int/float annotation (also `X | None`), else None (bool: None)."""
    if tp is bool:
        return None
    if tp in (int, float):
        return tp.__name__
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        kinds = {
            numeric_kind(a)
            for a in typing.get_args(tp)
            if a is not type(None) and typing.get_origin(a) is not typing.Literal  # int | "auto"
        }
        if len(kinds) == 1:
            return kinds.pop()
    return None


def walk_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every leaf field of a dataclass tree as (dotted key, field, annotation); lists of
    sections appear as `key[]`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += walk_fields(tp, f"{key}.")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out += walk_fields(typing.get_args(tp)[0], f"{key}[].")
        else:
            out.append((key, f, tp))
    return out


def numeric_fields_without_domain(cls: type) -> list[str]:
    """Dotted keys of numeric fields that declare no domain (a test keeps this empty)."""
    return [key for key, f, tp in walk_fields(cls) if numeric_kind(tp) and field_domain(f) is None]
