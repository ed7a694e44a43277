"""Argument types for every `tinylm` command: numbers with a declared range, device names.

`type=int_in(1, 64)` / `type=float_in(gt=0, le=1)` make argparse refuse a value outside the range
(NaN, infinity and huge values included) with `argument --top-p: must be a finite number in
(0, 1], got 1.5` and exit status 2, before the command runs. The ranges are the same `Domain`s
that config fields declare (tinylm/domains.py), so a flag and its config twin read alike.

No torch here: argument errors stay instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from tinylm.domains import Domain, is_device


def _number_type(kind: type, domain: Domain, integer: bool) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = float(text) if not integer else int(text)
        except ValueError:
            # `--max-new-tokens 1e3`: say what was expected rather than "invalid int value".
            raise argparse.ArgumentTypeError(
                f"must be {domain.describe(integer)}, got {text!r}"
            ) from None
        problem = domain.problem(value, integer)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"must be {domain.describe(integer)}, got {text}")
        return kind(value)

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def int_in(ge: int, le: int, note: str = "") -> Callable[[str], int]:
    """An integer in [ge, le]."""
    return _number_type(int, Domain(ge=ge, le=le, note=note), integer=True)


def float_in(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    note: str = "",
) -> Callable[[str], float]:
    """A finite number within the given bounds (exactly one lower and one upper bound)."""
    if (ge is None) == (gt is None) or (le is None) == (lt is None):
        raise TypeError("float_in() needs exactly one of ge/gt and exactly one of le/lt")
    return _number_type(float, Domain(ge=ge, gt=gt, le=le, lt=lt, note=note), integer=False)


def utf8_text(text: str) -> str:
    """Text that is valid UTF-8: bytes that are not (a file in Latin-1 pasted as an argument)
    reach Python as surrogate escapes, which no tokenizer or terminal can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = text[e.start : e.end].encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(
            f"holds bytes that are not UTF-8 ({shown!r} at character {e.start}); give the text "
            "in UTF-8 (e.g. convert it with iconv -f latin1 -t utf-8)"
        ) from None
    return text


def device(text: str) -> str:
    """A device name torch accepts: auto, cpu, cuda, cuda:N, mps."""
    if not is_device(text):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a device; use auto, cpu, cuda, cuda:N or mps"
        )
    return text
