"""Graceful stop: the first SIGINT/SIGTERM asks the run to stop; a second one exits at once.

The training loop, the evaluation loop and sample generation poll `stop.requested` between units
of work (a step, an eval batch, a sampled token), so a stop lands within one of them; then the
loop writes a checkpoint and exits 0. A second signal exits immediately with status 130:
checkpoints are written atomically (see checkpoint.py), so dying in the middle of one never
damages the last good one.

Under torchrun a terminal's Ctrl+C reaches every rank twice: from the terminal (the whole
process group gets it) and, milliseconds later, as the SIGTERM the launcher forwards. With
`repeat_grace_s` > 0 (the trainer sets it under torchrun) a second signal that close behind
the first counts as the same stop request instead of "exit now".

The handler writes its message with `os.write` rather than `print`: a handler runs in the main
thread between bytecodes, possibly while that thread is inside `sys.stderr.write` (the progress
bar, a log line), and re-entering the same buffered stream raises "reentrant call" there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from types import FrameType, TracebackType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _say(message: str) -> None:
    """Write to stderr without touching Python's buffered stream objects (see module docstring)."""
    with contextlib.suppress(OSError):  # stderr closed: the stop happens all the same
        os.write(2, message.encode("utf-8", "replace"))


class GracefulStop:
    """Context manager that turns SIGINT/SIGTERM into a polled `requested` flag."""

    def __init__(self, repeat_grace_s: float = 0.0) -> None:
        self.requested = False
        self.reason = ""
        self.signals_received = 0
        self.repeat_grace_s = repeat_grace_s
        self._first_signal_at = 0.0
        self._previous: dict[int, object] = {}

    def request(self, reason: str) -> None:
        """Ask the run to stop (also used for time limits, early stopping, non-finite losses)."""
        if not self.requested:
            self.requested, self.reason = True, reason

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signals_received and now - self._first_signal_at < self.repeat_grace_s:
            return  # the launcher forwarding the same Ctrl+C (see module docstring)
        self.signals_received += 1
        self._first_signal_at = self._first_signal_at or now
        # Counted separately from `requested`: a stop already asked for by early stopping or
        # the time limit must not make the user's first Ctrl+C look like a second one, and a
        # second Ctrl+C must always exit even when the first stop had another reason.
        if self.signals_received > 1:
            _say(f"\n{name} again: exiting now (the last complete checkpoint is intact)\n")
            os._exit(130)
        self.request(f"signal {name}")
        _say(
            f"\n{name} received: finishing the current unit of work, then writing a checkpoint "
            "(send it again to exit at once)\n"
        )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # shared with XLA replica threads (xla_replicas.py): the main thread restores
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


def enable_stack_dumps() -> bool:
    """SIGUSR1 prints every thread's Python stack to stderr and the run goes on; a crash in
    native code (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL) prints them before the process dies.

    For a run that seems stuck (a rank waiting in a collective the others never reach, a data
    source that blocks): `kill -USR1 PID` shows where each process is. For a crash inside torch,
    torch_xla or a BLAS library: which Python line of which thread was running, where otherwise
    the run's output just ends. Returns False where the platform has no SIGUSR1 (Windows).
    Installed in the main thread only, like the handlers above.
    """
    import faulthandler

    if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
        return False
    try:  # file descriptor 2: sys.stderr may be a wrapper without one (pytest's capture)
        faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)
        if not faulthandler.is_enabled():  # a caller's own (python -X faulthandler) stays
            faulthandler.enable(file=2, all_threads=True)
    except (OSError, ValueError):
        return False
    return True
