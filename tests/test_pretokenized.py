"""Pretokenized sources: nanoGPT/llm.c .bin, .npy, parquet, arrow and a local HF dataset directory.

Every file is written here from a char tokenizer fitted on a small corpus; the tokenizer is
declared by a `tokenizer.json` next to the files (or data.tokenizer), and each format trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import SMALL, run_cli

from tinylm.config import DataConfig
from tinylm.data import pretokenized as pt
from tinylm.data import resolve_data
from tinylm.data.shards import META, PreparedDataset
from tinylm.tokenizer import CharTokenizer

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def tok_docs(tmp_path_factory):
    """A char tokenizer (saved) and 60 small documents' ids."""
    root = tmp_path_factory.mktemp("pretok")
    names = ["ANNA", "BORIS", "CLARA", "DMITRI"]
    docs = [
        " ".join(f"{names[(i + j) % 4]}: the bird sang {j} times." for j in range(12 + i % 5))
        for i in range(60)
    ]
    tok = CharTokenizer.fit(docs)
    tok.save(root / "tok.json")
    return tok, [np.array(tok.encode(d), dtype=np.int64) for d in docs], root


def _stream(tok, docs) -> np.ndarray:
    """Documents joined nanoGPT-style: ids, then end-of-text, for each document."""
    return np.concatenate([np.append(d, tok.eot_id) for d in docs])


def _llmc(path: Path, ids: np.ndarray, version: int = 1, count: int | None = None) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (pt.LLMC_MAGIC, version, len(ids) if count is None else count)
    path.write_bytes(header.tobytes() + ids.astype("<u2" if version == 1 else "<u4").tobytes())
    return path


def _dir(root: Path, name: str, tok) -> Path:
    d = root / name
    d.mkdir()
    tok.save(d / "tokenizer.json")  # the dataset declares its tokenizer
    return d


def test_every_format_trains_in_one_mixture(tok_docs, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok, docs, _ = tok_docs
    stream = _stream(tok, docs)
    nano = _dir(tmp_path, "nano", tok)
    stream.astype("<u2").tofile(nano / "train.bin")
    llmc = _dir(tmp_path, "llmc", tok)
    _llmc(llmc / "fineweb_train_000001.bin", stream[: len(stream) // 2])
    _llmc(llmc / "fineweb_train_000002.bin", stream[len(stream) // 2 :])
    npy = _dir(tmp_path, "npy", tok)
    np.save(npy / "ids.npy", stream.astype(np.int32))  # int32: streamed into uint16 shards
    table = pa.table({"input_ids": [d.tolist() for d in docs], "n": list(range(len(docs)))})
    parquet = _dir(tmp_path, "parquet", tok)
    pq.write_table(table, parquet / "part-0.parquet")
    arrow = _dir(tmp_path, "arrow", tok)
    with pa.ipc.new_stream(str(arrow / "data.arrow"), table.schema) as w:
        w.write_table(table)
    hf = tmp_path / "hf"
    datasets.Dataset.from_dict({"input_ids": [d.tolist() for d in docs]}).save_to_disk(str(hf))
    tok.save(hf / "tokenizer.json")

    sources = [nano / "train.bin", f"{llmc}/fineweb_train_*.bin", npy, parquet, arrow, hf]
    mix = "[" + ",".join(f"{{path: '{s}'}}" for s in sources) + "]"
    code = run_cli(
        "train", "tiny", *SMALL, f"data.mix={mix}", f"out_dir={tmp_path}", "run_name=r",
        "train.max_steps=2", "eval.interval=2", "eval.samples=0",
    )  # fmt: skip
    assert code == 0
    metas = {
        m["sources"][0] if m["sources"] else "": m
        for m in (json.loads(p.read_text()) for p in (tmp_path / "cache").rglob(META))
    }
    assert len(metas) == 6
    by_kind = {Path(k).parts[-2] if "*" in k else Path(k).name: m for k, m in metas.items()}
    # Flat uint16 files are read in place; everything else was copied into shards.
    assert by_kind["train.bin"]["in_place"] and by_kind["llmc"]["in_place"]
    assert not by_kind["npy"]["in_place"] and not by_kind["hf"]["in_place"]
    assert by_kind["llmc"]["splits"]["train"]["shards"][0]["offset"] == pt.LLMC_HEADER_BYTES
    # Rows are documents: 60 rows, split by document; each row gained its end-of-text id.
    rows = by_kind["parquet"]["splits"]
    assert rows["train"]["documents"] + rows["val"]["documents"] == 60
    assert rows["train"]["tokens"] + rows["val"]["tokens"] == len(stream)
    assert by_kind["train.bin"]["splits"]["train"]["documents"] == 60  # end-of-text ids counted
    val = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" for r in val)


def test_in_place_ranges_read_the_same_ids_without_a_copy(tok_docs, tmp_path):
    tok, docs, root = tok_docs
    stream = _stream(tok, docs)
    _llmc(tmp_path / "a.bin", stream)
    cfg = DataConfig(train=str(tmp_path / "a.bin"), tokenizer=str(root / "tok.json"))
    data = resolve_data(cfg, None, 16, **QUIET)
    train, val = data.train[0][1], data.val["a"]
    assert np.array_equal(np.concatenate([train[0 : len(train)], val[0 : len(val)]]), stream)
    prepared = next((tmp_path / "cache").rglob(META)).parent
    assert not list(prepared.glob("*.bin"))  # nothing copied
    ds = PreparedDataset.open(prepared)
    assert ds.meta["in_place"] and ds.meta["split"]["mode"] == "tokens"


def test_rows_keep_their_own_end_of_text_ids_and_resume(tok_docs, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok, docs, root = tok_docs
    # Packed rows that already hold end-of-text ids get none added.
    packed = _stream(tok, docs)
    rows = [packed[i : i + 100].tolist() for i in range(0, len(packed), 100)]
    pq.write_table(pa.table({"ids": rows}), tmp_path / "p.parquet")
    monkeypatch.setattr(pt, "CHUNK_TOKENS", 1000)
    writes = []
    real = pt.write_json

    def interrupt(path, obj):
        writes.append(path)
        if len(writes) == 4:  # settings, chunk 0's train and val markers, then stop
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(pt, "write_json", interrupt)
    cfg = DataConfig(
        train=str(tmp_path / "p.parquet"), tokenizer=str(root / "tok.json"), token_field="ids"
    )
    with pytest.raises(KeyboardInterrupt):
        resolve_data(cfg, None, 16, **QUIET)
    monkeypatch.setattr(pt, "write_json", real)
    from tinylm.data import shards

    original, written = shards.write_shard, []
    monkeypatch.setattr(
        shards, "write_shard", lambda p, a: (written.append(p.name), original(p, a))
    )
    data = resolve_data(cfg, None, 16, **QUIET)
    n = len(data.train[0][1]) + len(data.val["p"])
    assert n == len(packed)  # no end-of-text id added: the rows carry their own
    assert written and "train_000000.bin" not in written  # chunk 0 was kept


def test_tokenizer_from_parquet_metadata_and_gpt2_ids(tmp_path, shared_data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tinylm.tokenizer import load_tokenizer

    gpt2 = load_tokenizer("gpt2")
    rows = [
        gpt2.encode(f"Story {i}: the cat sat on the mat and looked at the sky.") for i in range(40)
    ]
    table = pa.table({"input_ids": rows}).replace_schema_metadata({"tokenizer": "gpt2"})
    pq.write_table(table, tmp_path / "g.parquet")
    data = resolve_data(DataConfig(train=str(tmp_path / "g.parquet")), None, 8, **QUIET)
    assert data.tokenizer.fingerprint() == gpt2.fingerprint()
    tokens = data.train[0][1]
    assert (
        gpt2.decode(tokens[0 : len(rows[0])].tolist())
        == "Story 0: the cat sat on the mat and looked at the sky."
    )
    assert tokens[len(rows[0])] == gpt2.eot_id


def test_npy_rows_are_documents(tok_docs, tmp_path):
    _tok, docs, root = tok_docs
    rows = np.stack([d[:20] for d in docs]).astype(np.uint16)
    np.save(tmp_path / "rows.npy", rows)
    cfg = DataConfig(
        train=str(tmp_path / "rows.npy"), tokenizer=str(root / "tok.json"), val_count=6
    )
    data = resolve_data(cfg, None, 8, **QUIET)
    assert data.val["rows"].num_documents == 6 and data.train[0][1].num_documents == 54
    assert len(data.val["rows"]) == 6 * 21
