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


def _need(
    cfg: Config, device: torch.device, checkpointing: bool | None = None
) -> tuple[int, Estimate]:
    """Estimated training bytes per host for `cfg` on `device` (see the module docstring)."""
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, precision=_resolved_precision(cfg, device))
    )
    e = estimate(cfg, activation_checkpointing=checkpointing)
    # torchrun's variables, a malformed one refused in one line (not a ValueError traceback)
    from tinylm.train.distributed import launcher_int

    state = e.weights + e.gradients + e.optimizer + e.weight_copies
    if cfg.train.distributed == "fsdp":
        state //= max(1, launcher_int("WORLD_SIZE", 1))
    need = state + e.activations
    if device.type == "cpu":
        need *= max(1, launcher_int("LOCAL_WORLD_SIZE", 1))
    return need, e


def measure(cfg: Config, device: torch.device, checkpointing: bool | None = None) -> MemoryCheck:
    """The estimated training memory per host (see the module docstring) and what is free.

    `checkpointing`: with or without activation checkpointing (None: as the config says)."""
    need, e = _need(cfg, device, checkpointing)
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
    if cfg.train.activation_checkpointing == "auto":  # the run will turn it on (decide_...)
        recomputing = measure(cfg, device, checkpointing=True)
        if recomputing.fits:
            return recomputing
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


def decide_activation_checkpointing(cfg: Config, device: torch.device) -> tuple[bool, str]:
    """`train.activation_checkpointing`, resolved: `auto` is on only when the run's estimate
    does not fit the device without it (the preflight's own comparison); and a reason."""
    setting = cfg.train.activation_checkpointing
    if setting is True or setting is False:
        return setting, f"train.activation_checkpointing={str(setting).lower()}"
    check = measure(cfg, device, checkpointing=False)
    if check.available is None:
        return False, f"auto: off (free memory unknown on {device.type})"
    figures = f"{format_bytes(check.need)} needed, {format_bytes(check.available)} {check.where}"
    if check.fits:
        return False, f"auto: off (fits without it: {figures})"
    return True, f"auto: on (without it the run would not fit: {figures})"


@dataclass
class MemoryPlan:
    """Settings that fit a memory budget for the same global batch (`tinylm estimate --gpu-memory`)."""

    batch_size: int
    grad_accum: int
    activation_checkpointing: bool
    need: int  # estimated bytes with these settings (before HEADROOM)

    def overrides(self) -> str:
        return (
            f"train.batch_size={self.batch_size} train.grad_accum={self.grad_accum} "
            f"train.activation_checkpointing={str(self.activation_checkpointing).lower()}"
        )


def plan_for_memory(
    cfg: Config, budget: int, precision: str = "bf16", checkpointing_only: bool = False
) -> MemoryPlan | None:
    """The largest micro-batch (a divisor of the global batch, grad_accum making up the rest)
    whose estimate plus HEADROOM fits `budget` bytes: without activation checkpointing when any
    micro-batch fits (recomputing costs about one more forward pass, ~1/3 of a step), else
    with it. None when even one sequence with checkpointing does not fit."""
    t = cfg.train
    global_batch = t.batch_size * t.grad_accum
    divisors = [b for b in range(global_batch, 0, -1) if global_batch % b == 0]
    for checkpointing in (True,) if checkpointing_only else (False, True):
        for batch in divisors:
            train = dataclasses.replace(
                t, batch_size=batch, grad_accum=global_batch // batch, precision=precision
            )
            e = estimate(
                dataclasses.replace(cfg, train=train), activation_checkpointing=checkpointing
            )
            if e.total_memory * HEADROOM <= budget:
                return MemoryPlan(batch, global_batch // batch, checkpointing, e.total_memory)
    return None
