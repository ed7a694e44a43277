"""Multi-node runs need a shared file system: check that every rank sees rank 0's files.

Only global rank 0 writes the run directory (config, metrics, checkpoints) and prepares the data;
the other ranks read the prepared data and, when they resume, the checkpoints. On node-local
disks another node would silently prepare its own copy of the data and then fail (or wait in a
collective until the timeout) when it looks for a checkpoint only rank 0's node has. So right
after rank 0 has taken the run's lock and prepared the data, every rank compares the SHA-256 of
those files with rank 0's; a rank that cannot see them stops the run on every rank with one
error naming the path and the rank (a collective: nobody is left waiting).
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

from tinylm.config import ConfigError
from tinylm.train import distributed


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def check_visible(paths: list[Path], info: distributed.DistInfo) -> None:
    """Raise ConfigError on every rank unless every rank reads `paths` as rank 0 does.

    A collective; `paths` matter on rank 0 only (the others take rank 0's list).
    """
    if not info.enabled:
        return
    expected = [(str(p), _digest(p)) for p in paths] if info.is_main else None
    expected = distributed.broadcast_object(expected, info)
    missing = next((path for path, want in expected if _digest(Path(path)) != want), None)
    reports = distributed.gather_objects((socket.gethostname(), missing), info)
    for rank, (host, path) in enumerate(reports):
        if path is not None:
            raise ConfigError(
                f"rank {rank} (host {host}) cannot see {path} as rank 0 "
                f"(host {reports[0][0]}) wrote it: the run directory (out_dir) and the "
                "prepared data (data.cache_dir) must be on a file system every node shares, "
                "at the same path (docs/DESIGN.md, Scale-out)"
            )
