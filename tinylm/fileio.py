"""Writing and naming files safely: atomic writes, names confined to a directory, OS errors in words.

Every file tinylm writes goes through `atomic_write` (a temporary name unique to the writing
process and thread, fsync, rename), so a name on disk only ever holds complete content, even
when two processes write the same cache entry at once or one is killed mid-write; a write that
fails (disk full, permission denied) removes its temporary file and leaves the old content.

No file is ever written through a symbolic link that sits where tinylm writes (a `.lock`, a
`metrics.jsonl` or a temporary name pointing at a file elsewhere would have its target
truncated or overwritten): every writer opens with `O_NOFOLLOW` (`open_no_follow`,
`open_append`), creates new files with `O_EXCL` (`create_new`: temporary names, reports), or
replaces the name atomically (`atomic_write*`: a rename replaces a link, never its target);
a link is refused with `ELOOP`, which `os_error_message` says in words.

`os_error_message(e, path, doing)` turns an `OSError` into one sentence that names the path and
what to do (free space, check permissions, choose another directory); callers raise it as their
own user-facing error type (DataError, CheckpointError, TokenizerError), so the CLI prints it
without a traceback. `confined(directory, name, source)` refuses file names read from our own
metadata that would leave their directory (`..`, absolute paths, separators).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

_HINTS = {
    errno.ENOSPC: "no space left on the device: free some space (or choose another directory) and run the same command again",
    errno.EDQUOT: "disk quota exceeded: free some space (or choose another directory) and run the same command again",
    errno.EROFS: "the file system is read-only: choose a writable directory",
    errno.EACCES: "permission denied: check the directory's permissions or choose another directory",
    errno.EPERM: "operation not permitted: check the permissions or choose another directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EEXIST: "it exists and is a file, not a directory: choose another path",
    errno.EISDIR: "it is a directory, not a file: choose another path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.ELOOP: "it is a symbolic link, and tinylm never writes through a link (it would "
    "overwrite the file the link points to): remove the link, or choose another path",
}
# Flags of every file tinylm opens for writing: never through a link at the name, never
# inherited by a child process.
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def os_error_message(e: OSError, path: str | Path, doing: str) -> str:
    """`cannot <doing> '<path>': <what it means and what to do>` for an OSError."""
    hint = _HINTS.get(e.errno or 0) or (e.strerror or str(e))
    # The file at fault when it is not `path` itself (but not our temporary name: noise).
    where = e.filename if e.filename and str(e.filename) != str(path) else None
    if where is not None and is_temp_name(str(where)):
        where = None
    return f"cannot {doing} '{path}'" + (f" ({where})" if where else "") + f": {hint}"


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def make_dir(path: str | Path, error: Callable[[str], Exception], what: str = "directory") -> Path:
    """`mkdir -p path`, with a failure raised as `error(message naming the path)`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"'{path}' exists and is a file, not a {what}: choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(os_error_message(e, path, f"create the {what}")) from None
    return path


def temp_name(path: Path) -> Path:
    """A temporary name next to `path`, unique to this process and thread (never shared)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident() % 100000}.tmp")


def open_no_follow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """`os.open(path, flags)` that fails with ELOOP where `path` is a symbolic link."""
    return os.open(path, flags | _NO_FOLLOW, mode)


def create_new(path: str | Path) -> IO[bytes]:
    """A new file at `path` for writing; FileExistsError when anything (a link too) is there."""
    return os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb")


def open_append(path: str | Path, *, truncate: bool = False) -> IO[str]:
    """`path` opened for appending UTF-8 lines (line-buffered), emptied first with `truncate`,
    never through a symbolic link (log files that grow as a run goes: metrics, sweep logs)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
    return os.fdopen(open_no_follow(path, flags), "a", buffering=1, encoding="utf-8")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write `path` through `write(file)` on a unique temporary file, fsync, rename.

    On any failure the temporary file is removed and the exception propagates; the old content
    of `path` (if any) is untouched. The temporary file is created new (`O_EXCL`, not through a
    link); a leftover of a killed process that had the same PID is removed first.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        try:
            f = create_new(tmp)
        except FileExistsError:
            tmp.unlink()  # removes a link itself, never what it points to
            f = create_new(tmp)
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """`atomic_write` of a bytes-like object."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def is_temp_name(name: str) -> bool:
    """True for the names `temp_name` (and older versions' `NAME.tmp`) produce."""
    return name.endswith(".tmp")


def confined(
    directory: str | Path,
    name: object,
    source: str | Path,
    error: Callable[[str], Exception] = ValueError,
) -> Path:
    """`directory/name` for a plain file name read from `source`; else `error(message)` is raised.

    Names in our metadata (checkpoint file lists, shard lists) are single path components: a
    name with a separator, `..`, or an absolute path could make a reader open, hash or map a
    file outside the directory, so it is refused before any file is touched.
    """
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
    ):
        raise error(
            f"{source}: file name {name!r} is not a plain file name inside '{directory}' "
            "(a path outside the directory, or not a name at all): the file was edited or is not "
            "tinylm's; refusing to open it"
        )
    return Path(directory) / name
