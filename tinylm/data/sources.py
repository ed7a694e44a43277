"""Documents streamed from local files, directories, globs, Hugging Face datasets and the generator.

A source spec is a string: a file, a directory (every supported file below it, sorted), a glob,
`hf:NAME[:CONFIG][@SPLIT]` (a Hugging Face dataset, streamed), or `synthetic-stories[:N[:SEED]]`.
Registry names (`tinyshakespeare`, ...) are turned into file specs by `registry.py` first.

File formats, chosen by suffix after an optional `.gz` / `.zst`:
- plain text (`.txt`, `.text`, `.md`, anything else): documents separated by a delimiter
  (default `<|endoftext|>`); a file without it is one document;
- `.jsonl` / `.ndjson`: one JSON object per line, text in a named field;
- `.json`: an array of objects (or a sequence of objects), streamed value by value;
- `.parquet`: a named column, read one record batch at a time.

Everything streams: memory holds one read buffer and one piece of a document, never a file.
`iter_pieces` yields `(text, end)`, where `end` marks the last piece of a document; a very
long document (a whole book with no delimiter) arrives in several pieces cut at a line break, so
even a multi-gigabyte single-document file is read in bounded memory. Invalid UTF-8 is replaced
by U+FFFD and counted in `SourceStats.invalid_utf8`; a plain-text file that is clearly not text
(NUL bytes, or mostly invalid UTF-8, in its first `SNIFF_BYTES`: an executable, an image, an
archive, UTF-16) is refused with a DataError instead (`check_text_prefix`).
"""

from __future__ import annotations

import codecs
import glob
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tinylm.data.errors import DataError
from tinylm.data.synthetic import DEFAULT_SEED, DEFAULT_STORIES, GENERATOR_VERSION, generate_stories
from tinylm.suggest import nearby_path
from tinylm.tokenizer.base import EOT

SYNTHETIC = "synthetic-stories"
READ_BYTES = 1 << 20
MAX_PIECE_CHARS = 4 << 20  # longer documents are cut into pieces of about this size
SNIFF_BYTES = 64 << 10
# Invalid UTF-8 sequences per byte (in the first SNIFF_BYTES) above which a file is called binary.
# Measured on 64 KiB: random bytes 0.42 (0.62 when every byte is >= 0x80), gzip output 0.42;
# Latin-1/cp1252 prose, a text file in the wrong encoding that we keep with replacement,
# 0.12 (French) to 0.16 (German, dense in umlauts).
BINARY_INVALID_RATIO = 0.3
TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw", ""}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
SUPPORTED = TEXT_SUFFIXES | JSONL_SUFFIXES | {".json", ".parquet"}
COMPRESSIONS = {".gz", ".zst", ".zstd"}

Piece = tuple[str, bool]  # (text, is the last piece of its document)


@dataclass
class SourceStats:
    """What reading sources found: bytes read (of the files on disk) and bad UTF-8 replaced."""

    bytes_read: int = 0
    invalid_utf8: int = 0  # invalid byte sequences replaced by U+FFFD
    invalid_files: dict[str, int] = field(default_factory=dict)


# The codec error handler cannot carry state, so it counts into this module-level cell; readers
# take the difference around each decode. Reading happens in one thread (the main process).
_INVALID_SEQUENCES = [0]


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _INVALID_SEQUENCES[0] += 1
    return "\ufffd", exc.end


codecs.register_error("tinylm.replace", _count_and_replace)


# --------------------------------------------------------------------------------------------
# Specs -> files
# --------------------------------------------------------------------------------------------


def _split_suffix(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix) of a file name, e.g. ('.jsonl', '.gz')."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else ""
    name = path.name[: -len(compression)] if compression else path.name
    fmt = Path(name).suffix.lower()
    if fmt not in SUPPORTED:
        fmt = ""  # unknown suffixes are read as plain text (e.g. input.txt.1, README)
    return fmt, compression


def is_synthetic(spec: str) -> bool:
    return spec == SYNTHETIC or spec.startswith(SYNTHETIC + ":")


def parse_synthetic(spec: str) -> tuple[int, int]:
    """`synthetic-stories[:N[:SEED]]` -> (N, SEED)."""
    parts = spec.split(":")[1:]
    try:
        n = int(parts[0]) if parts and parts[0] else DEFAULT_STORIES
        seed = int(parts[1]) if len(parts) > 1 else DEFAULT_SEED
    except ValueError:
        raise DataError(
            f"'{spec}': expected synthetic-stories[:N[:SEED]] with integers, e.g. synthetic-stories:2000:7"
        ) from None
    if n <= 0 or len(parts) > 2:
        raise DataError(f"'{spec}': expected synthetic-stories[:N[:SEED]] with N > 0")
    return n, seed


def expand_files(spec: str) -> list[Path]:
    """The files a file / directory / glob spec names, sorted; DataError when there are none."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(
                f"directory '{spec}' contains no files; put text/jsonl/json/parquet files in it"
            )
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(
                f"glob '{spec}' matches no files; check the pattern (quote it in the shell)"
            )
        return files
    near = nearby_path(path)
    hint = f" Did you mean '{near}'?" if near is not None else ""
    raise DataError(
        f"data source '{spec}' not found.{hint} It is not a file, directory, glob, 'hf:NAME', "
        f"'{SYNTHETIC}' or a registered dataset name (see `tinylm datasets`)"
    )


def source_identity(spec: str) -> list[Any]:
    """What identifies a source's content for caching: files with size and mtime, or the spec."""
    if is_synthetic(spec):
        return [SYNTHETIC, *parse_synthetic(spec), GENERATOR_VERSION]
    if spec.startswith("hf:"):
        local = Path(_parse_hf(spec)[0])
        files = expand_files(str(local)) if local.exists() else []
        return [spec, *[[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]]
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in expand_files(spec)]


def source_bytes(spec: str) -> int | None:
    """Total size on disk of a file source (for progress bars); None when unknown."""
    if is_synthetic(spec) or spec.startswith("hf:"):
        return None
    return sum(p.stat().st_size for p in expand_files(spec))


# --------------------------------------------------------------------------------------------
# Opening files
# --------------------------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """Counts bytes read from the file on disk, so progress is right for compressed files too."""

    def __init__(self, raw: BinaryIO, stats: SourceStats) -> None:
        self._raw = raw
        self._stats = stats

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        self._stats.bytes_read += n or 0
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_binary(path: Path, compression: str, stats: SourceStats) -> BinaryIO:
    # The returned stream owns the file and closes it (callers use it as a context manager).
    try:
        raw = open(path, "rb")  # noqa: SIM115
    except OSError as e:
        from tinylm.fileio import os_error_message

        raise DataError(os_error_message(e, path, "read the data source")) from None
    counted = io.BufferedReader(_CountingReader(raw, stats), READ_BYTES)
    if compression == ".gz":
        import gzip

        return gzip.GzipFile(fileobj=counted, mode="rb")  # type: ignore[return-value]
    if compression in (".zst", ".zstd"):
        try:
            import zstandard
        except ImportError:
            raise DataError(
                f"{path}: reading .zst files needs the 'zstandard' package: pip install zstandard"
            ) from None
        reader = zstandard.ZstdDecompressor().stream_reader(counted, read_size=READ_BYTES)
        return io.BufferedReader(reader, READ_BYTES)  # type: ignore[arg-type]
    return counted  # type: ignore[return-value]


def _decode(data: bytes, stats: SourceStats, where: str) -> str:
    before = _INVALID_SEQUENCES[0]
    text = data.decode("utf-8", errors="tinylm.replace")
    _note_invalid(stats, where, _INVALID_SEQUENCES[0] - before)
    return text


def _note_invalid(stats: SourceStats, where: str, n: int) -> None:
    if n:
        stats.invalid_utf8 += n
        stats.invalid_files[where] = stats.invalid_files.get(where, 0) + n


# --------------------------------------------------------------------------------------------
# Per-format readers
# --------------------------------------------------------------------------------------------


def _cut_point(buf: str, limit: int) -> int:
    """Where to cut an over-long document: the last line break (else space) before `limit`."""
    for sep in ("\n", " "):
        pos = buf.rfind(sep, 0, limit)
        if pos > limit // 2:
            return pos + 1
    return limit


def check_text_prefix(prefix: bytes, where: str) -> None:
    """Refuse, with a DataError, a file whose first bytes show it is clearly not text."""
    sample = prefix[:SNIFF_BYTES]
    if b"\x00" in sample:
        raise DataError(
            f"{where}: not a text file (NUL bytes in its first {len(sample):,} bytes: an executable, "
            "an image, an archive, or UTF-16 text). Give UTF-8 text, or convert it first "
            "(e.g. `iconv -f UTF-16 -t UTF-8`)"
        )
    before = _INVALID_SEQUENCES[0]
    sample.decode("utf-8", errors="tinylm.replace")
    invalid = _INVALID_SEQUENCES[0] - before
    _INVALID_SEQUENCES[0] = before  # only sniffed here: counted when it is really read
    if sample and invalid > 16 and invalid / len(sample) > BINARY_INVALID_RATIO:
        raise DataError(
            f"{where}: not a text file ({invalid:,} invalid UTF-8 sequences in its first "
            f"{len(sample):,} bytes: binary data, or text in another encoding). Give UTF-8 "
            "text, or convert it first (e.g. `iconv -f LATIN1 -t UTF-8`)"
        )


def _text_pieces(
    stream: BinaryIO, delimiter: str, stats: SourceStats, where: str, max_piece_chars: int
) -> Iterator[Piece]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="tinylm.replace")
    buf = ""
    open_doc = False  # a piece of the current document was already yielded
    first = True
    while True:
        raw = stream.read(READ_BYTES)
        if first:
            check_text_prefix(raw, where)
            first = False
        before = _INVALID_SEQUENCES[0]
        buf += decoder.decode(raw, final=not raw)
        _note_invalid(stats, where, _INVALID_SEQUENCES[0] - before)
        if delimiter:
            *docs, buf = buf.split(delimiter)  # the tail may hold half a delimiter: keep it
            for doc in docs:
                doc = doc.rstrip() if open_doc else doc.strip()
                if doc or open_doc:
                    yield doc, True
                open_doc = False
        # Hold back the delimiter's length so a delimiter split across reads is never cut.
        while len(buf) - len(delimiter) > max_piece_chars:
            cut = _cut_point(buf, max_piece_chars)
            piece, buf = buf[:cut], buf[cut:]
            yield (piece if open_doc else piece.lstrip()), False
            open_doc = True
        if not raw:
            break
    tail = buf.rstrip() if open_doc else buf.strip()
    if tail or open_doc:
        yield tail, True


def _record_text(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f"{where}: no field '{text_field}' in this record (it has: {fields}). "
            f"Set data.text_field (or --text-field) to the field that holds the text."
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field '{text_field}' is a {type(text).__name__}, not text. "
            "Set data.text_field (or --text-field) to a field that holds strings."
        )
    return text


def _jsonl_docs(stream: BinaryIO, text_field: str, stats: SourceStats, name: str) -> Iterator[str]:
    for lineno, raw in enumerate(stream, 1):
        line = _decode(raw, stats, name).strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
            ) from None
        yield _record_text(record, text_field, f"{name}:{lineno}")


def _json_values(stream: BinaryIO, stats: SourceStats, name: str) -> Iterator[Any]:
    """Values of a JSON array (or of whitespace-separated JSON values), parsed incrementally."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="tinylm.replace")
    parser = json.JSONDecoder()
    buf, pos, eof, in_array = "", 0, False, None

    def refill() -> bool:
        nonlocal buf, pos, eof
        raw = stream.read(READ_BYTES)
        before = _INVALID_SEQUENCES[0]
        buf = buf[pos:] + decoder.decode(raw, final=not raw)
        _note_invalid(stats, name, _INVALID_SEQUENCES[0] - before)
        pos, eof = 0, not raw
        return bool(raw)

    count = 0
    while True:
        while pos < len(buf) and (buf[pos].isspace() or (in_array and buf[pos] == ",")):
            pos += 1
        if pos >= len(buf):
            if eof or not refill():
                if in_array:
                    raise DataError(f"{name}: the JSON array is not closed (file truncated?)")
                return
            continue
        if in_array is None:
            in_array = buf[pos] == "["
            pos += in_array
            continue
        if in_array and buf[pos] == "]":
            return
        try:
            value, end = parser.raw_decode(buf, pos)
            # A value that ends exactly at the end of the buffer may be cut (a number): read on.
            complete = end < len(buf) or eof
        except json.JSONDecodeError as e:
            value, end, complete = None, pos, False
            if eof:
                raise DataError(f"{name}: record {count + 1}: not valid JSON ({e.msg})") from None
        if not complete:
            refill()
            continue
        count += 1
        yield value
        pos = end


def _json_docs(stream: BinaryIO, text_field: str, stats: SourceStats, name: str) -> Iterator[str]:
    for i, record in enumerate(_json_values(stream, stats, name), 1):
        yield _record_text(record, text_field, f"{name}: record {i}")


def _parquet_docs(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading parquet needs the 'pyarrow' package: pip install pyarrow"
        ) from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(
            f"{path}: no column '{text_field}' (columns: {', '.join(names)}). "
            "Set data.text_field (or --text-field) to the column that holds the text."
        )
    size, rows = path.stat().st_size, max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        stats.bytes_read += size * batch.num_rows // rows  # parquet has no cheap byte position
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _file_pieces(
    path: Path, text_field: str, delimiter: str, stats: SourceStats, max_piece_chars: int
) -> Iterator[Piece]:
    fmt, compression = _split_suffix(path)
    name = str(path)
    if fmt == ".parquet":
        if compression:
            raise DataError(
                f"{path}: compressed parquet files are not supported; parquet compresses internally"
            )
        for doc in _parquet_docs(path, text_field, stats):
            yield doc, True
        return
    with _open_binary(path, compression, stats) as stream:
        if fmt in JSONL_SUFFIXES:
            docs = _jsonl_docs(stream, text_field, stats, name)
        elif fmt == ".json":
            docs = _json_docs(stream, text_field, stats, name)
        else:
            try:
                yield from _text_pieces(stream, delimiter, stats, name, max_piece_chars)
            except (OSError, EOFError) as e:
                raise DataError(
                    f"{path}: cannot read ({e}); is the file complete and of the type its name says?"
                ) from None
            return
        for doc in docs:
            yield doc, True


def _parse_hf(spec: str) -> tuple[str, str | None, str]:
    rest = spec[3:]
    rest, _, split = rest.partition("@")
    name, _, config = rest.partition(":")
    return name, (config or None), (split or "train")


def _hf_pieces(spec: str, text_field: str) -> Iterator[Piece]:
    name, config, split = _parse_hf(spec)
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"'{spec}' needs the optional 'datasets' package: pip install 'tinylm[data]' (or pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # the library raises many types (connection, missing config, ...)
        raise DataError(
            f"could not open Hugging Face dataset '{name}'"
            + (f" config '{config}'" if config else "")
            + f" split '{split}': {type(e).__name__}: {e}. Offline? Download its files and point "
            "data.train at them (or at the local dataset directory as hf:/path/to/dir)."
        ) from None
    for i, example in enumerate(ds):
        yield _record_text(example, text_field, f"{spec}: example {i}"), True


def iter_pieces(
    spec: str,
    *,
    text_field: str = "text",
    delimiter: str = EOT,
    stats: SourceStats | None = None,
    max_piece_chars: int = MAX_PIECE_CHARS,
) -> Iterator[Piece]:
    """Stream `(text, end_of_document)` pieces from one source spec (see the module docstring)."""
    stats = stats if stats is not None else SourceStats()
    if is_synthetic(spec):
        n, seed = parse_synthetic(spec)
        for text in generate_stories(n, seed):
            stats.bytes_read += len(text)
            yield text, True
        return
    if spec.startswith("hf:"):
        yield from _hf_pieces(spec, text_field)
        return
    for path in expand_files(spec):
        yield from _file_pieces(path, text_field, delimiter, stats, max_piece_chars)


def iter_documents(spec: str, **kwargs: Any) -> Iterator[str]:
    """Whole documents of a source (joins pieces: for inspection and tests, not huge documents)."""
    parts: list[str] = []
    for text, end in iter_pieces(spec, **kwargs):
        parts.append(text)
        if end:
            yield "".join(parts)
            parts = []
