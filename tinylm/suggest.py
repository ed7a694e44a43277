""" "Did you mean ...": close matches for a misspelled key, preset, name or path.

Used by the config loader (unknown keys, preset typos) and by data sources (a path that does not
exist but has a close neighbour on disk). Pure standard library, no tinylm imports.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

# difflib's default cutoff (0.6) catches one or two wrong letters in short names
# ("max_step" -> "max_steps", "tiyn" -> "tiny") without offering unrelated words.
CUTOFF = 0.6


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to `n` candidates close to `word`, best first."""
    return difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=n, cutoff=CUTOFF)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' Did you mean X?' (or 'X or Y?'), or '' when nothing is close."""
    matches = close_matches(word, candidates)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"


def nearby_path(path: str | Path) -> Path | None:
    """An existing path that differs from `path` by a typo in its last component, or None.

    Only the directory that should hold it is listed (one `iterdir`), so this is cheap; a
    missing parent directory is itself matched against its own parent, one level up.
    """
    path = Path(path).expanduser()
    parent = path.parent
    if not parent.is_dir():
        fixed_parent = nearby_path(parent) if parent != parent.parent else None
        if fixed_parent is None:
            return None
        candidate = fixed_parent / path.name
        return candidate if candidate.exists() else nearby_path(candidate)
    try:
        names = [p.name for p in parent.iterdir()]
    except OSError:
        return None
    matches = close_matches(path.name, names, n=1)
    return parent / matches[0] if matches else None


def refuse_missing_path(path: str | Path, what: str) -> None:
    """Raise FileNotFoundError ("... is neither `what`") (a one-line user error) when `path` does not exist: before the
    command imports torch, so a mistyped path is refused at once, with a close match if any."""
    if Path(path).expanduser().exists():
        return
    near = nearby_path(path)
    hint = f" Did you mean '{near}'?" if near is not None else ""
    raise FileNotFoundError(f"'{path}' does not exist, so it is neither {what}.{hint}")
