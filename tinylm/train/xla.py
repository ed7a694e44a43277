"""Training on an XLA device (`train.device=xla`: TPUs; XLA's CPU device in tests) via PyTorch/XLA.

On XLA, tensor operations are recorded lazily into a graph that is compiled and run when the
program asks for a value or marks a step. The trainer stays the same loop; this module holds the
few places where that model of execution matters, each a lesson that cost people days:

- One graph per optimizer step: `sync()` (`torch_xla.sync`, formerly `xm.mark_step`) ends
  `train_step`, and again after an evaluation. Nothing reads a value (`.item()`, logging) before
  it: losses stay on the device and the monitor reads them every `log.interval` steps, after the
  sync. A read in the middle of a step cuts the graph in two and stalls the host every step.
- Non-finite steps are skipped without a host read: torch_xla's sync-free AdamW takes the
  `found_inf` flag as a tensor (what fused AdamW does on CPU/CUDA), so no `if nonfinite.item()`.
- The learning rate changes every step; the XLA AdamW kernel takes it as data, so a new value
  does not compile a new graph (the XLA tests count compilations).
- Batches are made on the host (the same `BatchLoader`, so a run's data is the CPU run's) and
  moved to the device ahead of use by torch_xla's `ParallelLoader` threads.
- Files (checkpoints, samples, logs) are written by the master ordinal only, from tensors moved
  to the host first; tied weights stay tied in the host copy.
- Samples are generated on a host copy of the model: token-by-token decoding changes tensor
  shapes every token, which on XLA compiles a graph per token.
- Nothing forks the initialised runtime (a forked child of it hangs): batches come from threads,
  never DataLoader worker processes (whose `num_workers > 0` failed silently on TPUs), and data
  preparation's worker processes start with `spawn`.

Install: torch_xla needs its own torch, so it lives in `.venv-xla` (`bash scripts/setup.sh
--xla`). Everything here imports torch_xla lazily; without it `train.device=xla` is refused with
the command that installs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tinylm.config import ConfigError
from tinylm.train import distributed

INSTALL_HINT = (
    "torch_xla needs its own torch: run `bash scripts/setup.sh --xla` and train with "
    "`.venv-xla/bin/tinylm` (on a TPU VM: TINYLM_XLA_EXTRA=tpu bash scripts/setup.sh --xla)"
)


def _torch_xla():
    try:
        import torch_xla
        import torch_xla.core.xla_model  # the submodules used below
        import torch_xla.runtime
    except ImportError as e:
        raise ConfigError(f"train.device=xla needs PyTorch/XLA ({e}); {INSTALL_HINT}") from None
    return torch_xla


def select_device() -> tuple[torch.device, str]:
    """The process's XLA device and a one-line description (ConfigError without torch_xla)."""
    torch_xla = _torch_xla()
    device = torch_xla.device()
    hardware = torch_xla.runtime.device_type() or "unknown"
    return device, f"xla ({hardware}, torch_xla {torch_xla.__version__})"


def device_count() -> int:
    """How many XLA devices this process addresses (a replica each: train/xla_replicas.py)."""
    return len(_torch_xla().core.xla_model.get_xla_supported_devices())


def hardware(device: torch.device) -> str:
    """'TPU', 'CPU', 'CUDA', ... for an XLA device."""
    return _torch_xla().core.xla_model.xla_device_hw(device)


def auto_precision(device: torch.device):
    """`train.precision=auto` on XLA: bf16 autocast on TPUs (their matrix units are bf16), else fp32."""
    from tinylm.train.runtime import Precision

    kind = hardware(device)
    if kind == "TPU":
        return Precision("bf16", "auto: bf16 autocast (TPU matrix units are bf16)")
    return Precision("fp32", f"auto: fp32 on XLA:{kind}")


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to(device)` keeping tied parameters tied.

    Moving to XLA replaces each module's parameters with new ones (an XLA tensor cannot take a
    CPU tensor's place in the same Parameter), once per module: a tied head and embedding would
    become two parameters, each trained with half the gradient (measured: the grad norm of the
    first step 1.283 against the CPU run's 1.245, then the losses apart).
    """
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    model.to(device)
    for first, *aliases in groups.values():
        param = model.get_parameter(first)
        for alias in aliases:
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)
    return model


def sync(dist: Any = None) -> None:
    """Cut the lazy graph here and run it (`mark_step`); values are readable afterwards.

    `dist` (a `distributed.DistInfo`): XLA replicas of one process take turns
    (train/xla_replicas.py: replicas compiling one graph at once never meet in its all-reduce).
    """
    group = getattr(dist, "group", None)
    if group is None:
        _torch_xla().sync()
    else:
        group.sync_turn(dist.rank, _torch_xla().sync)


def set_up_done(dist: Any) -> None:
    """Wait until every XLA replica of this process has finished setting up (a no-op for one).

    Why: a replica that starts its loop launches graphs (the first step's compile and run)
    while a slower replica may still be moving its weights and, on a resume, its optimizer state
    to its device. CI saw one native crash (SIGSEGV) of a resumed two-replica run on XLA:CPU at
    exactly that point, which ~240 runs here did not reproduce; that overlap is the only
    concurrency a resume adds to a fresh start, and one host barrier removes it at no
    measurable cost (a step is milliseconds; set-up is seconds)."""
    if getattr(dist, "group", None) is not None:
        distributed.barrier(dist)


def reduce_gradients(params: list[nn.Parameter], dist: Any) -> None:
    """Average the gradients over the XLA replicas, inside the step's graph (what
    `xm.optimizer_step` does before stepping; here before clipping, so that the clip and the
    logged norm see the global gradient). A no-op for one replica."""
    if dist.world_size <= 1:
        return
    xm = _torch_xla().core.xla_model
    grads = [p.grad for p in params if p.grad is not None]
    xm.all_reduce(xm.REDUCE_SUM, grads, scale=1.0 / dist.world_size)


def rng_state(device: torch.device) -> int:
    """The XLA device's RNG state (dropout masks on the device come from it, not from torch's
    host generator); saved with a checkpoint's other RNG states."""
    return int(_torch_xla().core.xla_model.get_rng_state(device))


def set_rng_state(device: torch.device, state: int) -> None:
    """Seed the device's RNG (a new run: `train.seed + rank`; a resume: the saved state)."""
    _torch_xla().core.xla_model.set_rng_state(int(state), device)


def build_adamw(groups: list[dict], **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW for XLA: skips a non-finite step on the device (`found_inf`), no host read."""
    from torch_xla.amp import syncfree

    class _SyncFreeAdamW(syncfree.AdamW):
        takes_found_inf = True  # the trainer sets `found_inf` before each step

        def __init__(self, params, **kw) -> None:
            super().__init__(params, **kw)
            self.found_inf: torch.Tensor | None = None

        @torch.no_grad()
        def step(self, closure=None):
            self._complete_state()
            return super().step(closure, found_inf=self.found_inf)

        def _complete_state(self) -> None:
            # A state loaded from a CPU checkpoint (torch's AdamW) keeps `step` on the host and
            # has no `max_exp_avg_sq`; the XLA kernel wants both on the device.
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p)
                    if not state:
                        continue
                    if state["step"].device != p.device:
                        state["step"] = state["step"].to(p.device, torch.float32)
                    if "max_exp_avg_sq" not in state:
                        state["max_exp_avg_sq"] = torch.empty(0, device=p.device)

    return _SyncFreeAdamW(groups, **kwargs)


def device_batches(
    host_batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device, prefetch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the host batches on `device`, copied ahead by torch_xla's loader threads."""
    from torch_xla.distributed.parallel_loader import ParallelLoader

    depth = max(1, prefetch)
    # batches_per_execution: the loader would mark a step itself every N batches; the trainer
    # marks one per optimizer step, so the loader never needs to (a huge N).
    loader = ParallelLoader(
        _Once(host_batches),
        [device],
        batches_per_execution=2**31,
        loader_prefetch_size=depth,
        device_prefetch_size=depth,
    )
    try:
        yield from loader.per_device_loader(device)
    finally:
        close = getattr(host_batches, "close", None)
        if close is not None:
            close()
        loader.close()


class _Once:
    """An iterator as the iterable ParallelLoader enumerates (once)."""

    def __init__(self, it: Iterator) -> None:
        self.it = it

    def __iter__(self) -> Iterator:
        return self.it

    def __len__(self) -> int:  # ParallelLoader asks only for progress display
        return 0


def to_host(value: Any) -> Any:
    """`value` (tensors, dicts, lists, tuples) with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


def host_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU, tied weights still one tensor (checkpoint dedupes them)."""
    out: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in copies:
            copies[id(tensor)] = tensor.detach().cpu()
        out[name] = copies[id(tensor)]
    return out


def host_model(model: nn.Module) -> nn.Module:
    """A CPU copy of the GPT `model` for sampling (decoding on XLA compiles a graph per token)."""
    from tinylm.model import GPT

    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the RNG be
        clone = GPT(model.cfg)
    clone.load_state_dict(host_state_dict(model))
    return clone
