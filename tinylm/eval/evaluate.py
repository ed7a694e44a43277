"""Evaluation: loss, perplexity and bits per byte of a model on held-out tokens.

One scoring core, three ways to choose what it scores:

- `evaluate`: bounded — at most `max_batches` batches of fixed windows spread evenly over the set,
  the same every call, so validation during training is cheap and comparable across steps.
- `evaluate_full`: every target token exactly once, over non-overlapping windows or a sliding
  window with a stride (each window after the first scores only its last `stride` targets, so
  they see at least `seq_len - stride` tokens of history; the Hugging Face perplexity recipe).
- `evaluate_sets`: several named sets, plus their token-weighted overall result.

Losses are summed per token (the model's mean loss times its number of scored targets, with
unscored targets set to -1, the model's ignore index), so means are exact token-weighted means.
Sums stay on the device until the end: no host sync per batch. A `should_stop` callback checked
between batches lets Ctrl+C end an evaluation early with a result flagged `partial`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tinylm.data.errors import DataError
from tinylm.data.loader import TokenSource, gather_windows, host_tensors, to_device

AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]
Reduce = Callable[[torch.Tensor], torch.Tensor]  # a sum over the ranks (all-reduce)


@dataclass(frozen=True)
class EvalResult:
    """Scores over `tokens` scored target tokens; `nats` and `num_bytes` allow exact merging."""

    loss: float  # mean nats per scored token
    perplexity: float
    bits_per_byte: float | None  # None when no token byte lengths were given
    tokens: int
    batches: int
    partial: bool = False  # stopped early by `should_stop`
    nats: float = 0.0  # sum of the scored tokens' losses
    num_bytes: int | None = None  # sum of the scored tokens' UTF-8 byte lengths

    @classmethod
    def from_sums(
        cls, nats: float, tokens: int, num_bytes: int | None, batches: int, partial: bool
    ) -> EvalResult:
        """Derive loss, perplexity and bits per byte from summed nats, tokens and bytes."""
        loss = nats / tokens if tokens else math.nan
        perplexity = math.exp(min(loss, 700.0)) if tokens else math.nan  # 700: exp overflow
        if num_bytes is None:
            bpb = None
        else:
            bpb = nats / (math.log(2) * num_bytes) if num_bytes else math.nan
        return cls(loss, perplexity, bpb, tokens, batches, partial, nats, num_bytes)

    @classmethod
    def merge(cls, results: list[EvalResult]) -> EvalResult:
        """The token-weighted result over several disjoint evaluations."""
        byte_counts = [r.num_bytes for r in results]
        return cls.from_sums(
            nats=sum(r.nats for r in results),
            tokens=sum(r.tokens for r in results),
            num_bytes=None if None in byte_counts else sum(byte_counts),  # type: ignore[arg-type]
            batches=sum(r.batches for r in results),
            partial=any(r.partial for r in results),
        )


OVERALL = "overall"  # the key of the token-weighted result in `evaluate_sets`


def _check_length(tokens: TokenSource, seq_len: int) -> int:
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(
            f"the validation set has {n} tokens, fewer than one window of seq_len + 1 = "
            f"{seq_len + 1}; use a larger data.val_fraction or a smaller model.context_length"
        )
    return n


def bounded_windows(num_tokens: int, seq_len: int, max_windows: int) -> np.ndarray:
    """Starts of at most `max_windows` non-overlapping windows spread evenly over the tokens."""
    total = (num_tokens - 1) // seq_len
    n = min(max_windows, total)
    return (np.arange(n, dtype=np.int64) * total // n) * seq_len


def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """`(starts, first_scored)` of windows that score every target position 1..N-1 once.

    Window w starts at `w * stride` and scores its targets from index `first_scored[w]` on: all of
    them in the first window, the last `stride` in the others. If the windows stop short of the
    end, one more window is aligned to the end and scores only the targets not yet scored (so
    every window is full length, and the tail tokens get more history, not less).
    """
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    count = (num_tokens - 1 - seq_len) // stride + 1
    starts = np.arange(count, dtype=np.int64) * stride
    first = np.full(count, seq_len - stride, dtype=np.int64)
    first[0] = 0
    scored_to = int(starts[-1]) + seq_len  # the last target position scored so far
    if scored_to < num_tokens - 1:
        tail = num_tokens - 1 - seq_len
        starts = np.append(starts, tail)
        first = np.append(first, scored_to - tail)
    return starts, first


def score_windows(
    model: nn.Module,
    tokens: TokenSource,
    starts: np.ndarray,
    first_scored: np.ndarray | None,
    *,
    seq_len: int,
    batch_size: int,
    device: str | torch.device,
    autocast: AutocastFactory = contextlib.nullcontext,
    token_bytes: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
) -> EvalResult:
    """Sum the losses of the targets of windows `tokens[s : s + seq_len + 1]`, batch by batch.

    `shard=(rank, world_size)` scores batches rank, rank + world_size, ... only, and `reduce`
    (an all-reduce sum over the ranks) adds up every rank's sums once at the end: the same
    batches as one process, spread over the ranks. Every rank runs the same number of forwards
    (a rank without a batch in the last round re-scores one and discards it), because a sharded
    (FSDP) forward and the `should_stop` vote are collectives.

    In window i only targets with index >= `first_scored[i]` count (None: all). The model must
    follow `forward(idx, targets) -> (logits, mean loss over targets != -1)`. The model is put in
    eval mode under `torch.no_grad()` and returned to its previous mode afterwards.
    """
    device = torch.device(device)
    # float64 sums keep millions of token losses exact to ~1e-12; MPS has no float64.
    total = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64)
    total = total.to(device)
    positions = np.arange(seq_len)
    n_tokens, n_bytes, batches, partial = 0, 0, 0, False
    rank, world = shard
    num_batches = -(-len(starts) // batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, num_batches, world):
                if should_stop is not None and should_stop():
                    partial = True
                    break
                padding = first + rank >= num_batches  # this rank has no batch this round
                lo = (num_batches - 1 if padding else first + rank) * batch_size
                x, y = host_tensors(
                    gather_windows(tokens, starts[lo : lo + batch_size], seq_len + 1),
                    pin=device.type == "cuda",
                )
                targets = y.numpy()
                if first_scored is not None:
                    targets[positions[None, :] < first_scored[lo : lo + batch_size, None]] = -1
                scored = targets >= 0
                count = 0 if padding else int(scored.sum())
                if token_bytes is not None and not padding:
                    n_bytes += int(token_bytes[targets[scored]].sum())
                with autocast():
                    _, loss = model(to_device(x, device), to_device(y, device))
                total += loss.detach().to(total.dtype) * count
                n_tokens += count
                batches += 0 if padding else 1
    finally:
        model.train(was_training)
    if reduce is not None:  # one collective for the whole evaluation
        sums = torch.tensor([total.item(), n_tokens, n_bytes, batches], dtype=torch.float64)
        sums = reduce(sums.to(device) if device.type == "cuda" else sums).cpu()  # NCCL: on GPU
        total, (n_tokens, n_bytes, batches) = sums[0], map(int, sums[1:].tolist())
    return EvalResult.from_sums(
        float(total.item()), n_tokens, None if token_bytes is None else n_bytes, batches, partial
    )


def evaluate(
    model: nn.Module,
    tokens: TokenSource,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None,
    stride: int | None = None,
    device: str | torch.device,
    autocast: AutocastFactory = contextlib.nullcontext,
    token_bytes: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
) -> EvalResult:
    """Bounded, deterministic validation: at most `max_batches` batches of fixed windows.

    The windows are non-overlapping and spread evenly over the whole set (not its beginning),
    and identical on every call, so results at different steps are comparable.
    `max_batches=None` is the full pass of `evaluate_full` (with `stride`).
    """
    n = _check_length(tokens, seq_len)
    if max_batches is None:
        starts, first_scored = sliding_windows(n, seq_len, stride or seq_len)
    else:
        starts, first_scored = bounded_windows(n, seq_len, max_batches * batch_size), None
    return score_windows(
        model,
        tokens,
        starts,
        first_scored,
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
        autocast=autocast,
        token_bytes=token_bytes,
        should_stop=should_stop,
        shard=shard,
        reduce=reduce,
    )


def evaluate_full(
    model: nn.Module, tokens: TokenSource, *, stride: int | None = None, **kwargs: Any
) -> EvalResult:
    """Score every target token of the set exactly once (for final numbers).

    `stride=None` (or `seq_len`): non-overlapping windows. A smaller stride slides the window so
    that each token is predicted with at least `seq_len - stride` tokens of history, at the cost
    of `seq_len / stride` times more compute. Other keyword arguments are `evaluate`'s.
    """
    return evaluate(model, tokens, max_batches=None, stride=stride, **kwargs)


def evaluate_sets(
    model: nn.Module,
    val: Mapping[str, TokenSource],
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None,
    stride: int | None = None,
    device: str | torch.device,
    autocast: AutocastFactory = contextlib.nullcontext,
    token_bytes: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
) -> dict[str, EvalResult]:
    """Evaluate each named set (bounded by `max_batches`, or a full pass when it is None).

    Returns `{name: result, ..., "overall": result}`; the overall result weights every scored
    token equally. After a stop request the remaining sets are skipped and the overall result
    is flagged partial. `shard` and `reduce` spread the batches over ranks (`score_windows`).
    """
    if OVERALL in val:
        raise DataError(f"a validation set may not be named '{OVERALL}'; rename it")
    results: dict[str, EvalResult] = {}
    for name, tokens in val.items():
        results[name] = evaluate(
            model,
            tokens,
            batch_size=batch_size,
            seq_len=seq_len,
            max_batches=max_batches,
            stride=stride,
            device=device,
            autocast=autocast,
            token_bytes=token_bytes,
            should_stop=should_stop,
            shard=shard,
            reduce=reduce,
        )
        if results[name].partial:
            break
    overall = EvalResult.merge(list(results.values()))
    if len(results) < len(val):
        overall = EvalResult.from_sums(
            overall.nats, overall.tokens, overall.num_bytes, overall.batches, partial=True
        )
    return {**results, OVERALL: overall}
