"""Every source type streams the right documents; bad input is a clear DataError."""

from __future__ import annotations

import gzip
import json

import pytest

from tinylm.data import sources
from tinylm.data.errors import DataError
from tinylm.data.sources import SourceStats, iter_documents, iter_pieces

DOCS = ["First story.\nIt has two lines.", "Second, with ünïcödé ✓.", "Third and last."]
EOT = "<|endoftext|>"


def _write_text(path, docs=DOCS, sep=f"\n{EOT}\n"):
    path.write_text(sep.join(docs) + sep, encoding="utf-8")
    return path


def test_text_delimiter_split_across_read_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 5)  # delimiters and UTF-8 chars straddle reads
    path = _write_text(tmp_path / "a.txt")
    assert list(iter_documents(str(path))) == DOCS


def test_custom_delimiter_and_no_delimiter_is_one_document(tmp_path):
    path = _write_text(tmp_path / "a.txt", sep="\n\n===\n\n")
    assert list(iter_documents(str(path), delimiter="===")) == DOCS
    assert len(list(iter_documents(str(path)))) == 1  # default delimiter absent: one document


def test_long_document_streams_in_pieces_cut_at_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 64)
    lines = [f"line {i} of a long book" for i in range(200)]
    path = tmp_path / "book.txt"
    path.write_text("\n".join(lines))
    pieces = list(iter_pieces(str(path), max_piece_chars=300))
    assert len(pieces) > 5 and all(len(t) <= 300 + len(EOT) for t, _ in pieces)
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(t for t, _ in pieces) == "\n".join(lines)
    assert all(t.endswith("\n") for t, _ in pieces[:-1])  # cut after a line break


def test_directory_and_glob_one_document_per_file(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS):
        (d / ("sub" if i == 2 else "") / f"{i}.txt").write_text(doc)
    (d / ".hidden.txt").write_text("never read")
    assert list(iter_documents(str(d))) == DOCS
    assert list(iter_documents(str(d / "*.txt"))) == DOCS[:2]
    assert list(iter_documents(str(d / "**" / "*.txt"))) == DOCS


def test_jsonl_json_and_compressed(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 7)  # the JSON array parser refills mid-value
    records = [{"id": i, "text": t} for i, t in enumerate(DOCS)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r) for r in records))  # a sequence
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    with gzip.open(tmp_path / "e.txt.gz", "wt") as f:
        f.write(f"\n{EOT}\n".join(DOCS))
    for name in ("a.jsonl", "b.json", "c.json", "d.jsonl.gz", "e.txt.gz"):
        assert list(iter_documents(str(tmp_path / name))) == DOCS, name


def test_zstd_and_parquet(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(
            "\n".join(json.dumps({"body": t}) for t in DOCS).encode()
        )
    )
    assert list(iter_documents(str(tmp_path / "a.jsonl.zst"), text_field="body")) == DOCS
    table = pa.table({"text": DOCS * 3, "n": list(range(9))})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)
    assert list(iter_documents(str(tmp_path / "p.parquet"))) == DOCS * 3
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n\)"):
        list(iter_documents(str(tmp_path / "p.parquet"), text_field="body"))


def test_jsonl_missing_field_names_file_line_field_and_fix(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(DataError) as e:
        list(iter_documents(str(path)))
    msg = str(e.value)
    assert f"{path}:2" in msg and "'text'" in msg and "content" in msg and "text_field" in msg


def test_jsonl_invalid_json_and_non_string_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"a.jsonl:2: not valid JSON"):
        list(iter_documents(str(tmp_path / "a.jsonl")))
    (tmp_path / "b.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DataError, match="is a int, not text"):
        list(iter_documents(str(tmp_path / "b.jsonl")))


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good \xff\xfe text" + EOT.encode() + b"more \xc3(")
    stats = SourceStats()
    docs = list(iter_documents(str(path), stats=stats))
    assert docs == ["good \ufffd\ufffd text", "more \ufffd("]
    assert stats.invalid_utf8 == 3 and stats.invalid_files == {str(path): 3}


def test_missing_source_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no files"):
        list(iter_documents(str(tmp_path / "empty")))
    with pytest.raises(DataError, match="matches no files"):
        list(iter_documents(str(tmp_path / "*.md")))


def test_synthetic_spec(tmp_path):
    assert len(list(iter_documents("synthetic-stories:7"))) == 7
    assert list(iter_documents("synthetic-stories:3:5")) != list(
        iter_documents("synthetic-stories:3:6")
    )
    with pytest.raises(DataError, match="synthetic-stories"):
        list(iter_documents("synthetic-stories:many"))


def test_huggingface_streaming_from_a_local_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the hub, even on a machine that is online
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = tmp_path / "hfdata"
    d.mkdir()
    pq.write_table(pa.table({"story": DOCS}), d / "train.parquet")
    assert list(iter_documents(f"hf:{d}", text_field="story")) == DOCS
    with pytest.raises(DataError, match="example 0"):
        list(iter_documents(f"hf:{d}", text_field="text"))
