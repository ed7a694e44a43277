"""The batching engine: requests that arrive together decode together on one KV cache.

One engine serves one loaded model from its own thread. Each request occupies a row of a
preallocated cache `[max_batch, n_kv_head, context, head_dim]`; row r's slot j holds position j
of its sequence, so rows of different lengths share the cache without padding their prompts:

- a new request is admitted between decode steps: its prompt is prefilled alone into its row
  (one forward over the prompt, written through a one-row view of the cache), and its first token
  is sampled;
- each decode step feeds the last token of every active row at once, with per-row positions
  (`GPT.forward(positions=...)`): a row writes its own next slot and attends only to its own
  slots 0..position, so another row's longer history (or an old request's leftovers) is masked;
- a row that finishes (end-of-text, `max_tokens`, or cancelled by its client) is removed at
  once; the last active row moves into its place, so the active rows stay a prefix `0..A-1` of
  the cache and a step computes exactly A rows;
- a row whose prompt + output fill the context leaves the cache the same way and slides, as
  `tinylm.generate` does: each further token recomputes the last `context` ids (one row, no
  cache), so serving and `tinylm generate` give the same tokens past the context, and the
  request is marked `slid` (the API says so in its response).

Every request samples with its own `torch.Generator` (seeded by its `seed`), so a seed
reproduces a request's text whatever else is decoding beside it (up to float rounding of the
batched matmuls: greedy decoding gives the same ids as `tinylm.generate`, tested).

Results go back through callbacks called on the engine thread (`on_token(id)`, then exactly one
`on_done(reason, error)`); the HTTP layer turns them into asyncio events.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tinylm.generate import sample_next
from tinylm.model import GPT, KVCache

# Tests only: seconds to sleep per decode step, so a client can disconnect mid-generation of
# a tiny model (which otherwise finishes in milliseconds).
SLOW_ENV = "TINYLM_TEST_SLOW_DECODE"


@dataclass
class GenerationRequest:
    """One sequence to generate. `cancel()` may be called from any thread."""

    prompt: list[int]
    max_tokens: int
    on_token: Callable[[int], None]
    on_done: Callable[[str, str | None], None]  # reason: stop | length | cancelled | error
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eot_id: int | None = None
    cancelled: bool = False
    slid: bool = False  # went past the context: the oldest ids dropped out of view
    # Engine state
    generator: torch.Generator | None = field(default=None, repr=False)
    length: int = 0  # positions written to the cache
    last: int = 0  # the last sampled id (not yet in the cache)
    produced: int = 0
    finish: str | None = None
    ids: list[int] = field(default_factory=list, repr=False)  # prompt + output (for sliding)

    def cancel(self) -> None:
        self.cancelled = True  # a bool store is atomic; the engine checks it between steps


@dataclass
class EngineStats:
    """Counters shown by `/health`."""

    active: int = 0
    queued: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0
    steps: int = 0


def _rows(cache: KVCache, start: int, stop: int) -> KVCache:
    """A cache whose tensors are views of rows start..stop-1 of `cache` (writes go through)."""
    view = copy.copy(cache)
    view.k = [k[start:stop] for k in cache.k]
    view.v = [v[start:stop] for v in cache.v]
    return view


class BatchEngine:
    """Continuous batching for one model (see the module docstring)."""

    def __init__(self, model: GPT, max_batch: int = 16, name: str = "engine") -> None:
        self.model = model.eval()
        self.max_batch = max_batch
        self.context = model.cfg.context_length
        weight = model.tok_emb.weight
        self.device = weight.device
        self.cache = model.make_kv_cache(max_batch, self.context, self.device, weight.dtype)
        self.stats = EngineStats()
        self._pending: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._active: list[GenerationRequest] = []  # rows 0..A-1 of the cache
        self._sliding: list[GenerationRequest] = []  # past the context: recomputed, no cache
        self._closing = False
        self._closing_seen = False
        self._slow = float(os.environ.get(SLOW_ENV, "0") or 0)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the running batch at the next step."""
        if self._closing:
            raise RuntimeError("engine is closed")
        if not 0 < len(request.prompt) < self.context + 1 or request.max_tokens < 1:
            raise ValueError("a request needs 1..context prompt ids and max_tokens >= 1")
        self.stats.queued += 1
        self._pending.put(request)

    def close(self, wait: bool = False) -> None:
        """Stop taking requests; the thread ends once the active and queued ones finish."""
        self._closing = True
        self._pending.put(None)
        if wait:
            self._thread.join()

    # ---------------------------------------------------------------------------------------
    # The engine thread
    # ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._admit():
                    return
                self._drop_finished()
                if self._active or self._sliding:
                    try:
                        self._step()
                    except Exception as e:  # fail these requests, keep serving others
                        self._fail_all(f"{type(e).__name__}: {e}")

    def _admit(self) -> bool:
        """Move queued requests into free rows (waiting when idle); False when closed and done."""
        while len(self._active) + len(self._sliding) < self.max_batch:
            busy = self._active or self._sliding
            try:
                request = self._pending.get(block=not busy and not self._closing_seen)
            except queue.Empty:
                break
            if request is None:  # close(): finish what is active and queued, then stop
                self._closing_seen = True
                continue
            self.stats.queued -= 1
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            try:
                self._prefill(request)
            except Exception as e:
                self._finish(request, "error", f"{type(e).__name__}: {e}")
        idle = not self._active and not self._sliding
        return not (self._closing_seen and idle and self._pending.empty())

    def _prefill(self, request: GenerationRequest) -> None:
        row = len(self._active)
        request.generator = torch.Generator(device=self.device)
        if request.seed is None:
            request.generator.seed()
        else:
            request.generator.manual_seed(request.seed)
        idx = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        logits, _ = self.model(idx, kv_cache=_rows(self.cache, row, row + 1), last_only=True)
        request.length = len(request.prompt)
        request.ids = list(request.prompt)
        self._active.append(request)
        self._emit([request], logits[:, -1])

    def _step(self) -> None:
        active = self._active
        if self._slow:
            time.sleep(self._slow)
        if active:
            idx = torch.tensor([[r.last] for r in active], dtype=torch.long, device=self.device)
            positions = torch.tensor([r.length for r in active], device=self.device)
            cache = _rows(self.cache, 0, len(active))
            logits, _ = self.model(idx, kv_cache=cache, positions=positions)
            for r in active:
                r.length += 1
            self._emit(active, logits[:, -1])
        for r in self._sliding:  # as generate's sliding window: the last `context` ids
            idx = torch.tensor([r.ids[-self.context :]], dtype=torch.long, device=self.device)
            logits, _ = self.model(idx, last_only=True)
            self._emit([r], logits[:, -1])
        self.stats.steps += 1

    def _emit(self, rows: list[GenerationRequest], logits: torch.Tensor) -> None:
        """Sample each row's next id with its own settings and generator; deliver it."""
        for i, r in enumerate(rows):
            if r.cancelled:
                continue
            nxt = int(
                sample_next(
                    logits[i : i + 1],
                    temperature=r.temperature,
                    top_k=r.top_k,
                    top_p=r.top_p,
                    generator=r.generator,
                )[0]
            )
            if nxt == r.eot_id:
                r.finish = "stop"  # end-of-text: not delivered
                continue
            r.last = nxt
            r.ids.append(nxt)
            r.produced += 1
            self.stats.tokens += 1
            try:
                r.on_token(nxt)
            except Exception:  # the receiver is gone (its event loop closed): stop the row
                r.cancelled = True

    @staticmethod
    def _reason(r: GenerationRequest) -> str | None:
        if r.cancelled:
            return "cancelled"
        if r.finish:
            return r.finish
        return "length" if r.produced >= r.max_tokens else None

    def _drop_finished(self) -> None:
        """Remove finished rows, and rows whose context is full (they slide from now on),
        keeping the active rows a prefix of the cache."""
        i = 0
        while i < len(self._active):
            r = self._active[i]
            reason = self._reason(r)
            full = r.length >= self.context  # no room for the next position in the cache
            if reason is None and not full:
                i += 1
                continue
            self._free_row(i)
            if reason is None:
                r.slid = True
                self._sliding.append(r)
            else:
                self._finish(r, reason)
        for r in list(self._sliding):
            if (reason := self._reason(r)) is not None:
                self._sliding.remove(r)
                self._finish(r, reason)
        self.stats.active = len(self._active) + len(self._sliding)

    def _free_row(self, i: int) -> None:
        """Take row i out of the cache: the last active row moves into its place."""
        last = len(self._active) - 1
        if i != last:
            moved = self._active[last]
            for k, v in zip(self.cache.k, self.cache.v, strict=True):
                k[i, :, : moved.length] = k[last, :, : moved.length]
                v[i, :, : moved.length] = v[last, :, : moved.length]
            self._active[i] = moved
        self._active.pop()

    def _fail_all(self, message: str) -> None:
        for r in self._active + self._sliding:
            self._finish(r, "error", message)
        self._active.clear()
        self._sliding.clear()
        self.stats.active = 0

    def _finish(self, r: GenerationRequest, reason: str, error: str | None = None) -> None:
        if reason == "cancelled":
            self.stats.cancelled += 1
        elif reason == "error":
            self.stats.failed += 1
        else:
            self.stats.completed += 1
        with contextlib.suppress(Exception):  # nobody is listening any more
            r.on_done(reason, error)
