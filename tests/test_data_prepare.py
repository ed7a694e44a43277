"""Prepared datasets: format, split determinism and disjointness, resumption, refusals, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinylm.data import prepare as prep
from tinylm.data.errors import DataError
from tinylm.data.prepare import SplitSettings, fit_char_tokenizer, prepare
from tinylm.data.shards import PreparedDataset, dtype_for_vocab
from tinylm.tokenizer import CharTokenizer

EOT = "<|endoftext|>"


@pytest.fixture()
def corpus(tmp_path):
    """200 distinct short documents in one delimited text file."""
    docs = [f"Document number {i}: " + "abcdefgh"[i % 8] * (5 + i % 13) for i in range(200)]
    path = tmp_path / "corpus.txt"
    path.write_text(f"\n{EOT}\n".join(docs))
    return path, docs


def _prepare(path, out, tok=None, workers=1, **settings):
    tok = tok or fit_char_tokenizer([str(path)])
    settings.setdefault("chunk_chars", 500)  # many chunks even for a tiny corpus
    return prepare(
        [str(path)],
        out,
        tok,
        settings=SplitSettings(**settings),
        workers=workers,
        log=lambda _: None,
    )


def _docs_of(ds, split):
    tokens = ds.split(split)
    text = ds.tokenizer().decode(tokens[0 : len(tokens)].tolist())
    return [d for d in text.split(EOT) if d]


def test_format_round_trip_and_meta(corpus, tmp_path):
    path, docs = corpus
    ds = _prepare(path, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["format"] == "tinylm-prepared" and meta["dtype"] == "uint16"
    assert meta["tokenizer"]["fingerprint"] == ds.tokenizer().fingerprint()
    assert len(meta["splits"]["train"]["shards"]) > 3  # several shards
    train, val = _docs_of(ds, "train"), _docs_of(ds, "val")
    assert sorted(train + val) == sorted(docs)  # every document exactly once
    assert ds.split("train").num_documents == len(train) and ds.split("val").num_documents == len(
        val
    )
    assert (
        not list((tmp_path / "out").glob("*.tmp")) and not (tmp_path / "out" / ".progress").exists()
    )
    eot = ds.tokenizer().eot_id
    train_tokens = ds.split("train")
    assert train_tokens[len(train_tokens) - 1] == eot  # each document is followed by eot


def test_token_array_slices_cross_shard_boundaries(corpus, tmp_path):
    path, _ = corpus
    tokens = _prepare(path, tmp_path / "out").split("train")
    whole = np.concatenate([tokens[i : i + 1] for i in range(len(tokens))])
    assert whole.dtype == np.int64 and len(whole) == len(tokens)
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = sorted(rng.integers(0, len(tokens), 2))
        assert np.array_equal(tokens[a:b], whole[a:b])
    assert tokens[-1] == whole[-1] and len(tokens[5:2]) == 0


def test_split_is_deterministic_disjoint_and_seeded(corpus, tmp_path):
    path, docs = corpus
    a = _docs_of(_prepare(path, tmp_path / "a", val_fraction=0.2), "val")
    b = _docs_of(_prepare(path, tmp_path / "b", val_fraction=0.2), "val")
    c = _docs_of(_prepare(path, tmp_path / "c", val_fraction=0.2, split_seed=7), "val")
    assert a == b and a != c
    assert 20 <= len(a) <= 60  # ~20% of 200
    train = set(_docs_of(PreparedDataset.open(tmp_path / "a"), "train"))
    assert not train & set(a) and docs[0] in train  # disjoint; document 0 stays in train


def test_val_count_holds_out_exactly_n(corpus, tmp_path):
    path, _ = corpus
    ds = _prepare(path, tmp_path / "out", val_count=17)
    assert ds.split("val").num_documents == 17 and ds.split("train").num_documents == 183


def test_output_is_identical_for_one_and_two_workers(corpus, tmp_path):
    path, _ = corpus
    tok = fit_char_tokenizer([str(path)])
    one = _prepare(path, tmp_path / "one", tok, workers=1, chunk_chars=2000)
    two = _prepare(path, tmp_path / "two", tok, workers=2, chunk_chars=2000)
    for split in ("train", "val"):
        x, y = one.split(split), two.split(split)
        assert np.array_equal(x[0 : len(x)], y[0 : len(y)])
    assert one.meta["splits"] == two.meta["splits"]


def test_single_document_is_split_by_a_token_range_at_the_end(tmp_path):
    path = tmp_path / "book.txt"
    text = "".join(f"Line {i}: to be or not to be.\n" for i in range(300))
    path.write_text(text)
    ds = _prepare(path, tmp_path / "out", val_fraction=0.1)
    train, val = ds.split("train"), ds.split("val")
    assert ds.meta["split"]["mode"] == "tokens" and "last 10.0%" in ds.meta["split"]["note"]
    assert abs(len(val) - 0.1 * (len(train) + len(val))) <= 1
    tok = ds.tokenizer()
    joined = tok.decode(train[0 : len(train)].tolist()) + tok.decode(val[0 : len(val)].tolist())
    assert joined == text.strip() + EOT  # contiguous, no overlap, nothing lost


class _Interrupt(Exception):
    pass


def test_interrupted_prepare_resumes_and_redoes_only_unfinished_chunks(
    corpus, tmp_path, monkeypatch
):
    path, _ = corpus
    tok = fit_char_tokenizer([str(path)])
    reference = _prepare(path, tmp_path / "ref", tok)
    real = prep._tokenize_chunk
    calls: list[int] = []

    def failing(chunk, *args):
        if chunk.index == 3:
            raise _Interrupt("simulated crash")
        calls.append(chunk.index)
        return real(chunk, *args)

    monkeypatch.setattr(prep, "_tokenize_chunk", failing)
    out = tmp_path / "out"
    with pytest.raises(_Interrupt):
        _prepare(path, out, tok)
    assert calls == [0, 1, 2] and not (out / "meta.json").exists()
    with pytest.raises(DataError, match=r"no meta\.json"):
        PreparedDataset.open(out)
    # A half-written shard of the crashed chunk must never be taken for a complete one.
    (out / "train_000003.bin.tmp").write_bytes(b"\x01\x02\x03")
    (out / "train_000004.bin").write_bytes(b"\x01\x02")  # no marker: not done

    calls.clear()
    monkeypatch.setattr(
        prep, "_tokenize_chunk", lambda chunk, *a: calls.append(chunk.index) or real(chunk, *a)
    )
    ds = _prepare(path, out, tok)
    assert calls and 0 not in calls and min(calls) == 3  # chunks 0-2 were not redone
    for split in ("train", "val"):
        x, y = ds.split(split), reference.split(split)
        assert np.array_equal(x[0 : len(x)], y[0 : len(y)])
    assert not list(out.glob("*.tmp"))


def test_killed_worker_process_is_reported_and_resumable(corpus, tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    path, _ = corpus
    tok = fit_char_tokenizer([str(path)])

    def broken(self, chunk):
        raise BrokenProcessPool("worker killed")

    monkeypatch.setattr(prep._Dispatcher, "_inline", broken)
    with pytest.raises(DataError, match="run the same command again to continue"):
        _prepare(path, tmp_path / "out", tok)
    assert (tmp_path / "out" / "tokenizer.json").exists()  # partial state kept for the re-run
    monkeypatch.undo()
    assert _prepare(path, tmp_path / "out", tok).num_tokens("train") > 0


def test_tokenizer_mismatch_is_refused(corpus, tmp_path):
    path, _ = corpus
    ds = _prepare(path, tmp_path / "out")
    other = CharTokenizer(list("abc"))
    with pytest.raises(DataError, match="different tokenizer"):
        ds.check_tokenizer(other)
    ds.check_tokenizer(ds.tokenizer())
    with pytest.raises(DataError, match="already holds a prepared dataset"):
        _prepare(path, tmp_path / "out", other)


def test_rerun_with_same_inputs_reuses(corpus, tmp_path, monkeypatch):
    path, _ = corpus
    tok = fit_char_tokenizer([str(path)])
    _prepare(path, tmp_path / "out", tok)
    monkeypatch.setattr(prep, "_run", lambda *a, **k: pytest.fail("prepared again"))
    assert _prepare(path, tmp_path / "out", tok).num_tokens("train") > 0


def test_empty_source_is_an_error_and_leaves_nothing(tmp_path):
    (tmp_path / "empty.txt").write_text(f"\n{EOT}\n  \n")
    tok = CharTokenizer(list("ab"))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="is empty"):
        _prepare(tmp_path / "empty.txt", out, tok)
    assert not out.exists()  # made by prepare, left empty: removed again


def test_damaged_shard_is_detected_on_open(corpus, tmp_path):
    path, _ = corpus
    ds = _prepare(path, tmp_path / "out")
    shard = ds.directory / ds.meta["splits"]["train"]["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(DataError, match="damaged"):
        PreparedDataset.open(ds.directory)


def test_shard_dtype_by_vocab_size():
    assert dtype_for_vocab(65_536) == np.uint16
    assert dtype_for_vocab(65_537) == np.uint32
    with pytest.raises(DataError, match="does not fit in uint32"):
        dtype_for_vocab((1 << 32) + 1)


def test_explicit_val_source_goes_entirely_to_val(corpus, tmp_path):
    path, docs = corpus
    val_path = tmp_path / "val.txt"
    val_path.write_text(f"{EOT}".join(["held out one", "held out two"]))
    tok = fit_char_tokenizer([str(path), str(val_path)])
    ds = prepare(
        [str(path)], tmp_path / "out", tok, val_sources=[str(val_path)], log=lambda _: None
    )
    assert _docs_of(ds, "val") == ["held out one", "held out two"]
    assert sorted(_docs_of(ds, "train")) == sorted(docs)
