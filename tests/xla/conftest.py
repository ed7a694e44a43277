"""The XLA tests run on XLA's CPU device, in `.venv-xla` (torch_xla needs its own torch):

    bash scripts/setup.sh --xla && .venv-xla/bin/python -m pytest -q tests/xla

`.ci/run` does both after the main suite; in the main `.venv` these tests are skipped (no
torch_xla). The main suite's fixtures (tests/conftest.py) apply here too.
"""

from __future__ import annotations

import importlib.util
import os

# Before torch_xla is imported anywhere (here, in the tests, in their subprocesses): XLA's CPU
# device. No XLA_PERSISTENT_CACHE_PATH: XLA's CPU client cannot reload what it wrote there
# ("Deserializing serialized executable not supported", torch_xla 2.9), so each process compiles.
os.environ.setdefault("PJRT_DEVICE", "CPU")

# The XLA device must exist before the first backward pass of this process: autograd sizes its
# per-device queues then, and an XLA backward after a CPU one fails an internal assert.
if importlib.util.find_spec("torch_xla") is not None:
    import torch_xla

    torch_xla.device()
