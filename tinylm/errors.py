"""The checkpoint error type, defined below every layer that raises or catches it.

`train/checkpoint.py` raises it for a missing or damaged checkpoint and re-exports it (callers
import it from there); the Hugging Face formats (`hf/`), which sit below `train/`, raise it for a
model tinylm cannot represent exactly, so it cannot live in `train/` (docs/DESIGN.md, "Layers").
`tinylm` turns it into a one-line error and exit status 2.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected; the message says what was found."""
