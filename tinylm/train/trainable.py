"""`train.trainable`: which parameters a run updates (freezing, for fine-tuning on small machines).

- `all` (default): every parameter.
- `no-embeddings`: everything but the token and position embeddings. A tied output head is the
  token embedding matrix, so it stays frozen too; an untied head trains.
- `last:N`: only the last N transformer blocks, the final norm and an untied output head.

Frozen parameters get `requires_grad=False`, so they take no gradient memory and the optimizer
(built from the parameters that require grad) holds no state for them.
"""

from __future__ import annotations

import re

from torch import nn

from tinylm.config import ConfigError

SPEC = re.compile(r"all|no-embeddings|last:([1-9][0-9]*)")
SPEC_HELP = "all, no-embeddings, or last:N (N >= 1 transformer blocks)"


def apply_trainable(model: nn.Module, spec: str) -> tuple[int, int]:
    """Freeze what `spec` leaves out; return (trainable, total) parameter counts (tied once)."""
    match = SPEC.fullmatch(spec)
    if match is None:
        raise ConfigError(f"train.trainable={spec!r}: expected {SPEC_HELP}")
    n_layer = len(model.blocks)
    if spec == "no-embeddings":
        frozen = ["tok_emb.", "pos_emb."]
    elif spec.startswith("last:"):
        n = int(match.group(1))
        if n > n_layer:
            raise ConfigError(
                f"train.trainable={spec}: the model has {n_layer} blocks; use last:1..last:{n_layer}"
            )
        frozen = ["tok_emb.", "pos_emb."] + [f"blocks.{i}." for i in range(n_layer - n)]
    else:
        frozen = []
    for name, param in model.named_parameters():  # a tied head is listed once, as tok_emb
        param.requires_grad_(not any(name.startswith(p) for p in frozen))
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
