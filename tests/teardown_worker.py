"""Run by test_distributed.py under torchrun: leave and rejoin a Gloo group many times.

Each round does what the end of a DDP run does (a DDP model, an `all_gather_object`, then
`distributed.teardown`) and then drops the model, whose reducer frees the group. Without
`settle_gloo_workers` the first or second round deadlocked (its docstring, in
tinylm/train/distributed.py, says how).
"""

import os
import sys

import torch
import torch.distributed as dist

from tinylm.train import distributed


def main(rounds: int) -> None:
    rank = int(os.environ["RANK"])
    info = distributed.DistInfo(rank=rank, world_size=2)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), 2)
    for round_ in range(rounds):
        dist.init_process_group(
            "gloo", store=dist.PrefixStore(f"round_{round_}", store), rank=rank, world_size=2
        )
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        everyone: list = [None, None]
        dist.all_gather_object(everyone, {"rank": rank})
        distributed.teardown(info)
        del model  # frees the group: ~ProcessGroupGloo joins its worker threads
    print(f"rank {rank}: {rounds} rounds", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
