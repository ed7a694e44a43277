"""Shared fixtures: the shared data directory, seeded RNGs, and small torch thread counts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tinylm.paths import shared_data_dir

# One torch thread per process, here and in the subprocesses tests start: tests often run a
# training subprocess beside pytest itself, and on two cores two spinning OpenMP threads per
# process made tiny-model steps ~8x slower (83 vs 11 ms/step). Tiny models gain nothing from more.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# `train.precision=auto` on CPU is a timing probe (tinylm/train/precision.py): tests pin its
# outcome to fp32 so that exact-numerics tests never depend on a measurement; the probe's own
# tests (tests/test_precision.py) unset this and inject timings.
os.environ["TINYLM_PRECISION_AUTO"] = "fp32"


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data (or $TINYLM_DATA_DIR); tests that need it are skipped only when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data directory {path} not found (set TINYLM_DATA_DIR)")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own dataset cache, so tests never see each other's prepared data."""
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~30 KB of varied text: enough windows for train and val at context 32."""
    lines = []
    names = ["ANNA", "BORIS", "CLARA", "DMITRI"]
    for i in range(600):
        lines.append(
            f"{names[i % 4]}: the {['red', 'blue', 'green'][i % 3]} bird sang {i % 7} times."
        )
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text("\n".join(lines) + "\n")
    return path
