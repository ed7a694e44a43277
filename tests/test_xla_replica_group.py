"""The host side of XLA replica threads (train/xla_replicas.py) without torch_xla: the
collectives `distributed.*` routes to a `ReplicaGroup`, the round-robin sync turns, and the
abort that frees replicas waiting for one that failed. (Training on two XLA replicas:
tests/xla/test_xla_replicas.py, in .venv-xla.)"""

from __future__ import annotations

import threading

import pytest
import torch

from tinylm.train import distributed
from tinylm.train.signals import GracefulStop
from tinylm.train.xla_replicas import Aborted, ReplicaGroup

SIZE = 3


def _run(group: ReplicaGroup, body) -> dict[int, object]:
    """`body(info)` in one thread per replica, each with its DistInfo; results by rank."""
    results: dict[int, object] = {}

    def start(rank: int) -> None:
        info = distributed.DistInfo(rank=rank, local_rank=rank, world_size=SIZE, group=group)
        distributed.set_thread_info(info)
        try:
            results[rank] = body(distributed.setup())
        except Exception as e:
            results[rank] = e
            group.abort()

    threads = [threading.Thread(target=start, args=(r,), daemon=True) for r in range(SIZE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a replica hung"
    return results


def test_collectives_between_replica_threads():
    group = ReplicaGroup(SIZE, GracefulStop(), ordered_syncs=True)

    def body(info):
        distributed.barrier(info)
        value = torch.tensor([float(info.rank), 10.0 * info.rank])
        return (
            distributed.all_reduce_sum(value, info).tolist(),
            distributed.all_reduce_mean(value, info).tolist(),
            distributed.all_reduce_max(value, info).tolist(),
            distributed.gather_objects(f"r{info.rank}", info),
            distributed.broadcast_object(f"from {info.rank}", info),
            distributed.any_ranks([info.rank == 2, False], info, torch.device("cpu")),
            distributed.setup() is info,
        )

    results = _run(group, body)
    for rank in range(SIZE):
        assert results[rank] == (
            [3.0, 30.0],
            [1.0, 10.0],
            [2.0, 20.0],
            ["r0", "r1", "r2"],
            "from 0",
            [True, False],
            True,
        ), (rank, results[rank])
    assert distributed.setup() == distributed.DistInfo()  # this (main) thread: no replica


def test_syncs_take_turns_in_rank_order():
    group = ReplicaGroup(SIZE, GracefulStop(), ordered_syncs=True)
    order: list[int] = []

    def body(info):
        for _ in range(4):
            group.sync_turn(info.rank, lambda: order.append(info.rank))

    _run(group, body)
    assert order == [0, 1, 2] * 4


def test_a_failed_replica_releases_the_others():
    group = ReplicaGroup(SIZE, GracefulStop(), ordered_syncs=True)

    def body(info):
        if info.rank == 1:
            raise ValueError("replica 1 broke")
        if info.rank == 2:  # waits for the turns of replicas 0 and 1, which never come
            group.sync_turn(2, lambda: None)
        distributed.barrier(info)

    results = _run(group, body)
    assert isinstance(results[1], ValueError)
    assert isinstance(results[0], Aborted) and isinstance(results[2], Aborted)
    with pytest.raises(Aborted):
        group.exchange(0, None)
