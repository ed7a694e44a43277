"""Shared fixtures: the shared data directory, seeded RNGs, and small torch thread counts."""

from __future__ import annotations

import os

import pytest

from tinylm.paths import shared_data_dir

# Two cores: keep torch from oversubscribing when tests spawn worker processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")


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
