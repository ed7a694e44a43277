"""Memory preflight: refuse a training run that cannot fit before any weight is allocated.

`check_memory(cfg, device)` compares the estimator's training memory (weights, gradients, AdamW
state, activations at train.batch_size, autocast copies: tinylm/estimate.py) with what the
device has: available RAM on CPU (psutil), free memory on CUDA (`torch.cuda.mem_get_info`). When
the estimate (plus `HEADROOM`) exceeds it, the refusal gives the figures and the settings that
would fit: the largest micro-batch with grad_accum keeping the effective batch, or, when the
model alone does not fit, the most layers that do. `tinylm train --force` skips the check.

Counting is arithmetic on a meta-device model (see `estimate.model_counts`), so even
`model.n_layer=1000 model.d_model=65536` is refused in milliseconds.

Processes: under torchrun on one host every CPU process holds its own copy in the same RAM
(so the need is multiplied by LOCAL_WORLD_SIZE); FSDP shards weights, gradients and optimizer
state over WORLD_SIZE.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from tinylm.config import Config, ConfigError
from tinylm.estimate import Estimate, estimate, format_bytes

# The estimate leaves out allocator slack, transient buffers (logits, the fp32 loss copy) and,
# on CUDA, the context: estimate.py says to leave 10-20%; the check asks for 15% on top.
HEADROOM = 1.15


@dataclass
class MemoryCheck:
    """What the preflight compared: the estimated need and the device's available bytes."""

    need: int
    available: int | None  # None: unknown for this device (the check is skipped)
    where: str  # "of RAM is available" / "is free on cuda:0"
    estimate: Estimate

    @property
    def fits(self) -> bool:
        return self.available is None or self.need * HEADROOM <= self.available


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Bytes a new allocation can use on `device`, and a label; (None, ...) when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"is free on {device}"
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available, "of RAM is available"
    return None, f"unknown on {device.type}"


def _resolved_precision(cfg: Config, device: torch.device) -> str:
    from tinylm.train.runtime import select_precision

    return select_precision(cfg.train.precision, device).name


def _need(cfg: Config, device: torch.device) -> tuple[int, Estimate]:
    """Estimated training bytes per host for `cfg` on `device` (see the module docstring)."""
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, precision=_resolved_precision(cfg, device))
    )
    e = estimate(cfg)
    state = e.weights + e.gradients + e.optimizer + e.weight_copies
    if cfg.train.distributed == "fsdp":
        state //= int(os.environ.get("WORLD_SIZE", "1"))
    need = state + e.activations
    if device.type == "cpu":
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return need, e


def measure(cfg: Config, device: torch.device) -> MemoryCheck:
    """The estimated training memory per host (see the module docstring) and what is free."""
    need, e = _need(cfg, device)
    available, where = available_memory(device)
    return MemoryCheck(need=need, available=available, where=where, estimate=e)


def _advice(cfg: Config, check: MemoryCheck, device: torch.device) -> str:
    """Settings that would fit: a smaller micro-batch with grad_accum, or fewer layers."""
    e, t, m = check.estimate, cfg.train, cfg.model
    budget = check.available / HEADROOM
    per_sequence = e.activations / max(1, e.batch_size)
    state = check.need - e.activations
    if state < budget and per_sequence > 0:
        fits = int((budget - state) // per_sequence)
        if fits >= 1:
            # The largest divisor of the batch that fits, so grad_accum keeps it exactly.
            batch = max(b for b in range(1, min(fits, t.batch_size) + 1) if t.batch_size % b == 0)
            accum = t.grad_accum * (t.batch_size // batch)
            return (
                f"train.batch_size={batch} train.grad_accum={accum} (the same effective batch), "
                "or a shorter model.context_length"
            )
    # The most layers that fit, searched on the estimate itself: embeddings and the output head
    # do not shrink with depth, so a per-layer average would suggest too many.
    lo, hi = 0, m.n_layer - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        fewer = dataclasses.replace(cfg, model=dataclasses.replace(m, n_layer=mid))
        if _need(fewer, device)[0] * HEADROOM <= check.available:
            lo = mid
        else:
            hi = mid - 1
    layers = lo
    smaller = f"model.n_layer={layers} or a smaller model.d_model" if layers >= 1 else ""
    return smaller or "a smaller model.d_model and model.n_layer (see `tinylm estimate`)"


def check_memory(cfg: Config, device: torch.device) -> MemoryCheck:
    """Raise ConfigError when training `cfg` on `device` cannot fit (see the module docstring)."""
    check = measure(cfg, device)
    if check.fits:
        return check
    e = check.estimate
    raise ConfigError(
        f"this run needs about {format_bytes(check.need)} for training "
        f"(model.n_layer={cfg.model.n_layer}, model.d_model={cfg.model.d_model}, "
        f"train.batch_size={cfg.train.batch_size} x {cfg.model.context_length} tokens: "
        f"weights {format_bytes(e.weights)}, gradients {format_bytes(e.gradients)}, AdamW state "
        f"{format_bytes(e.optimizer)}, activations {format_bytes(e.activations)}) plus "
        f"{HEADROOM - 1:.0%} headroom, but only {format_bytes(check.available)} {check.where}. "
        f"Try {_advice(cfg, check, device)}; or pass --force to try anyway"
    )
