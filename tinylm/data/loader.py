"""Training batches: windows of tokens turned into `(x, y)` tensors, one micro-step at a time.

Every batch is a pure function of `(seed, rank, step, micro)`, so a resumed run needs only its
step to continue the exact data stream, and prefetching cannot change what the model sees.

Two sampling modes:

- `random` (default): each row is a window starting at a uniformly random offset of a source
  chosen by weight. The generator is seeded from `(seed, rank, step, micro)`, so ranks get
  independent streams (they may, rarely, draw the same window; with random offsets that is
  harmless and needs no coordination).
- `sequential`: one pass per epoch over the non-overlapping windows of each source, in a seeded
  per-epoch permutation shared by all ranks. Global row `g` of the run is row `g // world_size`
  of rank `g % world_size` (strided), so ranks read disjoint windows. Sources are interleaved
  through a fixed, seeded table of `_SLOTS` slots whose counts follow the weights, which makes
  "how many rows did source s get before row g" arithmetic instead of a running count.

Windows are read straight from the (memory-mapped) token arrays; nothing loads a file whole.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import torch

from tinylm.data.curriculum import Curriculum
from tinylm.data.errors import DataError

# Mixing table length for sequential mode. Prime, so that with any world size below it the
# strided rows of each rank walk through every slot (weight resolution: 1/1009 ~ 0.1%).
_SLOTS = 1009

# Stream tags keep the seeded generators of different purposes apart.
_TAG_RANDOM, _TAG_PERMUTATION, _TAG_SLOTS = 1, 2, 3


class TokenSource(Protocol):
    """What the loader and the evaluator read: `len()` and `[a:b]` (a NumPy array).

    `tinylm.data.shards.TokenArray`, a 1-D `np.ndarray` and an `np.memmap` all qualify.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, key: slice) -> np.ndarray: ...


def gather_windows(tokens: TokenSource, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows `tokens[s : s + length]` for each `s` in `starts`, as int64 `[len(starts), length]`.

    One slice per row: it reads only the pages a window touches and works for any TokenSource.
    A plain array or memmap is first viewed as a bare ndarray, because slicing an `np.memmap`
    builds a memmap object per slice (~2.5 us each, most of the batch time for 32 rows).
    """
    if isinstance(tokens, np.ndarray):
        tokens = tokens.view(np.ndarray)
    out = np.empty((len(starts), length), dtype=np.int64)
    for i, s in enumerate(starts.tolist()):
        out[i] = tokens[s : s + length]
    return out


def host_tensors(rows: np.ndarray, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `[n, T+1]` windows into contiguous int64 `x = rows[:, :-1]`, `y = rows[:, 1:]`.

    Contiguous because losses flatten targets with `.view(-1)`; pinned (page-locked) when `pin`,
    so the copy to the GPU can be asynchronous.
    """
    n, length = rows.shape
    x = torch.empty((n, length - 1), dtype=torch.int64, pin_memory=pin)
    y = torch.empty((n, length - 1), dtype=torch.int64, pin_memory=pin)
    x.numpy()[:] = rows[:, :-1]
    y.numpy()[:] = rows[:, 1:]
    return x, y


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a host tensor to `device`; asynchronous when it is pinned and the device is CUDA."""
    if device.type == "cpu":
        return t
    # Non-blocking from pinned memory: the copy overlaps with compute already queued.
    return t.to(device, non_blocking=t.is_pinned())


def seeded_rng(*parts: int) -> np.random.Generator:
    """A PCG64 generator determined by the integers `parts` (any sign, up to 64 bits each).

    Each part is packed into two fixed uint32 words so that different tuples never collide
    (SeedSequence would otherwise split a big int into a variable number of words).
    """
    words = np.array([p % (1 << 64) for p in parts], dtype=np.uint64)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words.view(np.uint32))))


def _mixing_slots(probs: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequential-mode source table: (source of each slot, its occurrence index, per-source quota).

    Quotas follow the weights by largest remainder (every source keeps at least one slot); the
    slots are shuffled once with the seed so that no rank sees a biased subset.
    """
    raw = probs * _SLOTS
    quota = np.maximum(np.floor(raw).astype(np.int64), 1)
    while quota.sum() < _SLOTS:
        quota[np.argmax(raw - quota)] += 1
    while quota.sum() > _SLOTS:
        quota[np.argmax(np.where(quota > 1, quota - raw, -np.inf))] -= 1
    slot_source = seeded_rng(seed, _TAG_SLOTS).permutation(np.repeat(np.arange(len(probs)), quota))
    slot_occ = np.empty(_SLOTS, dtype=np.int64)
    for s, q in enumerate(quota):
        slot_occ[slot_source == s] = np.arange(q)
    return slot_source, slot_occ, quota


class _Failure:
    """An exception raised in the prefetch thread, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Prefetcher:
    """A daemon thread running `produce(key)` over `keys` into a bounded queue."""

    def __init__(self, produce: Callable[[Any], Any], keys: Iterator[Any], depth: int) -> None:
        self._produce, self._keys = produce, keys
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        # Daemon: a consumer that never closes us must not keep the interpreter alive at exit.
        self._thread = threading.Thread(target=self._run, name="tinylm-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        # Time out now and then so that close() is noticed even when the queue stays full.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for key in self._keys:
                if not self._put(self._produce(key)):
                    return
        except BaseException as e:  # surfaced by get(); the thread itself must not die silently
            self._put(_Failure(e))

    def get(self) -> Any:
        """The next item, or None once `close()` was called."""
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread stopped without a batch") from None
                continue
            if isinstance(item, _Failure):
                raise item.error
            return item
        return None

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5.0)


class BatchLoader:
    """Batches of `(x, y)` windows from weighted token sources, resumable from a step number.

    Args:
        sources: `(name, tokens, weight)` per source; tokens is any TokenSource.
        batch_size: rows per micro-batch (per rank).
        seq_len: tokens per row of `x` (a window is `seq_len + 1` tokens).
        grad_accum: micro-batches per optimizer step.
        seed: the data seed; with rank, step and micro it determines every batch.
        rank, world_size: this process's place in data-parallel training.
        sampling: `"random"` windows or `"sequential"` epochs (see the module docstring).
        device: where `iterate` puts the tensors (pinned memory + non-blocking copy on CUDA).
        prefetch: batches prepared ahead in a background thread (0 = on the caller's thread).
        curriculum: mixture weights per step (`data.phases`, random sampling only); None = the
            sources' own weights throughout.
    """

    def __init__(
        self,
        sources: Sequence[tuple[str, TokenSource, float]],
        *,
        batch_size: int,
        seq_len: int,
        grad_accum: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        sampling: Literal["random", "sequential"] = "random",
        device: str | torch.device = "cpu",
        prefetch: int = 2,
        curriculum: Curriculum | None = None,
    ) -> None:
        if not sources:
            raise DataError("the loader needs at least one training source")
        if batch_size <= 0 or seq_len <= 0 or grad_accum <= 0:
            raise ValueError("batch_size, seq_len and grad_accum must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if sampling not in ("random", "sequential"):
            raise ValueError(f"sampling must be 'random' or 'sequential', got {sampling!r}")
        if prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        self.names = [name for name, _, _ in sources]
        self.tokens = [tokens for _, tokens, _ in sources]
        self.lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        for name, n in zip(self.names, self.lengths.tolist(), strict=True):
            if n < seq_len + 1:
                raise DataError(
                    f"training source '{name}' has {n} tokens, fewer than one window of "
                    f"seq_len + 1 = {seq_len + 1}; use more text or a smaller model.context_length"
                )
        weights = np.array([float(w) for _, _, w in sources])
        if not np.all(np.isfinite(weights) & (weights > 0)):
            raise DataError(f"source weights must be positive numbers, got {weights.tolist()}")
        self.probs = weights / weights.sum()
        self.batch_size, self.seq_len, self.grad_accum = batch_size, seq_len, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.sampling = sampling
        self.device = torch.device(device)
        self.prefetch = prefetch
        if curriculum is not None and sampling != "random":
            raise DataError("a data curriculum (data.phases) needs data.sampling=random")
        self.curriculum = curriculum
        self._pin = self.device.type == "cuda"
        # Sequential mode: window k of a source is tokens[k*T : k*T + T + 1] (targets disjoint).
        self.windows = (self.lengths - 1) // seq_len
        self._slot_source, self._slot_occ, self._quota = _mixing_slots(self.probs, seed)
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._perm_lock = threading.Lock()
        self._prefetchers: set[_Prefetcher] = set()

    # -- which windows ----------------------------------------------------------------------

    def rows(self, step: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
        """`(source index, start offset)` of each row of micro-batch `(step, micro)` on this rank."""
        if step < 0 or not 0 <= micro < self.grad_accum:
            raise ValueError(f"no micro-batch ({step}, {micro}) with grad_accum={self.grad_accum}")
        if self.sampling == "random":
            return self._random_rows(step, micro)
        return self._sequential_rows(step, micro)

    def _random_rows(self, step: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
        rng = seeded_rng(self.seed, _TAG_RANDOM, self.rank, step, micro)
        n = self.batch_size
        probs = self.probs if self.curriculum is None else self.curriculum.probs(step)
        src = (
            rng.choice(len(probs), size=n, p=probs)
            if len(self.probs) > 1
            else np.zeros(n, dtype=np.int64)
        )
        # Valid starts are 0 .. len - seq_len - 1 so that a window of seq_len + 1 tokens fits.
        starts = rng.integers(0, self.lengths[src] - self.seq_len)
        return src, starts

    def _sequential_rows(self, step: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
        micro_index = step * self.grad_accum + micro
        g = (micro_index * self.batch_size + np.arange(self.batch_size)) * self.world_size
        g += self.rank
        rounds, pos = np.divmod(g, _SLOTS)
        src = self._slot_source[pos]
        nth = rounds * self._quota[src] + self._slot_occ[pos]  # rows of src before this one
        epoch, idx = np.divmod(nth, self.windows[src])
        window = np.empty_like(idx)
        for s, e in {(int(s), int(e)) for s, e in zip(src, epoch, strict=True)}:
            mask = (src == s) & (epoch == e)
            window[mask] = self._permutation(s, e)[idx[mask]]
        return src, window * self.seq_len

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        # Shared by every rank (no rank in the seed), which is what makes strided rows disjoint.
        with self._perm_lock:
            perm = self._perms.get((source, epoch))
            if perm is None:
                rng = seeded_rng(self.seed, _TAG_PERMUTATION, source, epoch)
                perm = rng.permutation(int(self.windows[source]))
                # Keep at most two epochs per source: a batch can straddle one boundary.
                self._perms = {
                    k: v for k, v in self._perms.items() if k[0] != source or k[1] > epoch - 2
                }
                self._perms[(source, epoch)] = perm
            return perm

    # -- batches ----------------------------------------------------------------------------

    def host_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `(step, micro)` as CPU tensors (pinned when the device is CUDA)."""
        src, starts = self.rows(step, micro)
        length = self.seq_len + 1
        if len(self.tokens) == 1:
            windows = gather_windows(self.tokens[0], starts, length)
        else:
            windows = np.empty((len(starts), length), dtype=np.int64)
            for s in np.unique(src).tolist():
                mask = src == s
                windows[mask] = gather_windows(self.tokens[s], starts[mask], length)
        return host_tensors(windows, self._pin)

    def _micro_steps(self, start_step: int) -> Iterator[tuple[int, int]]:
        step = start_step
        while True:
            for micro in range(self.grad_accum):
                yield step, micro
            step += 1

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return to_device(x, self.device), to_device(y, self.device)

    def iterate(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield `(x, y)` on `device` for micro-steps `(start_step, 0)`, `(start_step, 1)`, ...

        Endless: the caller decides when to stop. Closing the generator stops its prefetch
        thread; `close()` on the loader stops all of them and ends their iterations.
        """
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        keys = self._micro_steps(start_step)
        if self.prefetch == 0:
            for step, micro in keys:
                yield self._to_device(*self.host_batch(step, micro))
            return
        prefetcher = _Prefetcher(lambda key: self.host_batch(*key), keys, self.prefetch)
        self._prefetchers.add(prefetcher)
        try:
            while (batch := prefetcher.get()) is not None:  # None: closed from elsewhere
                yield self._to_device(*batch)
        finally:
            prefetcher.close()
            self._prefetchers.discard(prefetcher)

    def close(self) -> None:
        """Stop every prefetch thread started by `iterate` (idempotent)."""
        for prefetcher in list(self._prefetchers):
            prefetcher.close()
        self._prefetchers.clear()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
