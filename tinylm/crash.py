"""What the `tinylm` command does with an exception nobody expected: a report file, one line.

Errors the user can fix are raised as ConfigError/DataError/... and printed by cli.py. Anything
else escaping a command is a bug in tinylm; the user sees one line saying so and where the full
traceback was written (the run directory when the command knows one, else the cache directory,
else the system temp directory), and the command exits with `INTERNAL_ERROR_EXIT`, distinct from
2 (a refused input) and 130 (interrupted).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import traceback
from pathlib import Path

from tinylm.fileio import create_new

INTERNAL_ERROR_EXIT = 1
REPORT_PREFIX = "internal-error-"


def report_dirs(args: argparse.Namespace) -> list[Path]:
    """Where a report may go, best first: the command's run directory, the cache, temp."""
    from tinylm.paths import cache_dir

    dirs = []
    run_dir = getattr(args, "run_dir", None)  # set by `train` once it knows its directory
    if run_dir is None and isinstance(getattr(args, "run", None), str):
        run_dir = args.run  # eval / generate: a run or checkpoint directory
    if run_dir is not None and Path(run_dir).is_dir():
        dirs.append(Path(run_dir))
    dirs += [cache_dir() / "crash-reports", Path(tempfile.gettempdir())]
    return dirs


def write_report(
    args: argparse.Namespace, argv: list[str] | None, exc: BaseException
) -> Path | None:
    """Write the traceback and the command line to a new file; its path, or None if nowhere
    could be written (the message then says so)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (
        f"tinylm {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"python {sys.version.split()[0]}, pid {os.getpid()}, {stamp}\n\n"
        + "".join(traceback.format_exception(exc))
    )
    # Command lines and exception messages can hold bytes that are not UTF-8 (a prompt from a
    # file in another encoding arrives as surrogate escapes): written as escapes, so the
    # report of a crash never crashes itself.
    data = text.encode("utf-8", "backslashreplace")
    for directory in report_dirs(args):
        path = directory / f"{REPORT_PREFIX}{stamp}-{os.getpid()}.txt"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with create_new(path) as f:  # a new file, never through a link at the name
                f.write(data)
            return path
        except OSError:
            continue
    return None


def report_internal_error(
    args: argparse.Namespace, argv: list[str] | None, exc: BaseException
) -> int:
    """Print the one-line report for an unexpected exception and return the exit status."""
    path = write_report(args, argv, exc)
    where = f"traceback written to {path}" if path else "the traceback could not be written"
    first = str(exc).splitlines()[0] if str(exc) else ""
    line = (
        f"tinylm {args.command}: internal error (a bug in tinylm, not in your input): "
        f"{type(exc).__name__}: {first[:200]}; {where}; please include it in a bug report"
    )
    print(safe_text(line), file=sys.stderr)
    return INTERNAL_ERROR_EXIT


def safe_text(text: str) -> str:
    """`text` printable on any terminal: characters that are not valid Unicode (surrogate
    escapes of non-UTF-8 bytes) as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
