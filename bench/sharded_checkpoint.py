"""Full vs sharded checkpoint saves under torchrun (FSDP2, Gloo on CPU): seconds and peak RSS.

Run under torchrun; every rank builds the same GPT, wraps it with FSDP2, takes one AdamW step
(so the optimizer state exists), then saves it `--rounds` times in each format, A/B alternated:

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        bench/sharded_checkpoint.py --rounds 5 --d-model 512 --layers 8

A = full (`checkpoint.format=full`: the state-dict helpers gather weights and AdamW state onto
rank 0, which writes model.safetensors + train_state.pt), B = sharded (`sharded.save`: each rank
writes its own shards through torch.distributed.checkpoint). Per save: the wall time from a
barrier to the end of the save on every rank (rotation not included), and each rank's peak RSS
above its RSS before the save (psutil, sampled every 2 ms by a thread; glibc's free lists are
trimmed before each save, so an earlier save's buffers do not hide this one's). Rank 0 prints medians.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from tinylm.config import load_config
from tinylm.model import GPT
from tinylm.tokenizer.char import CharTokenizer
from tinylm.train import checkpoint, distributed, sharded


class PeakRSS:
    """The peak resident set size of this process above its value at the start, while open."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        # glibc keeps freed memory for reuse: the previous save's buffers would hide this one's
        # peak. Hand them back to the OS first (no-op where there is no glibc).
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss - self.base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()

    info = distributed.setup()
    cfg = load_config(
        "tiny",
        [
            f"model.d_model={args.d_model}",
            f"model.n_layer={args.layers}",
            "model.n_head=8",
            "model.context_length=256",
            "model.vocab_size=256",
            "train.distributed=fsdp",
        ],
    )
    tokenizer = CharTokenizer.fit(["abcdefghijklmnopqrstuvwxyz .,\n"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    n_params = model.num_params()
    model = distributed.wrap_model(model, "fsdp", info, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 256))
    model(x, x)[1].backward()
    optimizer.step()

    root = Path(tempfile.mkdtemp(prefix="tinylm-sharded-bench-")) if info.is_main else None
    root = Path(distributed.broadcast_object(str(root), info))

    def save_full(step: int) -> None:
        model_state = distributed.model_state_dict(model, info)
        optim_state = distributed.optimizer_state_dict(model, optimizer, info)
        if info.is_main:
            train_state = {"optimizer": optim_state, "scaler": None, "rng": [], "loop": {}}
            checkpoint.save_checkpoint(
                root, step, model_state=model_state, train_state=train_state, config=cfg,
                tokenizer=tokenizer,
            )  # fmt: skip

    def save_sharded(step: int) -> None:
        sharded.save(
            root, step, model, optimizer, info, train_state={"scaler": None, "rng": [], "loop": {}},
            config=cfg, tokenizer=tokenizer, val_loss=None,
        )  # fmt: skip

    results: dict[str, list[tuple[float, int]]] = {"full": [], "sharded": []}
    step = 0
    for _ in range(args.rounds):
        for name, save in (("full", save_full), ("sharded", save_sharded)):
            step += 1
            distributed.barrier(info)
            with PeakRSS() as rss:
                start = time.perf_counter()
                save(step)
                distributed.barrier(info)
                seconds = time.perf_counter() - start
            results[name].append((seconds, rss.peak))
            if info.is_main:
                shutil.rmtree(root / checkpoint.checkpoint_name(step))
    every = distributed.gather_objects(results, info)
    if info.is_main:
        print(
            f"{n_params / 1e6:.1f}M parameters, {info.world_size} ranks, {args.rounds} rounds "
            f"(load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})"
        )
        for name in results:
            secs = statistics.median(s for s, _ in every[0][name])
            peaks = [statistics.median(p for _, p in r[name]) / 2**20 for r in every]
            shown = ", ".join(f"rank {i} +{p:,.0f} MiB" for i, p in enumerate(peaks))
            print(f"{name:8s} save {secs:.3f} s (median), peak RSS above before: {shown}")
        shutil.rmtree(root, ignore_errors=True)
    distributed.teardown(info)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
