"""Muon on the transformer's hidden matrices, AdamW on everything else, stepped as one optimizer.

`optim.name=muon` uses PyTorch's own `torch.optim.Muon` (momentum, Newton–Schulz
orthogonalization, the LR adjusted by matrix shape: `optim.muon_lr_adjust`, "original" =
sqrt(max(1, rows/cols)), or "match_rms_adamw" = 0.2 * sqrt(max(rows, cols))) for the weights of
the linear layers inside `model.blocks` (attention qkv/proj, MLP fc/proj), and AdamW for the
embeddings, the output head, norms and biases: Muon is meant for hidden-layer matrices only.

`MuonAdamW` owns both and looks like one optimizer to the trainer: `param_groups` (AdamW's first,
so group 0 carries the base LR that the monitor logs), `step`, `zero_grad`, `state_dict` /
`load_state_dict`, `defaults["fused"]` and the `found_inf` attribute of the non-finite skip.
Each Muon group carries `lr_scale = muon_lr / lr`, so `optim.set_lr` schedules both at their own
peaks. Under torchrun, `optimizers` (the pair) is what torch.distributed.checkpoint's state-dict
helpers take (they accept a list of optimizers).

Non-finite steps: fused AdamW skips its update on the device through `found_inf`; Muon has no such
input, so the Muon half reads the flag on the host and skips its step (weights and momentum
untouched). On CPU that read costs nothing (CPU kernels run synchronously); on a GPU it is one
synchronization per step.

Newton-Schulz precision (`optim.muon_ns_dtype`): torch's Muon orthogonalizes in bfloat16, which is
fast on GPUs but not on CPUs without bfloat16 matrix units: on this project's 2-core AVX2 machine
one 512x128 orthogonalization took 1044 ms in bfloat16 and 55 ms in float32, and a whole Muon
step of the `tiny` model 14-17 s. `auto` therefore means bfloat16 (torch's own `Muon.step`) on
CUDA and float32 elsewhere, where `muon_update` applies the same rule with float32 matrices.

FSDP2: parameters, gradients and Muon's momentum buffers are DTensor shards (rows split across
ranks), but Newton–Schulz needs the whole matrix. Each rank therefore gathers the full parameter,
gradient and momentum of every Muon matrix (`full_tensor()`), runs the Muon update on the full
tensors (the same computation on every rank, and the same as one process), and keeps its own
rows. The momentum stays a DTensor shard, so checkpoints gather it like AdamW's state. This costs
three all-gathers per matrix per step and repeats the orthogonalization on every rank; at tinylm's
sizes that is cheap, and spreading matrices over ranks would be the next step for large models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def muon_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The hidden matrices: weights of the linear layers inside `model.blocks`, by name."""
    out, seen = [], set()
    for module_name, module in model.named_modules():
        if not module_name.startswith("blocks.") or not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if weight.requires_grad and weight.dim() == 2 and id(weight) not in seen:
            seen.add(id(weight))
            out.append((f"{module_name}.weight", weight))
    return out


class MuonAdamW:
    """A `torch.optim.Muon` and a `torch.optim.AdamW` over disjoint parameters, as one optimizer."""

    def __init__(
        self,
        muon: torch.optim.Muon,
        adamw: torch.optim.AdamW,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.muon, self.adamw, self.ns_dtype = muon, adamw, ns_dtype
        self.optimizers = (adamw, muon)
        self.defaults = {"fused": bool(adamw.defaults.get("fused"))}
        self.found_inf: torch.Tensor | None = None  # set by the trainer before a fused step

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self) -> dict:
        return {**self.adamw.state, **self.muon.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        """One step of both; with `found_inf` set and non-zero, neither changes anything."""
        found_inf = self.found_inf
        if self.defaults["fused"]:
            self.adamw.found_inf = found_inf
            self.adamw.step()
        skip = found_inf is not None and bool(found_inf.item())
        if not self.defaults["fused"] and not skip:
            self.adamw.step()
        if not skip:
            self._muon_step()

    def _muon_step(self) -> None:
        params = [p for g in self.muon.param_groups for p in g["params"]]
        sharded = any(_is_dtensor(p) for p in params)
        if self.ns_dtype == torch.bfloat16 and not sharded:
            self.muon.step()  # torch's own update, Newton-Schulz in bfloat16
            return
        for group in self.muon.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.muon.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                if not _is_dtensor(p):
                    muon_update(p, p.grad, buf, group, self.ns_dtype)
                    continue
                # FSDP2 shards (module docstring): gather, update the full matrix, keep our rows.
                full_p, full_buf = p.full_tensor(), buf.full_tensor()
                muon_update(full_p, p.grad.full_tensor(), full_buf, group, self.ns_dtype)
                p.to_local().copy_(_own_rows(full_p, p))
                buf.to_local().copy_(_own_rows(full_buf, buf))

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"adamw", "muon"}:
            from tinylm.train.checkpoint import CheckpointError

            raise CheckpointError(
                "this checkpoint's optimizer state is not Muon + AdamW (optim.name changed?); "
                "resume with the run's own optim.name"
            )
        scales = [g.get("lr_scale", 1.0) for g in self.param_groups]
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])
        # The current config's LR ratio wins over the saved one (it only matters after --force).
        for group, scale in zip(self.param_groups, scales, strict=True):
            group["lr_scale"] = scale


def newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype
) -> torch.Tensor:
    """torch.optim.Muon's orthogonalization (the same quintic iteration, coefficients and
    normalization) computed in `dtype`; bitwise torch's own in bfloat16 (tests/test_muon.py)."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@torch.no_grad()
def muon_update(
    param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, group: dict, dtype
) -> None:
    """One Muon update of one matrix, in place: torch.optim.Muon's rule (momentum, Nesterov,
    orthogonalization, decoupled decay, its shape-based LR adjustment), Newton-Schulz in `dtype`."""
    from torch.optim._muon import _adjust_lr

    buf.lerp_(grad, 1 - group["momentum"])
    update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
    update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
    param.mul_(1 - group["lr"] * group["weight_decay"])
    param.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], param.shape))


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _own_rows(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full`, laid out like the DTensor `like` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
