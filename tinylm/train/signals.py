"""Graceful stop: the first SIGINT/SIGTERM asks the run to stop; a second one exits at once.

The training loop, the evaluation loop and sample generation poll `stop.requested` between units
of work, so a stop lands within one step/batch, then the loop writes a checkpoint and exits 0.
A second signal exits immediately with status 130: checkpoints are written atomically
(see checkpoint.py), so dying in the middle of one never damages the last good one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType, TracebackType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager that turns SIGINT/SIGTERM into a polled `requested` flag."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""
        self._previous: dict[int, object] = {}

    def request(self, reason: str) -> None:
        """Ask the run to stop (also used for time limits and early stopping)."""
        if not self.requested:
            self.requested, self.reason = True, reason

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and self.reason.startswith("signal"):
            print(
                f"\n{name} again: exiting now (the last complete checkpoint is intact)",
                file=sys.stderr,
            )
            sys.stderr.flush()
            os._exit(130)
        self.request(f"signal {name}")
        print(
            f"\n{name} received: finishing the current step, then writing a checkpoint "
            "(send it again to exit at once)",
            file=sys.stderr,
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
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
