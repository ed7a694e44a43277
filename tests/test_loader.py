"""BatchLoader: determinism, exact resume, rank-disjoint epochs, mixing, prefetch, clean shutdown."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch

from tinylm.data.errors import DataError
from tinylm.data.loader import BatchLoader, gather_windows


def _loader(sources=None, **kw) -> BatchLoader:
    args = dict(batch_size=4, seq_len=8, grad_accum=2, seed=7, prefetch=0)
    args.update(kw)
    if sources is None:
        sources = [("a", np.arange(1000, dtype=np.uint16), 1.0)]
    return BatchLoader(sources, **args)


def _take(loader: BatchLoader, start: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = loader.iterate(start)
    try:
        return list(itertools.islice(it, n))
    finally:
        it.close()


def _starts(loader: BatchLoader, steps: range) -> list[int]:
    """Window starts of every row this rank reads over `steps`, in order."""
    out: list[int] = []
    for step in steps:
        for micro in range(loader.grad_accum):
            out.extend(loader.rows(step, micro)[1].tolist())
    return out


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_batches_are_a_pure_function_of_seed_and_step(sampling):
    a, b = _loader(sampling=sampling), _loader(sampling=sampling)
    for step, micro in [(0, 0), (0, 1), (5, 1), (123, 0)]:
        xa, ya = a.host_batch(step, micro)
        xb, yb = b.host_batch(step, micro)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.host_batch(0, 0)[0], a.host_batch(1, 0)[0])
    assert not torch.equal(
        a.host_batch(0, 0)[0], _loader(sampling=sampling, seed=8).host_batch(0, 0)[0]
    )


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_y_is_x_shifted_by_one(sampling):
    x, y = _loader(sampling=sampling).host_batch(3, 1)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 8)
    assert x.is_contiguous() and y.is_contiguous()
    # The tokens are 0..999, so a window is consecutive integers and y = x + 1.
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_resume_from_a_step_continues_the_same_stream(sampling):
    k = 3
    full = _take(_loader(sampling=sampling, prefetch=2), 0, 2 * (k + 4))
    resumed = _take(_loader(sampling=sampling, prefetch=2), k, 2 * 4)
    for (x0, y0), (x1, y1) in zip(full[2 * k :], resumed, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_prefetch_does_not_change_the_batches():
    plain = _take(_loader(prefetch=0), 2, 10)
    ahead = _take(_loader(prefetch=3), 2, 10)
    for (x0, y0), (x1, y1) in zip(plain, ahead, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_sequential_epoch_covers_every_window_once():
    loader = _loader(sampling="sequential", batch_size=5, grad_accum=3)
    n = int(loader.windows[0])  # (1000 - 1) // 8 = 124 windows
    every_window = list(range(0, n * 8, 8))
    starts = _starts(loader, range(2 * n // 15 + 1))
    first_epoch, second_epoch = starts[:n], starts[n : 2 * n]
    assert sorted(first_epoch) == every_window
    assert sorted(second_epoch) == every_window
    assert first_epoch != second_epoch  # a fresh permutation each epoch


def test_sequential_ranks_are_disjoint_and_cover_the_epoch():
    world = 3
    loaders = [_loader(sampling="sequential", rank=r, world_size=world) for r in range(world)]
    n = int(loaders[0].windows[0])
    per_step = world * 4 * 2  # ranks x batch x grad_accum
    within_epoch = range(n // per_step)
    seen = [set(_starts(ld, within_epoch)) for ld in loaders]
    for a, b in itertools.combinations(seen, 2):
        assert not a & b
    assert sum(len(s) for s in seen) == len(within_epoch) * per_step
    # One more step crosses the epoch's end: together the ranks have read every window.
    spanning = range(n // per_step + 1)
    assert set().union(*(_starts(ld, spanning) for ld in loaders)) == set(range(0, n * 8, 8))


def test_random_ranks_get_independent_streams():
    a = _loader(rank=0, world_size=2).rows(4, 0)[1]
    b = _loader(rank=1, world_size=2).rows(4, 0)[1]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_mixing_follows_the_weights(sampling):
    sources = [
        ("small", np.arange(0, 500, dtype=np.int64), 0.2),
        ("big", np.arange(10_000, 20_000, dtype=np.int64), 0.8),
    ]
    loader = _loader(sources, sampling=sampling, batch_size=32, grad_accum=1)
    chosen = np.concatenate([loader.rows(step, 0)[0] for step in range(200)])
    share = float(np.mean(chosen == 0))
    # 6400 rows: the binomial standard deviation of the share is 0.005; allow 6 of them.
    assert abs(share - 0.2) < 0.03
    # Rows really come from the source they were assigned to.
    src, _ = loader.rows(11, 0)
    x, _ = loader.host_batch(11, 0)
    assert torch.equal(x[:, 0] >= 10_000, torch.from_numpy(src == 1))


def test_memmap_source(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(3000, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = _loader([("m", tokens, 1.0)], seq_len=16).host_batch(0, 0)
    assert torch.equal(y, x + 1) and int(x.max()) < 3000


def test_gather_windows_matches_slices():
    tokens = np.arange(100, dtype=np.uint32) * 3
    starts = np.array([0, 17, 90])
    out = gather_windows(tokens, starts, 10)
    assert out.dtype == np.int64
    for row, s in zip(out, starts, strict=True):
        assert np.array_equal(row, tokens[s : s + 10])


def test_a_source_shorter_than_one_window_is_a_data_error():
    with pytest.raises(DataError, match="fewer than one window"):
        _loader([("tiny", np.arange(8), 1.0)], seq_len=8)


def test_bad_weights_are_a_data_error():
    with pytest.raises(DataError, match="weights"):
        _loader([("a", np.arange(100), 0.0)])


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tinylm-prefetch"]


def test_closing_mid_iteration_stops_the_thread():
    with _loader(prefetch=2) as loader:
        it = loader.iterate(0)
        next(it)
        assert _prefetch_threads()
        loader.close()
        assert not _prefetch_threads()
        with pytest.raises(StopIteration):
            next(it)
    # Closing the generator alone also stops its thread.
    it = _loader(prefetch=2).iterate(5)
    next(it)
    it.close()
    assert not _prefetch_threads()


def test_an_error_in_the_prefetch_thread_reaches_the_consumer():
    class Broken:
        def __len__(self) -> int:
            return 1000

        def __getitem__(self, key: slice) -> np.ndarray:
            raise OSError("disk gone")

    it = _loader([("b", Broken(), 1.0)], prefetch=2).iterate(0)
    with pytest.raises(OSError, match="disk gone"):
        next(it)
    it.close()
    assert not _prefetch_threads()
