"""The C heap of a run on a CPU: memory a step frees stays mapped for the next one (glibc).

A training step allocates its activations, their gradients and the backward's scratch through
the C allocator, frees them by its end, and asks for the same sizes again in the next step.
glibc's malloc hands allocations above its mmap threshold (128 KiB at start, raised by each
such block freed, to at most 32 MiB) to fresh `mmap`s and unmaps them when freed, and returns
the top of its heap to the kernel once more than its trim threshold is free there. Either way
the next step gets the same memory back as new pages: one page fault per 4 KiB, each page
zeroed by the kernel. At nanoGPT's Shakespeare shape (6L/384, batch 16 x 256, bf16 compiled,
2 threads, AMX host) that was 30-49 thousand faults and 62-103 ms of system CPU time a step, and
the step took 461-485 ms against 423-440 ms with both thresholds raised (no faults, 0-5 ms of
system time): 3 alternated pairs of processes, notes/issue-18-precision.md, session 12.

`keep_freed_memory()` raises both thresholds (`mallopt`), once per process, on Linux with glibc:
blocks up to `MMAP_THRESHOLD` come from the heap, and freed memory is kept for reuse rather than
handed back. The cost is the one a training run pays anyway: the process holds on to its peak
memory. `TINYLM_KEEP_FREED_MEMORY=0` (or false/no/off) leaves glibc's defaults; another value is
refused. A user who set glibc's own variables (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`,
`MALLOC_TOP_PAD_`, or `glibc.malloc.*` tunables in `GLIBC_TUNABLES`) keeps what they chose. (Any
one of those fixes glibc's mmap threshold at its value, 128 KiB unless set:
`MALLOC_TRIM_THRESHOLD_` alone made the same step fault 225 thousand times and take 3x as long.)
Another allocator (jemalloc, tcmalloc or mimalloc through `LD_PRELOAD`) is left to its own policy.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Mapping

from tinylm.config import ConfigError

# mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# mallopt takes an int: the largest block served from the heap, and the free memory kept at its
# top, are both 2 GiB - 1. Larger blocks (a GPT-2 vocabulary's logits at a big batch) are rare
# enough to keep glibc's own mmap.
MMAP_THRESHOLD = 2**31 - 1
TRIM_THRESHOLD = 2**31 - 1

OPT_OUT = "TINYLM_KEEP_FREED_MEMORY"
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _user_choice(environ: Mapping[str, str]) -> str | None:
    """The glibc malloc setting the user made themselves, if any."""
    for name in _GLIBC_VARIABLES:
        if name in environ:
            return name
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def _other_allocator(environ: Mapping[str, str]) -> str | None:
    preload = environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return name
    return None


def keep_freed_memory(device_type: str = "cpu") -> str | None:
    """Raise glibc's mmap and trim thresholds for a run on a CPU; say what was done (or why not)
    for the run's header. None where it does not apply (another device, another OS or libc)."""
    return _raise_thresholds() if device_type == "cpu" else None


@functools.cache  # once per process: the thresholds are process-wide
def _raise_thresholds() -> str | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    setting = os.environ.get(OPT_OUT, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return f"glibc's defaults ({OPT_OUT}={os.environ[OPT_OUT]})"
    if setting not in ("", "1", "true", "yes", "on"):
        raise ConfigError(
            f"{OPT_OUT}={os.environ[OPT_OUT]!r}: use 0 to leave glibc's malloc defaults, 1 (or "
            f"unset it) to keep the memory a step frees for the next"
        )
    if (name := _user_choice(os.environ)) is not None:
        return f"glibc's malloc as {name} sets it"
    if (name := _other_allocator(os.environ)) is not None:
        return f"{name} (LD_PRELOAD)"
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        return "glibc refused the raised thresholds; its defaults stay"
    return "freed memory kept for the next step (glibc mmap/trim thresholds raised)"
