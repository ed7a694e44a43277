"""train/heap.py: a CPU run keeps the memory its steps free, instead of faulting it in again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tinylm.train import heap

REPO = Path(__file__).resolve().parents[1]

# Five 48 MiB blocks allocated, written and freed, as a step's activations are: above glibc's
# largest dynamic mmap threshold (32 MiB), so by default every one is a new mmap.
FAULTS_OF_FREED_BLOCKS = """
import json, resource, sys
import torch
from tinylm.train import heap

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        block = torch.empty(48 << 20, dtype=torch.uint8)
        block.fill_(1)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
note = heap.keep_freed_memory("cpu")
# The heap grows to a steady state first (a freed block is a hole a little smaller than the
# next aligned request until its neighbours are freed too), as a run's first steps do.
faults(), faults()
kept = faults()
print(json.dumps([default, kept, note]))
"""


def run_script(env_extra: dict[str, str]) -> tuple[int, int, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", heap.OPT_OUT)
    }
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_FREED_BLOCKS],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    default, kept, note = json.loads(out.stdout.strip().splitlines()[-1])
    return default, kept, note


glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the thresholds are glibc malloc's",
)


@glibc_only
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, kept, note = run_script({})
    pages = 5 * (48 << 20) // 4096
    assert default > pages // 2  # glibc's default: every block is new pages
    assert kept < default // 50, (default, kept)
    assert "kept" in note


@glibc_only
def test_the_opt_out_and_the_users_own_glibc_settings_are_left_alone():
    default, kept, note = run_script({heap.OPT_OUT: "Off"})
    assert kept > default // 2  # unchanged: still a fault per page
    assert note == f"glibc's defaults ({heap.OPT_OUT}=Off)"
    # mallopt runs in the subprocess only when nothing else decided
    assert heap._user_choice({"MALLOC_TRIM_THRESHOLD_": "131072"}) == "MALLOC_TRIM_THRESHOLD_"
    assert heap._user_choice({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert heap._user_choice({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}) is None
    assert heap._other_allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "jemalloc"


def test_only_a_cpu_run_touches_the_heap():
    assert heap.keep_freed_memory("cuda") is None
    assert heap.keep_freed_memory("xla") is None


def test_a_value_the_opt_out_does_not_know_is_refused_in_one_line(
    monkeypatch, tmp_path, corpus, capsys
):
    """`TINYLM_KEEP_FREED_MEMORY=maybe`: exit 2 naming the variable, before the run writes."""
    from helpers import SMALL, run_cli

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the variable is read only where glibc's thresholds apply")
    # uncached: this process may have applied the thresholds already
    monkeypatch.setattr(heap, "_raise_thresholds", heap._raise_thresholds.__wrapped__)
    monkeypatch.setenv(heap.OPT_OUT, "maybe")
    code = run_cli("train", "tiny", *SMALL, f"data.train={corpus}", f"out_dir={tmp_path}")
    err = capsys.readouterr().err
    assert code == 2
    assert "TINYLM_KEEP_FREED_MEMORY='maybe': use 0" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())
