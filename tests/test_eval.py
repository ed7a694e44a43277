"""Evaluation: determinism, bits per byte, sliding windows scoring each token once, partial stops."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinylm.data.errors import DataError
from tinylm.eval import EvalResult, evaluate, evaluate_full, evaluate_sets
from tinylm.eval.evaluate import sliding_windows


class PrefixModel(nn.Module):
    """A tiny causal stand-in for GPT: logits from the current token and the mean of its prefix.

    Same contract as tinylm.model.GPT: `forward(idx, targets) -> (logits, mean CE over targets
    != -1)`. It counts every scored target so tests can check what was scored.
    """

    def __init__(self, vocab: int, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.ctx = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.scored: Counter[int] = Counter()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        steps = torch.arange(1, idx.shape[1] + 1, device=idx.device)
        prefix_mean = self.ctx(idx).cumsum(1) / steps[None, :, None]
        logits = self.head(torch.tanh(self.emb(idx) + prefix_mean))
        if targets is None:
            return logits, None
        self.scored.update(targets[targets >= 0].tolist())
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss


class Uniform(nn.Module):
    """Zero logits: every token costs exactly ln(vocab) nats."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.bias.expand(*idx.shape, self.vocab)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


def _nll(model: nn.Module, context: np.ndarray, target: int) -> float:
    logits, _ = model(torch.from_numpy(context)[None])
    return float(F.cross_entropy(logits[0, -1:], torch.tensor([target])))


def test_bounded_eval_is_deterministic_and_restores_the_mode():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=5000)
    model = PrefixModel(50)
    model.train()
    kw = dict(batch_size=4, seq_len=16, max_batches=3, device="cpu")
    a, b = evaluate(model, tokens, **kw), evaluate(model, tokens, **kw)
    assert a == b
    assert a.batches == 3 and a.tokens == 3 * 4 * 16 and not a.partial
    assert model.training
    assert a.perplexity == pytest.approx(math.exp(a.loss))
    assert a.bits_per_byte is None
    model.eval()
    evaluate(model, tokens, **kw)
    assert not model.training


def test_bounded_eval_spreads_windows_over_the_whole_set():
    tokens = np.arange(10_001)
    model = PrefixModel(10_001, dim=2)
    evaluate(model, tokens, batch_size=2, seq_len=10, max_batches=2, device="cpu")
    first_targets = sorted(t for t in model.scored if (t - 1) % 10 == 0)
    assert len(model.scored) == 40 and len(first_targets) == 4
    assert first_targets[-1] > 7000  # not just the beginning of the set


def test_bits_per_byte_by_hand():
    # One window: targets 1, 2, 3, 1 with byte lengths 2, 3, 0 (a special token), 2 = 7 bytes.
    # A uniform model over 4 tokens pays ln 4 nats each: 4 ln 4 / (ln 2 * 7) = 8/7 bits per byte.
    tokens = np.array([0, 1, 2, 3, 1])
    token_bytes = np.array([1, 2, 3, 0], dtype=np.int32)
    kw = dict(batch_size=1, seq_len=4, max_batches=1, device="cpu")
    r = evaluate(Uniform(4), tokens, token_bytes=token_bytes, **kw)
    assert r.tokens == 4 and r.num_bytes == 7
    assert r.loss == pytest.approx(math.log(4))
    assert r.perplexity == pytest.approx(4.0)
    assert r.bits_per_byte == pytest.approx(8 / 7)


@pytest.mark.parametrize(
    ("n", "seq_len", "stride"),
    [(101, 10, None), (101, 10, 10), (101, 10, 3), (100, 10, 7), (57, 8, 1), (11, 10, 4)],
)
def test_full_pass_scores_every_token_exactly_once(n, seq_len, stride):
    model = PrefixModel(n, dim=2)
    # Token i is the integer i, so the counter of scored targets is a counter of positions.
    r = evaluate_full(
        model, np.arange(n), seq_len=seq_len, stride=stride, batch_size=3, device="cpu"
    )
    assert model.scored == Counter(range(1, n))
    assert r.tokens == n - 1


def test_sliding_windows_give_at_least_seq_len_minus_stride_of_history():
    starts, first = sliding_windows(100, 10, 4)
    assert first[0] == 0 and starts[0] == 0
    # Target j of a window sees tokens 0..j of it, so scoring j >= first means first + 1 of history.
    assert np.all(first[1:] >= 10 - 4)


def test_stride_one_equals_a_brute_force_reference():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 20, size=40)
    seq_len = 6
    model = PrefixModel(20)
    r = evaluate_full(model, tokens, seq_len=seq_len, stride=1, batch_size=4, device="cpu")
    # Token p is predicted from (at most) the seq_len tokens before it.
    with torch.no_grad():
        nats = [_nll(model, tokens[max(0, p - seq_len) : p], int(tokens[p])) for p in range(1, 40)]
    assert r.nats == pytest.approx(sum(nats), rel=1e-6)
    assert r.loss == pytest.approx(np.mean(nats), rel=1e-6)


def test_non_overlapping_pass_equals_windows_scored_one_at_a_time():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 20, size=49)  # 48 targets = 6 windows of 8
    model = PrefixModel(20)
    r = evaluate_full(model, tokens, seq_len=8, batch_size=4, device="cpu")
    with torch.no_grad():
        nats = [
            _nll(model, tokens[w * 8 : w * 8 + j], int(tokens[w * 8 + j]))
            for w in range(6)
            for j in range(1, 9)
        ]
    assert r.batches == 2 and r.tokens == 48
    assert r.nats == pytest.approx(sum(nats), rel=1e-6)


def test_stop_request_returns_a_partial_result():
    tokens = np.arange(2000) % 37
    model = PrefixModel(37)
    calls = []

    def stop_after_two_batches() -> bool:
        calls.append(1)
        return len(calls) > 2

    r = evaluate_full(
        model, tokens, seq_len=10, batch_size=4, device="cpu", should_stop=stop_after_two_batches
    )
    assert r.partial and r.batches == 2 and r.tokens == 2 * 4 * 10
    assert math.isfinite(r.loss)
    model.train()
    kw = dict(batch_size=4, seq_len=10, max_batches=5, device="cpu")
    stopped = evaluate(model, tokens, should_stop=lambda: True, **kw)
    assert stopped.partial and stopped.tokens == 0 and math.isnan(stopped.loss)
    assert model.training


def test_sets_report_each_and_a_token_weighted_overall():
    rng = np.random.default_rng(3)
    val = {"a": rng.integers(0, 30, size=300), "b": rng.integers(0, 30, size=1000)}
    token_bytes = np.arange(30) % 4
    model = PrefixModel(30)
    kw = dict(batch_size=4, seq_len=16, device="cpu", token_bytes=token_bytes)
    out = evaluate_sets(model, val, max_batches=None, **kw)
    assert list(out) == ["a", "b", "overall"]
    assert out["a"] == evaluate_full(model, val["a"], **kw)
    nats = out["a"].nats + out["b"].nats
    tokens = out["a"].tokens + out["b"].tokens
    assert out["overall"].tokens == tokens == 299 + 999
    assert out["overall"].loss == pytest.approx(nats / tokens)
    num_bytes = out["a"].num_bytes + out["b"].num_bytes
    assert out["overall"].bits_per_byte == pytest.approx(nats / (math.log(2) * num_bytes))
    bounded = evaluate_sets(model, val, max_batches=1, **kw)
    assert bounded["overall"].tokens == 2 * 4 * 16


def test_stop_inside_sets_skips_the_rest():
    val = {"a": np.arange(500) % 7, "b": np.arange(500) % 7}
    kw = dict(batch_size=2, seq_len=8, max_batches=None, device="cpu")
    out = evaluate_sets(PrefixModel(7), val, should_stop=lambda: True, **kw)
    assert list(out) == ["a", "overall"] and out["overall"].partial
    with pytest.raises(DataError, match="overall"):
        evaluate_sets(PrefixModel(7), {"overall": val["a"]}, **kw)


def test_merge_of_nothing_is_nan_not_an_error():
    r = EvalResult.merge([])
    assert r.tokens == 0 and math.isnan(r.loss)


def test_a_set_shorter_than_one_window_is_a_data_error():
    with pytest.raises(DataError, match="fewer than one window"):
        evaluate(PrefixModel(5), np.arange(5), batch_size=1, seq_len=8, max_batches=1, device="cpu")
