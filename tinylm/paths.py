"""Where things live: shared test data, the dataset cache, and the repository root."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """Test and benchmark data: $TINYLM_DATA_DIR, else ../shared/data beside the repository."""
    env = os.environ.get("TINYLM_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def cache_dir(configured: str = "") -> Path:
    """Prepared datasets and downloads: the configured path, $TINYLM_CACHE, or ~/.cache/tinylm."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("TINYLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tinylm"
