"""The optimizer (AdamW, or Muon + AdamW) and the learning-rate schedules.

`build_optimizer` returns fused AdamW for `optim.name=adamw`, or for `optim.name=muon` a
`MuonAdamW` (tinylm/train/muon.py) that steps PyTorch's `torch.optim.Muon` on the transformer's
hidden matrices and AdamW on everything else. `lr_at` is the schedule; `set_lr` applies it to
every parameter group, each at its own peak (a group's `lr_scale`: Muon's peak over AdamW's).

Schedules (`optim.schedule`):
  cosine | linear  warmup, then decay to `min_lr` over `decay_steps` (default: the rest of the run)
  constant         warmup, then `lr`
  wsd              warmup -> stable at `lr` -> decay over the last `decay_steps` steps (default:
                   `decay_fraction` of `max_steps`) to `min_lr`, shaped linear, cosine or 1-sqrt.
A WSD run is at its peak until its decay starts, so it can be extended (more `max_steps`) or
cooled down from any checkpoint of its stable phase (`tinylm train --resume RUN --cooldown N`)
without redoing a decay; `stable_until` says up to which step that holds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinylm.config import ConfigError, OptimConfig
from tinylm.train.muon import MuonAdamW, muon_parameters


def param_groups(
    model: nn.Module, weight_decay: float, exclude: set[int] = frozenset()
) -> list[dict]:
    """Two groups: >=2-D weights (matmuls, embeddings) decay; 1-D norms and biases do not.

    Decaying gains and biases pulls them towards zero for no regularization benefit; this is the
    GPT-2/nanoGPT convention. Parameters whose `id` is in `exclude` (Muon's) are left out.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad and id(param) not in exclude:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_supported(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu", "mps", "xpu")


def build_adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where the device supports it (one kernel for all parameters)."""
    if device.type == "xla":  # sync-free AdamW: skips a non-finite step without a host read
        from tinylm.train import xla

        return xla.build_adamw(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    fused = fused_supported(device) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


# How an optimizer runs, not what it computes: a checkpoint's param_groups carry these, and a
# run resumed on another device (XLA's sync-free AdamW saves fused=None) must keep its own.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def implementation(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's implementation flags (see `IMPLEMENTATION_KEYS`)."""
    return [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]


def set_implementation(optimizer: torch.optim.Optimizer, flags: list[dict]) -> None:
    """Put back flags from `implementation` after loading a state dict."""
    for group, keep in zip(optimizer.param_groups, flags, strict=True):
        group.update(keep)


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device, auto_ns_dtype: str | None = None
) -> torch.optim.AdamW | MuonAdamW:
    """AdamW over every parameter, or (`optim.name=muon`) Muon + AdamW as one optimizer.

    `auto_ns_dtype`: what `optim.muon_ns_dtype=auto` means here, when the precision probe
    measured it (tinylm/train/precision.py); None = the device default."""
    if cfg.name == "muon":
        return build_muon_adamw(model, cfg, device, auto_ns_dtype)
    return build_adamw(param_groups(model, cfg.weight_decay), cfg, device)


def build_muon_adamw(
    model: nn.Module, cfg: OptimConfig, device: torch.device, auto_ns_dtype: str | None = None
) -> MuonAdamW:
    """Muon over the hidden matrices (`muon.muon_parameters`), AdamW over the rest."""
    hidden = [p for _, p in muon_parameters(model)]
    if not hidden:
        raise ConfigError("optim.name=muon: the model has no hidden matrices; use optim.name=adamw")
    muon = torch.optim.Muon(
        [{"params": hidden, "lr_scale": cfg.muon_lr / cfg.lr}],
        lr=cfg.muon_lr,
        weight_decay=cfg.muon_weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        ns_steps=cfg.muon_ns_steps,
        adjust_lr_fn=cfg.muon_lr_adjust,
    )
    rest = param_groups(model, cfg.weight_decay, exclude={id(p) for p in hidden})
    adamw = build_adamw([g for g in rest if g["params"]], cfg, device)
    # bfloat16 Newton-Schulz is fast on GPUs, ~19x slower than float32 on an AVX2 CPU (muon.py),
    # faster on an AMX CPU: there the precision probe measures it (auto_ns_dtype)
    ns = cfg.muon_ns_dtype
    if ns == "auto":
        ns = auto_ns_dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return MuonAdamW(muon, adamw, ns_dtype=getattr(torch, ns))


def decay_window(cfg: OptimConfig, max_steps: int) -> tuple[int, int]:
    """(first step of the decay, its length in steps); length 0 = no decay."""
    if cfg.schedule == "constant":
        return max_steps, 0
    if cfg.schedule == "wsd":
        length = (
            cfg.decay_steps
            if cfg.decay_steps is not None
            else round(cfg.decay_fraction * max_steps)
        )
        length = max(0, min(length, max_steps - cfg.warmup_steps))
        return max_steps - length, length
    length = cfg.decay_steps if cfg.decay_steps is not None else max_steps - cfg.warmup_steps
    return cfg.warmup_steps, max(0, length)


def stable_until(cfg: OptimConfig, max_steps: int) -> int | float:
    """The step at which the LR starts to leave its peak (inf: never, a constant schedule)."""
    if cfg.schedule == "constant":
        return math.inf
    start, length = decay_window(cfg, max_steps)
    return start if length > 0 else math.inf


def _shape(progress: float, kind: str) -> float:
    """Decay shape: 1 at progress 0, 0 at progress 1."""
    if kind == "linear":
        return 1.0 - progress
    if kind == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based), for the AdamW (`optim.lr`) groups.

    Linear warmup from lr/warmup to lr over `warmup_steps`; then the schedule's decay window
    (`decay_window`), during which the LR goes from `lr` to `min_lr`; `min_lr` after it.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start, length = decay_window(cfg, max_steps)
    if length <= 0 or step < start:
        return cfg.lr
    progress = min(1.0, (step - start) / length)
    kind = cfg.decay_shape if cfg.schedule == "wsd" else cfg.schedule
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * _shape(progress, kind)


def set_lr(optimizer, lr: float) -> None:
    """Set every group's LR: `lr` times the group's `lr_scale` (Muon's groups: muon_lr / lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
