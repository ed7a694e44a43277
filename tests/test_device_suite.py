"""bench/device_suite.sh, the one command for a lent GPU: it parses, and on a machine without
CUDA it says so and exits 1 before measuring anything (its GPU parts run only on a lent GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "device_suite.sh"


def test_the_suite_parses():
    assert subprocess.run(["bash", "-n", str(SUITE)], capture_output=True).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite measures instead")
def test_without_cuda_it_stops_before_measuring():
    results = REPO / "bench" / "results"
    before = set(results.glob("*")) if results.is_dir() else set()
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(SUITE)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "no CUDA device visible; nothing to measure" in done.stderr
    assert (set(results.glob("*")) if results.is_dir() else set()) == before  # no result written
