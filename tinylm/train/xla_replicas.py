"""Data-parallel training over the XLA devices of one process: one replica thread per device.

`train.device=xla` in a process that addresses several XLA devices (a TPU VM's cores; XLA's CPU
device with `CPU_NUM_DEVICES=N`, which is how the tests run two replicas) trains one replica per
device, as `xmp.spawn` does within a process: the same loop in a thread per device, each
replica reading its own rows of the global batch (`rank`/`world_size` of the batch loader), the
gradients averaged across replicas inside the step's graph (`xm.all_reduce`, what
`xm.optimizer_step` does), and only the master ordinal (0) writing logs, samples and checkpoints.

Why our own threads and not `xmp.spawn` itself: xmp.spawn runs the replicas in threads of a
child process whose main thread torch_xla keeps, so no replica can install a signal handler and
Ctrl+C could not stop a run cleanly. Here the main thread installs the handlers (one stop flag
shared by every replica, agreed on at each step's end), then waits for the replicas.

What threads share, and what had to change for them (each measured on XLA:CPU, torch_xla 2.9):
- Compiled graphs (XLA:CPU): XLA's CPU runtime keys a collective's rendezvous by the id of the
  compiled module, so two replicas that compile the same step graph at the same time get two
  ids and wait for each other until a fatal timeout (`RendezvousKey ... op_id=0` vs `op_id=1`;
  torch_xla's own xmp.spawn does this with a lone `xm.all_reduce` on XLA:CPU). `xla.sync`
  therefore takes turns there (`ReplicaGroup.sync_turn`): replica 0 compiles each new graph,
  the others find it in the cache. Taking turns needs a sync that returns once its graph is
  launched, which buffer donation prevents: a sync frees the step's donated input buffers and
  that waits for the step to finish, i.e. for the other replicas, who wait for their turn (seen
  in gdb: `PjRtBuffer::ReleaseBuffer` under `torch_xla.sync`). On XLA:CPU the replicas therefore
  run with `XLA_ENABLE_PARAM_ALIASING=0`. On TPUs neither applies (replicas sync concurrently,
  as under xmp.spawn, with donation on); that path is not verified here.
- The host RNG: the model is built on the host by every replica, each from the run's seed, one
  at a time (`runtime.seeded_build`), so all start from the weights a single process builds.
- Host-side collectives (barriers, the monitor's loss mean, evaluation sums, stop flags,
  gathered RNG states) are exchanges between the threads (`ReplicaGroup`): exact, and free of
  the small graph compiles that `xm.mesh_reduce` costs per payload shape. Evaluation is the
  barrier + reduce the TPU lessons ask for: each replica scores its share of the batches, then
  all meet once to add the sums.

Not built: several processes (a multi-host TPU pod, or torchrun with `xla://`). On XLA's CPU
device two processes cannot form one replica group at all: torch_xla 2.9 creates the CPU client
without a distributed key-value store, so each process sees one device and a world of 1
(measured: torchrun --nproc_per_node=2 with `init_method="xla://"` gave two worlds of size 1 and
`xm.all_reduce` returned each process's own value), so that path could not be tested here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from tinylm.train import distributed, signals

T = TypeVar("T")

# A replica that failed leaves the others waiting in a collective; they are given this long to
# notice (the exchanges are aborted at once; a device collective may not return at all).
ABANDON_AFTER_S = 30.0


class Aborted(RuntimeError):
    """Another replica failed: this one stops waiting for it."""


class ReplicaGroup:
    """The replicas of one process: host-side collectives between their threads and the turns
    their XLA syncs take. Every replica must call the same collectives in the same order."""

    def __init__(self, size: int, stop: signals.GracefulStop, ordered_syncs: bool) -> None:
        self.size = size
        self.ordered_syncs = ordered_syncs  # XLA:CPU (see the module docstring)
        self.stop = stop  # one stop request for every replica (signals arrive in the main thread)
        self._barrier = threading.Barrier(size)
        self._slots: list[Any] = [None] * size
        self._turn = threading.Condition()
        self._next = 0  # the replica whose sync is next: syncs go round 0, 1, ..., size-1, 0, ...
        self.aborted = False

    def describe(self) -> str:
        """The run's start line about its replicas."""
        how = "syncs in turns, " if self.ordered_syncs else ""
        return (
            f"xla replicas: {self.size} (one thread per XLA device of this process; gradients "
            f"averaged in the step's graph; {how}ordinal 0 writes files)"
        )

    def exchange(self, rank: int, obj: Any) -> list[Any]:
        """Every replica's `obj`, in rank order, on every replica."""
        try:
            self._barrier.wait()  # everyone has read the previous exchange
            self._slots[rank] = obj
            self._barrier.wait()  # everyone has written
        except threading.BrokenBarrierError:
            raise Aborted("another XLA replica failed (see its error)") from None
        return list(self._slots)

    def reduce(self, rank: int, value: torch.Tensor, op: str) -> torch.Tensor:
        """Elementwise sum, mean or max of `value` over the replicas, on `value`'s device."""
        values = torch.stack(self.exchange(rank, value.detach().cpu()))
        if op == "max":
            out = values.max(dim=0).values
        else:
            out = values.sum(dim=0)  # rank order: the same sum on every replica
            if op == "mean":
                out = out / self.size
        return out.to(value.device)

    def sync_turn(self, rank: int, sync: Callable[[], None]) -> None:
        """Run `sync` (cut and launch the lazy graph) when it is `rank`'s turn.

        Round-robin, not a lock: a replica's sync can wait for its device to finish the
        previous step, whose all-reduce waits for the other replicas to launch theirs; a lock
        held through that wait would keep them from launching.
        """
        if not self.ordered_syncs:
            sync()
            return
        with self._turn:
            while self._next != rank:
                if self.aborted:
                    raise Aborted("another XLA replica failed (see its error)")
                self._turn.wait(timeout=1.0)
            try:
                sync()
            finally:
                self._next = (self._next + 1) % self.size
                self._turn.notify_all()

    def abort(self) -> None:
        """Release every replica waiting for one that failed."""
        self.aborted = True
        self._barrier.abort()
        with self._turn:
            self._turn.notify_all()


def run(replica: Callable[[], T]) -> T:
    """Run `replica()` once per XLA device of this process, each in its own thread as one
    replica of the group; return the master's (ordinal 0) result.

    The calling (main) thread owns the signal handlers: a Ctrl+C or SIGTERM sets the stop flag
    every replica shares, and the replicas stop together at the end of the current step, the
    master writing the checkpoint.
    """
    import torch_xla.core.xla_model as xm

    devices = xm.get_xla_supported_devices()
    ordered = xm.xla_device_hw(devices[0]) == "CPU"
    if ordered:  # read at the first sync, which is a replica's (see the module docstring)
        os.environ["XLA_ENABLE_PARAM_ALIASING"] = "0"
    stop = signals.GracefulStop()
    group = ReplicaGroup(len(devices), stop, ordered_syncs=ordered)
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}

    def start(rank: int, device: str) -> None:
        try:
            # The thread's default XLA device, and the devices its collectives span.
            xm.set_replication(torch.device(device), devices)
            distributed.set_thread_info(
                distributed.DistInfo(
                    rank=rank, local_rank=rank, world_size=len(devices), group=group
                )
            )
            results[rank] = replica()
        except BaseException as e:  # reported by the main thread
            errors[rank] = e
            group.abort()

    threads = [
        threading.Thread(target=start, args=(rank, device), name=f"xla-replica-{rank}", daemon=True)
        for rank, device in enumerate(devices)
    ]
    with stop:  # installs the handlers: this is the main thread
        for thread in threads:
            thread.start()
        abandon_at = None
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.2)  # short: the handlers run between the waits
            if errors and abandon_at is None:
                abandon_at = time.monotonic() + ABANDON_AFTER_S
            if abandon_at is not None and time.monotonic() > abandon_at:
                break  # daemon threads stuck in a device collective die with the process
    if errors:
        # The first failure, not the replicas it aborted.
        first = next((e for e in errors.values() if not isinstance(e, Aborted)), None)
        raise first or next(iter(errors.values()))
    return results[0]
