"""Harness task names at once: every name `eval --tasks` asks for is checked before anything slow.

The harness's own `TaskManager` parses its ~14,700 task YAML files to learn the names (60-70 s on
a busy 2-core machine; 15-17 s to say that one task is missing, and it named only the first).
This index reads the same files as text and takes the `task:`, `group:` and `tag:` names from
them (a line scan, no YAML parsing, no import of the harness), then caches the set per harness
version and task directory, so a typo is refused with every unknown name and a suggestion in well
under a second after the first call. The harness still loads the tasks that pass.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

from tinylm.config import ConfigError
from tinylm.fileio import atomic_write_text
from tinylm.paths import cache_dir
from tinylm.suggest import close_matches

_KEY = re.compile(r"^(task|group|tag)[ \t]*:[ \t]*(.*?)[ \t]*(#.*)?$")
_ITEM = re.compile(r"^[ \t]+-[ \t]+([^\s:{}\[\]#]+)[ \t]*(#.*)?$")


def _clean(value: str) -> str:
    return value.strip().strip("\"'")


def names_in(text: str) -> set[str]:
    """The task, group and tag names one task YAML file declares (plain or listed values)."""
    out: set[str] = set()
    listing = False  # inside a `tag:` / `task:` list of names
    for line in text.splitlines():
        if listing and (item := _ITEM.match(line)):
            out.add(_clean(item.group(1)))
            continue
        listing = False
        match = _KEY.match(line)
        if not match:
            continue
        value = match.group(2)
        if not value:
            listing = True
        elif value.startswith("["):
            out.update(_clean(v) for v in value.strip("[]").split(",") if _clean(v))
        elif not value.startswith(("!", "{", "|", ">")):
            out.add(_clean(value))
    return out


def scan(directories: list[Path]) -> set[str]:
    """Every name declared by the YAML files under `directories`."""
    names: set[str] = set()
    for directory in directories:
        for root, _, files in os.walk(directory):
            for name in files:
                if name.endswith((".yaml", ".yml")):
                    try:
                        text = Path(root, name).read_text(encoding="utf-8", errors="replace")
                    except OSError:
                        continue
                    names |= names_in(text)
    return names


def builtin_task_dir() -> Path | None:
    """The harness's task directory, found without importing the harness."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    tasks = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    return tasks if tasks.is_dir() else None


def builtin_names() -> set[str]:
    """The harness's built-in names, cached per harness version and install location."""
    tasks = builtin_task_dir()
    if tasks is None:
        return set()
    try:
        version = importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    key = f"{version}:{tasks}"
    cache = cache_dir() / "harness-task-names.json"
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return set(saved["names"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    print(f"indexing the harness's task names once (cached in {cache})", file=sys.stderr)
    names = scan([tasks])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps({"key": key, "names": sorted(names)}))
    except OSError:
        pass  # a read-only cache only costs the scan next time
    return names


def check_names(names: list[str], include_path: list[str], include_defaults: bool = True) -> None:
    """Refuse, in one message, every name no task file declares (with close matches)."""
    for path in include_path:
        if not Path(path).is_dir():
            raise ConfigError(f"--include-path {path}: no such directory of task YAML files")
    asked = [n for n in names if not Path(n).is_file()]
    if not asked:
        return
    known = scan([Path(p) for p in include_path])
    if include_defaults and not all(n in known for n in asked):
        known |= builtin_names()
    unknown = [n for n in asked if n not in known]
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = close_matches(name, known)
        parts.append(f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise ConfigError(
        f"unknown harness task{'s' if len(unknown) > 1 else ''} {', '.join(parts)}: list the "
        "task names with `lm-eval ls tasks` (or see the lm-evaluation-harness task list), or add "
        "your own task YAML directory with --include-path DIR"
    )
