"""A data source that names nothing on disk, refused before torch is imported.

`tinylm train data.train=/typo` used to import torch, pick a device and check memory before
data resolution said the path did not exist (~5 s on a busy 2-core machine). `check_local_sources`
runs right after the config is read and refuses only what is certainly a local path that is not
there: not a registered dataset name, not synthetic, no ':' (`hf:`, URLs, options), no glob
characters.
The error is the one data resolution would give (`sources.expand_files`, with its
"did you mean").
"""

from __future__ import annotations

import glob
from pathlib import Path

from tinylm.config import DataConfig


def _certainly_missing(spec: str) -> bool:
    from tinylm.data.registry import lookup

    if not spec or lookup(spec) is not None or glob.has_magic(spec):
        return False
    if ":" in spec:  # hf:NAME, URLs, and source forms with options are resolved later
        return False
    return not Path(spec).expanduser().exists()


def check_local_sources(data: DataConfig) -> None:
    """Raise the DataError of the first source spec that is a local path that does not exist."""
    from tinylm.data.registry import refuse_misspelled_name
    from tinylm.data.sources import expand_files

    for spec in [data.train if not data.mix else "", data.val, *(m.path for m in data.mix)]:
        if _certainly_missing(spec):
            refuse_misspelled_name(spec)
            expand_files(spec)  # raises the "not found" error, with a close match if any
