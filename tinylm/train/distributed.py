"""Multi-process training under torchrun, on torch.distributed's own DDP and FSDP.

Run with `torchrun --nproc_per_node=N -m tinylm.cli train ...` (or `tinylm train` through
torchrun's `--no-python`). One process per device; NCCL on CUDA, Gloo on CPU. Nothing here
re-implements collectives: wrapping is DDP or FSDP2's `fully_shard`, and state dicts for
checkpoints are gathered with torch.distributed.checkpoint's state-dict helpers.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tinylm.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # XLA replica threads of one process (train/xla_replicas.py): their host-side collectives.
    group: Any = field(default=None, compare=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_int(name: str, default: int | None) -> int:
    """An integer the launcher (torchrun) sets in the environment; ConfigError when it is
    malformed, or missing without a default (WORLD_SIZE=2 set by hand, without RANK)."""
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        value = int(text) if text is not None else None
    except ValueError:
        value = None
    if value is None or value < 0:
        raise ConfigError(
            f"{name}={text!r} in the environment: "
            + ("missing, " if text is None else "not a non-negative integer, ")
            + "but WORLD_SIZE asks for a distributed run: launch with torchrun (which sets "
            "WORLD_SIZE, RANK, LOCAL_RANK and MASTER_ADDR), or unset WORLD_SIZE"
        )
    return value


_thread = threading.local()


def set_thread_info(info: DistInfo) -> None:
    """What `setup()` returns in this thread: an XLA replica's place in its group."""
    _thread.info = info


def setup() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a no-op."""
    if (info := getattr(_thread, "info", None)) is not None:
        return info
    world_size = launcher_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = launcher_int("RANK", None), launcher_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ConfigError(
            f"RANK={rank} is not a rank of WORLD_SIZE={world_size} (0..{world_size - 1}): "
            "launch with torchrun, which sets both, or unset WORLD_SIZE"
        )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        timeout = timedelta(minutes=30)
        store = _elastic_store(world_size, timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
            )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def _elastic_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """torchrun's shared rendezvous store, under a key prefix of its own per restart.

    torchrun (c10d rendezvous) hands its workers the store it rendezvoused on, and that store
    outlives a restart of the group: a restarted rank can read the address its dead predecessor
    published and fail to connect ("Connection refused"; pytorch/pytorch#135712). torch's own
    env:// set-up adds no per-restart prefix, so we add one. The restart count is the same on
    every rank of a single-agent group; across several agents it can differ, which is why the
    launch recipes also set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per round).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"tinylm/restart_{restart}", store)


def teardown(info: DistInfo) -> None:
    """Leave the process group: a barrier, `destroy_process_group`, then `settle_gloo_workers`."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        settle_gloo_workers()


def settle_gloo_workers(timeout: float = 2.0) -> None:
    """Let Gloo's worker threads finish with their last collectives before the group is freed.

    `destroy_process_group` does not stop Gloo's workers: the C++ group is freed later, when its
    last holder (DDP's reducer, FSDP's modules) goes, and its destructor joins the workers while
    this thread holds the GIL. A worker that is still dropping its last collective (a barrier
    keeps the collectives before it alive; `all_gather_object`'s tensors are Python tensors)
    needs the GIL for that, so the two wait for each other forever: rank 1 of a CI run hung
    that way after "done" (gdb: main in ~ProcessGroupGloo via ~Reducer joining a thread; the
    thread in take_gil from ~AsyncAllgatherWork via ~AsyncBarrierWork). So: sleep (releasing
    the GIL) until no other thread of this process is runnable twice in a row, at most
    `timeout` seconds. Without /proc (not Linux) it sleeps 50 ms.
    """
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        time.sleep(0.05)
        return
    me = str(threading.get_native_id())
    deadline = time.monotonic() + timeout
    calm = 0
    while calm < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
        busy = any(_runnable(task) for task in tasks.iterdir() if task.name != me)
        calm = 0 if busy else calm + 1


def _runnable(task: Path) -> bool:
    """Whether the thread `/proc/self/task/<tid>` is running or waiting for a CPU."""
    try:
        return (task / "stat").read_text().rpartition(")")[2].split()[0] == "R"
    except (OSError, IndexError):
        return False  # the thread ended meanwhile


def barrier(info: DistInfo) -> None:
    if info.group is not None:
        info.group.exchange(info.rank, None)
    elif info.enabled:
        dist.barrier()


def wrap_model(model: nn.Module, mode: str, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP (replicated weights) or FSDP2 (sharded weights, grads and optimizer state)."""
    if not info.enabled or info.group is not None:  # XLA replicas: xla.reduce_gradients
        return model
    if mode in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns when a wrapped module returns a view (the model's logits): an in-place op on
    # it would skip a backward hook. The loop only back-propagates the loss and never edits
    # the logits, so the warning says nothing about this code.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    return model


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. the grad norm over FSDP shards); others unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP / torch.compile wrapper."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[None]:
    """Skip the gradient all-reduce on accumulation micro-steps except the last."""
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def model_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict of the model, collective under FSDP; all ranks call it."""
    if not info.enabled or info.group is not None:
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap(model), options=options)


def optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo
) -> dict:
    if not info.enabled or info.group is not None:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(unwrap(model), _parts(optimizer), options=options)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo
) -> None:
    """Load a saved optimizer state (full, as `optimizer_state_dict` wrote it) on every rank."""
    if not info.enabled or info.group is not None:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(unwrap(model), _parts(optimizer), state, options=options)


def _parts(optimizer) -> torch.optim.Optimizer | tuple[torch.optim.Optimizer, ...]:
    """A composite optimizer (Muon + AdamW) as its parts, which the state-dict helpers take."""
    return getattr(optimizer, "optimizers", optimizer)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.group is not None:
        return info.group.reduce(info.rank, value, "mean")
    if info.enabled:
        value = value.clone()
        dist.all_reduce(
            value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM
        )
        if dist.get_backend() != "nccl":
            value /= info.world_size
    return value


def _all_reduce(value: torch.Tensor, info: DistInfo, kind: str) -> torch.Tensor:
    """`value` reduced elementwise over all ranks by `kind` ("sum" or "max"): a copy."""
    if info.group is not None:
        return info.group.reduce(info.rank, value, kind)
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM if kind == "sum" else dist.ReduceOp.MAX)
    return value


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The elementwise sum of `value` over all ranks (a copy; `value` itself is unchanged)."""
    return _all_reduce(value, info, "sum")


def gather_objects(obj: object, info: DistInfo) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank (`[obj]` in a single process)."""
    if not info.enabled:
        return [obj]
    if info.group is not None:
        return info.group.exchange(info.rank, obj)
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's `obj` on every rank (the object itself in a single process)."""
    if not info.enabled:
        return obj
    if info.group is not None:
        return info.group.exchange(info.rank, obj)[0]
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_max(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The elementwise maximum of `value` over all ranks (a copy; `value` itself is unchanged)."""
    return _all_reduce(value, info, "max")


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (e.g. a stop requested by one process)."""
    return any_ranks([flag], info, device)[0]


def any_ranks(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """`any_rank` for several flags in one collective (the loop asks two questions a step)."""
    if not info.enabled:
        return list(flags)
    if info.group is not None:
        every = info.group.exchange(info.rank, flags)
        return [any(theirs[i] for theirs in every) for i in range(len(flags))]
    t = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


# What Gloo and NCCL say when a peer process is gone (killed, crashed, its node lost).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_lost_message(error: BaseException) -> str | None:
    """One line for a collective that failed because another rank died, else None.

    Under torchrun that is not a bug in this process: the launcher restarts the group (with
    --max-restarts) and the run resumes from its latest checkpoint (train.resume=auto).
    """
    text = str(error)
    if not dist.is_initialized() or not any(s in text for s in _PEER_LOST):
        return None
    return (
        f"another process of this run stopped (killed or failed) during a collective "
        f"({text.splitlines()[0][:160]}); torchrun restarts the group when --max-restarts "
        "allows, and it resumes from the latest checkpoint (train.resume=auto)"
    )
