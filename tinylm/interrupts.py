"""Signals outside the training loop: set-up, data preparation and their worker processes.

Inside the loop `train/signals.py` turns SIGINT/SIGTERM into a polled flag. Before it (data
preparation, tokenizer fitting, model build) and in `tinylm prepare`, the work is made of steps
that are either finished and kept (a prepared chunk, a cached tokenizer) or thrown away, so the
simplest clean stop is an exception: `term_as_interrupt()` makes SIGTERM raise
`KeyboardInterrupt` as Ctrl+C does, so both unwind through the same `finally` blocks (worker
pools terminated and reaped, temporary files removed) and end with one message instead of a
silent death that orphans the workers.

A terminal's Ctrl+C goes to every process in the foreground group, worker processes included,
and each would print its own KeyboardInterrupt traceback. `workers_ignore_sigint()` is held
while workers start: a blocked signal stays blocked across fork and exec, so the workers never
see Ctrl+C at all (not even while importing), and the parent, which does, stops them.

A parent killed with SIGKILL runs no `finally`: its pool's workers, blocked on a queue whose
other end nobody will close, lived forever (9 of them after 38 minutes). Every worker pool's
initializer calls `exit_with_parent()`, a daemon thread that ends the worker within
`PARENT_POLL_S` of its parent's death (the worker is then re-parented, so `getppid` changes).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing import resource_tracker
from types import FrameType

# How often a worker checks that its parent is alive: a dead parent's workers are gone within this.
PARENT_POLL_S = 0.5


class Interrupted(KeyboardInterrupt):
    """KeyboardInterrupt raised for a SIGTERM; `str()` names the signal."""


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def term_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Interrupted` (a KeyboardInterrupt) in the main thread while inside."""
    if not _in_main_thread():  # handlers can only be installed there
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def workers_ignore_sigint() -> Iterator[None]:
    """Processes started inside never receive SIGINT (see the module docstring).

    SIGINT is blocked, not ignored, in the parent for those milliseconds: a blocked signal is
    held and delivered when the block ends, so a Ctrl+C during worker start-up still stops the
    parent; the signal mask is inherited across fork and exec, so the workers keep it blocked.
    """
    if not _in_main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # multiprocessing's resource tracker, started with the first spawned worker, *unblocks*
    # SIGINT in the caller once it has started (CPython's resource_tracker.ensure_running),
    # which undid this block for every worker started after it ("Fatal Python error" when a
    # Ctrl+C hit one importing). Started first, it leaves the block alone.
    if hasattr(resource_tracker, "ensure_running"):
        resource_tracker.ensure_running()
    # The mask is per thread, and the kernel hands a Ctrl+C to any thread not blocking it (a
    # reader thread, the pool's manager thread being started): Python would then raise the
    # KeyboardInterrupt in the main thread mid-start-up, leaving a half-built pool whose
    # shutdown fails. So the Python handler only records it meanwhile, and it is re-raised
    # once the block ends, as a blocked signal would be.
    received: list[int] = []
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        signal.signal(signal.SIGINT, previous_handler)
        if received:
            signal.raise_signal(signal.SIGINT)


def signal_name(e: KeyboardInterrupt) -> str:
    """`SIGTERM` for an `Interrupted`, `SIGINT` (Ctrl+C) for a plain KeyboardInterrupt."""
    return str(e) if isinstance(e, Interrupted) and str(e) else "SIGINT"


def exit_with_parent(poll_s: float = PARENT_POLL_S) -> None:
    """In a worker process (call it from the pool's initializer): exit as soon as the process
    that started it is gone (see the module docstring). The parent's PID comes from
    multiprocessing, so a parent that died before the worker got here is noticed too."""
    parent = multiprocessing.parent_process()
    expected = parent.pid if parent is not None and parent.pid else os.getppid()

    def watch() -> None:
        while os.getppid() == expected:
            time.sleep(poll_s)
        os._exit(1)  # nothing to clean: the parent, which owned the work, is gone

    threading.Thread(target=watch, name="tinylm-parent-watch", daemon=True).start()
