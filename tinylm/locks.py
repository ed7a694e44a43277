"""One process at a time per directory: an exclusive lock file that names its holder.

`DirectoryLock(directory, purpose, wait=...)` takes `flock(LOCK_EX)` on `directory/.lock` and
writes the holder's PID, host, start time and purpose into it. The kernel drops a flock when its
holder exits in any way (SIGKILL, a crash), and a reboot empties the lock table, so a lock can
never outlive its process; a lock file left behind by a killed holder is simply taken over (and
said to be stale). With `wait=False` (training) a second process is refused at once with the
first one's PID; with `wait=True` (data preparation) it waits, saying for whom, then finds the
finished result.

The lock file is opened with `O_NOFOLLOW`: a `.lock` that is a symbolic link is refused, never
written through. The holder removes the file when it releases it. A process that opened the file just before it
was removed would lock an orphaned inode, so after locking we check the path still names the
inode we hold, and retry if not. The descriptor is close-on-exec: a worker process started by
the holder must not keep the lock alive after the holder dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from tinylm.fileio import open_no_follow, os_error_message

LOCK_FILE = ".lock"


def read_holder(path: Path) -> dict[str, object]:
    """What a lock file says about its holder ({} when empty or unreadable)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


# A holder writes its record right after it takes the flock; a process refused in between reads
# an empty file. Waiting this long for the record names the holder (a CI run refused two trains
# started together with "another process" once, in a full-suite run from a fresh clone).
RECORD_WAIT_S = 1.0


def holder_record(path: Path, wait_s: float = RECORD_WAIT_S) -> dict[str, object]:
    """The holder's record, waiting up to `wait_s` for a holder that has just taken the lock to
    write it ({} if it never appears)."""
    deadline = time.monotonic() + wait_s
    while not (info := read_holder(path)).get("pid") and time.monotonic() < deadline:
        time.sleep(0.01)
    return info


def describe_holder(info: dict[str, object]) -> str:
    """`PID 123 on host, started 2026-01-01 10:00:00 (tinylm train)` for an error message."""
    if not info.get("pid"):
        return "another process"
    text = f"PID {info['pid']}"
    if info.get("host") and info["host"] != socket.gethostname():
        text += f" on {info['host']}"
    if isinstance(info.get("started"), (int, float)):
        text += f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))}"
    if info.get("purpose"):
        text += f" ({info['purpose']})"
    return text


class DirectoryLock:
    """Exclusive, holder-naming lock on a directory (see the module docstring)."""

    def __init__(
        self,
        directory: str | Path,
        purpose: str,
        *,
        wait: bool,
        error: Callable[[str], Exception] = RuntimeError,
        log: Callable[[str], None] = print,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.purpose = purpose
        self.wait = wait
        self.error, self.log = error, log
        self.fd: int | None = None
        self.stale: dict[str, object] = {}  # the dead holder's record, when one was taken over

    def acquire(self) -> DirectoryLock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): run unlocked
            return self
        while True:
            try:
                # Never through a link: a `.lock` that is a symbolic link would have its target
                # truncated and overwritten with our record (ELOOP: refused, said in words).
                fd = open_no_follow(self.path, os.O_CREAT | os.O_RDWR)
            except OSError as e:
                raise self.error(os_error_message(e, self.path, "create the lock file")) from None
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = describe_holder(holder_record(self.path))
                    if not self.wait:
                        raise self.error(
                            f"'{self.directory}' is in use by {holder}; only one process may "
                            f"{self.purpose} there at a time: wait for it to finish (or stop it), "
                            "or choose another directory"
                        ) from None
                    self.log(f"waiting for {holder}, which is using '{self.directory}'")
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # released and removed while we waited: lock the new file
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            break
        previous = read_holder(self.path)
        pid = previous.get("pid")
        if isinstance(pid, int) and pid != os.getpid():
            # We hold the flock, so whoever wrote this record is gone (killed, or a reboot).
            self.stale = previous
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "purpose": self.purpose,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # while still holding it (see the module docstring)
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
