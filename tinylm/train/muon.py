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

FSDP2: parameters, gradients and Muon's momentum buffers are DTensor shards (rows split across
ranks), but Newton–Schulz needs the whole matrix. Each rank therefore gathers the full parameter,
gradient and momentum of every Muon matrix (`full_tensor()`), runs torch's Muon update on the
full tensors (the same computation on every rank, and the same as one process), and keeps its own
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

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
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
        if not any(_is_dtensor(p) for p in params):
            self.muon.step()
            return
        # FSDP2 shards (module docstring): gather, update the full matrices, keep our rows.
        from torch.optim._muon import muon as muon_update

        for group in self.muon.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.muon.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                full_p, full_buf = p.full_tensor(), buf.full_tensor()
                muon_update(
                    [full_p],
                    [p.grad.full_tensor()],
                    [full_buf],
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    nesterov=group["nesterov"],
                    ns_coefficients=group["ns_coefficients"],
                    ns_steps=group["ns_steps"],
                    eps=group["eps"],
                    adjust_lr_fn=group["adjust_lr_fn"],
                    has_complex=False,
                )
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


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _own_rows(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full`, laid out like the DTensor `like` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
