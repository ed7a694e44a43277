"""Pretokenized sources: token ids from `.bin` (nanoGPT, llm.c), `.npy`, parquet/arrow and HF datasets.

A source is pretokenized when its files hold ids rather than text:
- nanoGPT `.bin`: headerless ids, `data.token_dtype` (uint16 by default, as nanoGPT writes);
- llm.c / modded-nanogpt `.bin` shards: a 256-int32 header (magic 20240520, version, token
  count), then uint16 ids (version 1; version 2 is uint32); the header is checked against the
  file's size, so a truncated or foreign file is refused with one line;
- `.npy`: a 1-D array (one stream of ids) or a 2-D array (one row a document);
- parquet or arrow files, and Hugging Face datasets (a `save_to_disk` directory, or `hf:NAME`
  on the hub), with a list-of-ints column `data.token_field` (default `input_ids`): one row a
  document.

Which tokenizer made the ids must be said: `data.tokenizer=gpt2` (or a tokenizer .json), a
`tokenizer.json` (ours) next to the files, or the parquet/arrow schema metadata key `tokenizer`
("gpt2" or a tokenizer file name next to it). Two sources declaring different tokenizers, ids
outside the vocabulary, and a dtype that cannot hold the vocabulary are refused before training.

Preparing: when every file is a flat stream of ids in the prepared dtype (a uint16 `.bin` or 1-D
`.npy` for a vocabulary <= 65,536), the dataset is read in place (its `meta.json` ranges point
into the files, header skipped by an offset: nothing is copied); it is scanned once for ids out
of the vocabulary and end-of-text ids (documents). Anything else streams into the prepared
shard format in chunks of `CHUNK_TOKENS`, resumable like `prepare` (a marker per chunk). Rows are
documents: each gets the end-of-text id after it, unless the source's first rows already hold
end-of-text ids (packed windows of a stream mark their own boundaries; then nothing is added).
Flat streams keep their own end-of-text ids.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinylm.data.errors import DataError
from tinylm.data.shards import META, TOKENIZER, PreparedDataset, dtype_for_vocab, write_json
from tinylm.tokenizer.base import Tokenizer

LLMC_MAGIC = 20240520
LLMC_HEADER_BYTES = 256 * 4
LLMC_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}  # version 1: GPT-2 ids; 2: Llama-3 ids
# llm.c's model and state files share the suffix: say what they are instead of "out of vocabulary".
LLMC_OTHER_MAGICS = {20240326: "an llm.c model checkpoint", 20240327: "an llm.c training state"}
TOKEN_DTYPES = ("uint16", "uint32", "int32")
TOKEN_SUFFIXES = {".bin", ".npy"}
TABLE_SUFFIXES = {".parquet", ".arrow"}
# Files that describe a dataset next to its data: skipped when a directory is a token source.
METADATA_NAMES = {"tokenizer.json", "dataset_info.json", "state.json", "dataset_dict.json"}
METADATA_SUFFIXES = {".md", ".pkl", ".lock", ".gitattributes"}
# Ids per streamed chunk: 8 M ids are 64 MB as int64 while a chunk is staged, 16 MB of uint16
# shard; RAM stays bounded by a couple of chunks whatever the source's size.
CHUNK_TOKENS = 1 << 23
SCAN_TOKENS = 1 << 24
PACKED_PROBE_ROWS = 64  # rows read to tell packed windows (holding end-of-text ids) from documents  # ids per read when an in-place file is checked
VERSION = 1  # of this module's output (part of the cache key)


# --------------------------------------------------------------------------------------------
# What a spec holds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatFile:
    """A file of ids that can be memory-mapped as it is: where they start, their dtype and count."""

    path: Path
    offset: int  # bytes before the first id (a header)
    dtype: np.dtype
    tokens: int
    kind: str  # "nanoGPT .bin" | "llm.c .bin" | ".npy"


@dataclass(frozen=True)
class RowSource:
    """A table of documents: a parquet/arrow file or a Hugging Face dataset (local or hub)."""

    where: str  # a file path, a save_to_disk directory, or hf:NAME[:CONFIG][@SPLIT]
    kind: str  # "parquet" | "arrow" | "hf-disk" | "hf-hub" | "npy-rows"


Item = FlatFile | RowSource


def _is_save_to_disk(path: Path) -> bool:
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def _hf_local(spec: str) -> Path | None:
    """The save_to_disk directory a spec names (plain or `hf:PATH`), else None."""
    raw = spec[3:].partition("@")[0] if spec.startswith("hf:") else spec
    path = Path(raw).expanduser()
    return path if _is_save_to_disk(path) else None


def _table_columns(path: Path) -> list[str]:
    import pyarrow as pa

    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with pa.memory_map(str(path)) as source:
        return list(_open_arrow(source).schema.names)


def _open_arrow(source: Any) -> Any:
    """An arrow IPC reader: the stream format (what `datasets` writes) or the file format."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


@functools.lru_cache(maxsize=256)
def _hf_columns(spec: str) -> tuple[str, ...]:
    local = _hf_local(spec)
    datasets = _import_datasets(spec)
    try:
        if local is not None:
            ds = _load_from_disk(local, spec)
            return tuple(ds.column_names)
        from tinylm.data.sources import _parse_hf

        name, config, split = _parse_hf(spec)
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        if ds.features is not None:
            return tuple(ds.features)
        return tuple(next(iter(ds)))
    except DataError:
        raise
    except Exception:  # a text dataset the text path opens (and explains failures for)
        return ()


def _import_datasets(spec: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"'{spec}' needs the optional 'datasets' package: pip install 'tinylm[data]'"
        ) from None
    return datasets


def _load_from_disk(path: Path, spec: str) -> Any:
    datasets = _import_datasets(spec)
    split = spec.partition("@")[2] or "train"
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"'{spec}': no split '{split}' (it has: {', '.join(ds)}); name one as {path}@SPLIT"
            )
        ds = ds[split]
    return ds


def is_token_file(path: Path, token_field: str) -> bool:
    """Whether one file holds ids (a .bin/.npy, or a table with the token column)."""
    suffix = path.suffix.lower()
    if suffix in TOKEN_SUFFIXES:
        return True
    if suffix in TABLE_SUFFIXES and token_field:
        try:
            return token_field in _table_columns(path)
        except Exception:  # unreadable: the text path (or the arrow reader) reports it
            return suffix == ".arrow"
    return False


def _is_metadata(path: Path) -> bool:
    return (
        path.name in METADATA_NAMES
        or path.suffix.lower() in METADATA_SUFFIXES
        or path.name.lower().startswith("readme")
    )


def is_pretokenized(spec: str, token_field: str = "input_ids") -> bool:
    """Whether a source spec holds token ids (see the module docstring); text otherwise."""
    from tinylm.data.sources import expand_files, is_synthetic

    if is_synthetic(spec):
        return False
    if spec.startswith("hf:") or _hf_local(spec) is not None:
        return bool(token_field) and token_field in _hf_columns(spec)
    try:
        files = expand_files(spec)
    except DataError:
        return False  # not found: the text path says so
    return any(is_token_file(p, token_field) for p in files)


def source_items(spec: str, token_field: str, token_dtype: str) -> list[Item]:
    """The flat files and row tables of a pretokenized spec; DataError on mixed or bad files."""
    from tinylm.data.sources import expand_files

    if spec.startswith("hf:") or _hf_local(spec) is not None:
        return [RowSource(spec, "hf-disk" if _hf_local(spec) else "hf-hub")]
    items: list[Item] = []
    files = expand_files(spec)
    for path in files:
        if is_token_file(path, token_field):
            items.append(_file_item(path, token_field, token_dtype))
        elif not (_is_metadata(path) and len(files) > 1):
            raise DataError(
                f"'{spec}' mixes token files and text ({path}); give text and token ids as "
                "separate sources (data.mix), or set data.token_field to the column of ids"
            )
    return items


def _file_item(path: Path, token_field: str, token_dtype: str) -> Item:
    suffix = path.suffix.lower()
    if suffix == ".bin":
        return bin_file(path, token_dtype)
    if suffix == ".npy":
        return _npy_item(path)
    if token_field not in _table_columns(path):
        raise DataError(
            f"{path}: no column '{token_field}' (columns: {', '.join(_table_columns(path))}); "
            "set data.token_field to the column that holds the token ids"
        )
    return RowSource(str(path), suffix[1:])


def bin_file(path: Path, token_dtype: str = "uint16") -> FlatFile:
    """A `.bin` of ids: an llm.c shard (header checked) or a headerless nanoGPT file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(LLMC_HEADER_BYTES)
    first = int(np.frombuffer(head[:4], "<i4")[0]) if len(head) >= 4 else None
    if first in LLMC_OTHER_MAGICS:
        raise DataError(
            f"{path}: {LLMC_OTHER_MAGICS[first]}, not a token shard; point data.train at the "
            "data shards (fineweb_train_*.bin)"
        )
    if first == LLMC_MAGIC:
        if len(head) < LLMC_HEADER_BYTES:
            raise DataError(
                f"{path}: truncated llm.c shard ({size:,} bytes, shorter than its "
                f"{LLMC_HEADER_BYTES:,}-byte header); download or write it again"
            )
        header = np.frombuffer(head, "<i4")
        version, count = int(header[1]), int(header[2])
        if version not in LLMC_DTYPES:
            raise DataError(
                f"{path}: llm.c shard version {version}; this tinylm reads versions "
                f"{', '.join(map(str, LLMC_DTYPES))} (uint16 / uint32 ids)"
            )
        dtype = LLMC_DTYPES[version]
        need = LLMC_HEADER_BYTES + count * dtype.itemsize
        if count < 0 or size != need:
            raise DataError(
                f"{path}: llm.c shard header says {count:,} tokens ({need:,} bytes) but the file "
                f"has {size:,} bytes: truncated or not an llm.c shard; download or write it again"
            )
        return FlatFile(path, LLMC_HEADER_BYTES, dtype, count, "llm.c .bin")
    dtype = np.dtype(token_dtype).newbyteorder("<")
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: {size:,} bytes is not a whole number of {token_dtype} ids (truncated, or "
            "another dtype: set data.token_dtype)"
        )
    return FlatFile(path, 0, dtype, size // dtype.itemsize, "nanoGPT .bin")


def _npy_item(path: Path) -> Item:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from None
    if dtype.kind not in "iu":
        raise DataError(f"{path}: a {dtype} array; token ids must be integers")
    if len(shape) == 1:
        need = offset + shape[0] * dtype.itemsize
        if path.stat().st_size < need:
            raise DataError(f"{path}: truncated .npy ({path.stat().st_size:,} of {need:,} bytes)")
        return FlatFile(path, offset, dtype, int(shape[0]), ".npy")
    if len(shape) == 2 and not fortran:
        return RowSource(str(path), "npy-rows")
    raise DataError(f"{path}: a {len(shape)}-D array; give a 1-D stream or 2-D rows of ids")


def check_dtype(item: Item, vocab_size: int) -> None:
    """Refuse a dtype that cannot hold every id of the vocabulary."""
    if isinstance(item, FlatFile) and np.iinfo(item.dtype).max + 1 < vocab_size:
        raise DataError(
            f"{item.path}: {item.dtype.name} ids cannot hold a vocabulary of {vocab_size:,} "
            f"(at most {np.iinfo(item.dtype).max + 1:,}); the file was written for another "
            "tokenizer, or set data.token_dtype=uint32"
        )


# --------------------------------------------------------------------------------------------
# Which tokenizer made the ids
# --------------------------------------------------------------------------------------------


def _table_metadata(path: Path) -> dict[bytes, bytes]:
    import pyarrow as pa

    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return dict(pq.read_schema(path).metadata or {})
    with pa.memory_map(str(path)) as source:
        return dict(_open_arrow(source).schema.metadata or {})


def declared_tokenizer_spec(spec: str, token_field: str, token_dtype: str) -> str | None:
    """What a source says about its tokenizer: a tokenizer file or name, or None."""
    local = _hf_local(spec)
    if local is not None:
        return str(local / TOKENIZER) if (local / TOKENIZER).is_file() else None
    if spec.startswith("hf:"):
        return None
    for item in source_items(spec, token_field, token_dtype):
        path = item.path if isinstance(item, FlatFile) else Path(item.where)
        if isinstance(item, RowSource) and item.kind in ("parquet", "arrow"):
            named = _table_metadata(path).get(b"tokenizer")
            if named:
                value = named.decode()
                return value if value == "gpt2" else str(path.parent / value)
        if (path.parent / TOKENIZER).is_file():
            return str(path.parent / TOKENIZER)
    return None


def pretokenized_tokenizer(
    specs: Sequence[str], configured: str, token_field: str, token_dtype: str
) -> Tokenizer | None:
    """The tokenizer that made the pretokenized sources among `specs` (None: none of them are).

    `configured` is data.tokenizer: "char" and "bpe:N" fit a tokenizer on text, so they say
    nothing about ids; a name or file does, and must agree with what the sources declare.
    """
    from tinylm.tokenizer import load_tokenizer

    token_specs = [s for s in specs if is_pretokenized(s, token_field)]
    if not token_specs:
        return None
    declared: dict[str, Tokenizer] = {}  # fingerprint -> tokenizer
    said_by: dict[str, str] = {}
    if configured != "char" and not configured.startswith("bpe:"):
        tok = load_tokenizer(configured)
        declared[tok.fingerprint()] = tok
        said_by[tok.fingerprint()] = f"data.tokenizer={configured}"
    for spec in token_specs:
        named = declared_tokenizer_spec(spec, token_field, token_dtype)
        if named is None:
            continue
        tok = load_tokenizer(named)
        declared.setdefault(tok.fingerprint(), tok)
        said_by.setdefault(tok.fingerprint(), f"'{spec}' ({named})")
    if not declared:
        raise DataError(
            f"'{token_specs[0]}' holds token ids, but nothing says which tokenizer made them: set "
            "data.tokenizer=gpt2 (or a tokenizer .json file), or put that tokenizer.json next to it"
        )
    if len(declared) > 1:
        raise DataError(
            "the sources were made by different tokenizers: "
            + " vs ".join(
                f"{said_by[fp]}: {t.kind}, vocab {t.vocab_size:,}" for fp, t in declared.items()
            )
            + "; ids from different tokenizers mean different things: re-tokenize one of them"
        )
    return next(iter(declared.values()))


# --------------------------------------------------------------------------------------------
# Reading ids
# --------------------------------------------------------------------------------------------


def _list_rows(column: Any) -> Iterator[np.ndarray]:
    """The rows of an arrow list<int> column (an Array or ChunkedArray), as NumPy arrays."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        if not (pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type)):
            raise DataError(
                f"token column is {chunk.type}, not a list of ids per row; set data.token_field"
            )
        if not pa.types.is_integer(chunk.type.value_type):
            raise DataError(f"token column holds {chunk.type.value_type}, not integer ids")
        # flatten() honours a sliced chunk: its values start at this chunk's first offset.
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        offsets = chunk.offsets.to_numpy().astype(np.int64)
        offsets -= offsets[0]
        valid = ~chunk.is_null().to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(valid).tolist():
            yield values[offsets[i] : offsets[i + 1]]


def iter_rows(item: RowSource, token_field: str) -> Iterator[np.ndarray]:
    """The documents (rows of ids) of a table source, a batch at a time."""
    if item.kind == "npy-rows":
        rows = np.load(item.where, mmap_mode="r")
        for row in rows:
            yield np.asarray(row)
        return
    if item.kind == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(item.where).iter_batches(
            batch_size=1024, columns=[token_field]
        ):
            yield from _list_rows(batch.column(0))
        return
    if item.kind == "arrow":
        import pyarrow as pa

        with pa.memory_map(item.where) as source:
            reader = _open_arrow(source)
            batches = reader if hasattr(reader, "read_next_batch") else None
            if batches is None or not hasattr(reader, "__iter__"):
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                yield from _list_rows(batch.column(batch.schema.get_field_index(token_field)))
        return
    if item.kind == "hf-disk":
        local = _hf_local(item.where)
        assert local is not None
        ds = _load_from_disk(local, item.where).with_format("arrow")
        for table in ds.iter(batch_size=1024):
            yield from _list_rows(table.column(token_field))
        return
    from tinylm.data.sources import _parse_hf

    datasets = _import_datasets(item.where)
    name, config, split = _parse_hf(item.where)
    for example in datasets.load_dataset(name, config, split=split, streaming=True):
        yield np.asarray(example[token_field])


def _flat_blocks(item: FlatFile, block: int = CHUNK_TOKENS) -> Iterator[np.ndarray]:
    data = np.memmap(
        item.path, dtype=item.dtype, mode="r", offset=item.offset, shape=(item.tokens,)
    )
    for i in range(0, item.tokens, block):
        yield np.asarray(data[i : i + block])


def _check_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise DataError(
            f"{where}: token id {bad:,} is outside the tokenizer's vocabulary (0..{vocab_size - 1:,}); "
            "the ids were made by another tokenizer (set data.tokenizer to it), or the dtype is wrong "
            "(data.token_dtype)"
        )


def _scan(item: FlatFile, vocab_size: int, eot: int | None) -> int:
    """Check every id of an in-place file against the vocabulary; return its end-of-text count."""
    eots = 0
    for ids in _flat_blocks(item, SCAN_TOKENS):
        _check_ids(ids, vocab_size, str(item.path))
        if eot is not None:
            eots += int(np.count_nonzero(ids == eot))
    return eots


# --------------------------------------------------------------------------------------------
# Preparing
# --------------------------------------------------------------------------------------------


def pretokenized_key(base_key: str, token_field: str, token_dtype: str) -> str:
    """The cache key of a pretokenized dataset: the text key plus the token settings."""
    ident = json.dumps([base_key, token_field, token_dtype, VERSION])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def prepare_pretokenized(
    sources: Sequence[str],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    *,
    val_sources: Sequence[str] = (),
    settings: Any = None,
    token_field: str = "input_ids",
    token_dtype: str = "uint16",
    log: Callable[[str], None] = print,
) -> PreparedDataset:
    """Make a prepared dataset at `out_dir` from pretokenized sources (see the module docstring)."""
    from tinylm.data.prepare import (
        SplitSettings,
        _effective,
        _remove_partial,
        dataset_key,
        finished_dataset,
    )
    from tinylm.fileio import make_dir
    from tinylm.locks import DirectoryLock

    settings = _effective(settings or SplitSettings(), val_sources)
    out_dir = Path(out_dir)
    if token_dtype not in TOKEN_DTYPES:
        raise DataError(
            f"data.token_dtype={token_dtype!r}: expected one of {', '.join(TOKEN_DTYPES)}"
        )
    key = pretokenized_key(
        dataset_key(sources, val_sources, tokenizer.fingerprint(), settings),
        token_field,
        token_dtype,
    )
    # Everything is checked before a byte is written: bad input leaves nothing behind.
    train = [(i, False) for s in sources for i in source_items(s, token_field, token_dtype)]
    val = [(i, True) for s in val_sources for i in source_items(s, token_field, token_dtype)]
    for item, _ in train + val:
        check_dtype(item, tokenizer.vocab_size)
    _check_declared([*sources, *val_sources], tokenizer, token_field, token_dtype)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    created = not out_dir.exists()
    make_dir(out_dir, DataError, "dataset directory")
    try:
        with DirectoryLock(out_dir, "prepare a dataset", wait=True, error=DataError, log=log):
            if (ds := finished_dataset(out_dir, key, log)) is not None:
                return ds
            in_place = all(isinstance(i, FlatFile) and i.dtype == dtype for i, _ in train + val)
            try:
                (out_dir / ".progress").mkdir(exist_ok=True)
                write_json(out_dir / ".progress" / "settings.json", {"key": key})
                if in_place:
                    ranges, docs = _in_place(train + val, tokenizer, log)  # type: ignore[arg-type]
                else:
                    ranges, docs = _stream(
                        train + val, out_dir, tokenizer, dtype, settings, token_field, log
                    )
                from tinylm.data.prepare import assemble_meta

                meta = assemble_meta(
                    ranges,
                    docs,
                    sources,
                    val_sources,
                    tokenizer,
                    dtype,
                    settings,
                    split_by_tokens=in_place,
                )
                meta.update(key=key, in_place=in_place, token_field=token_field, pretokenized=True)
                tokenizer.save(out_dir / TOKENIZER)
                write_json(out_dir / META, meta)
            except DataError:
                _remove_partial(out_dir)
                raise
            shutil.rmtree(out_dir / ".progress", ignore_errors=True)
    finally:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
    return PreparedDataset.open(out_dir)


def _check_declared(
    specs: Sequence[str], tokenizer: Tokenizer, token_field: str, token_dtype: str
) -> None:
    """Refuse a source whose own metadata names another tokenizer than the one in use."""
    from tinylm.tokenizer import load_tokenizer

    for spec in specs:
        named = declared_tokenizer_spec(spec, token_field, token_dtype)
        if named is not None and load_tokenizer(named).fingerprint() != tokenizer.fingerprint():
            raise DataError(
                f"'{spec}' was made by the tokenizer {named}, not the one in use ({tokenizer.kind}, "
                f"vocab {tokenizer.vocab_size:,}); ids from different tokenizers mean different things"
            )


def _in_place(
    items: list[tuple[FlatFile, bool]], tokenizer: Tokenizer, log: Callable[[str], None]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    ranges: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    for item, to_val in items:
        if item.tokens == 0:
            raise DataError(f"{item.path}: holds no token ids")
        eots = _scan(item, tokenizer.vocab_size, tokenizer.eot_id)
        split = "val" if to_val else "train"
        ranges[split].append(
            {
                "path": str(item.path.resolve()),
                "offset": item.offset,
                "start": 0,
                "tokens": item.tokens,
            }
        )
        docs[split] += max(eots, 1)
        log(f"data: {item.path}: {item.kind}, {item.tokens:,} tokens read in place")
    return ranges, docs


def _stream(
    items: list[tuple[Item, bool]],
    out_dir: Path,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    settings: Any,
    token_field: str,
    log: Callable[[str], None],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """Copy ids into shards, a chunk at a time; chunks finished by an earlier run are kept."""
    from tinylm.data.prepare import doc_goes_to_val

    eot = tokenizer.eot_id
    vocab = tokenizer.vocab_size
    chosen: set[int] | None = None
    if settings.val_count > 0:
        total = sum(1 for item, v in items if not v for _ in _documents(item, token_field))
        if settings.val_count >= total:
            raise DataError(
                f"val count {settings.val_count:,} is not smaller than the {total:,} documents "
                "(rows) of the source; hold out fewer (data.val_count) or use a fraction"
            )
        chosen = set(random.Random(settings.split_seed).sample(range(1, total), settings.val_count))

    def to_val(i: int) -> bool:
        if chosen is not None:
            return i in chosen
        return doc_goes_to_val(i, settings.split_seed, settings.val_fraction)

    ranges: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    staged = [0]
    index = [0]
    eot_array = np.array([eot if eot is not None else 0], dtype=np.int64)

    def flush() -> None:
        for split, arrays in parts.items():
            if not arrays:
                continue
            name = f"{split}_{index[0]:06d}.bin"
            ids = np.concatenate(arrays).astype(dtype)
            marker = out_dir / ".progress" / f"{index[0]:06d}-{split}.json"
            done = marker.is_file() and (out_dir / name).is_file()
            if not (done and (out_dir / name).stat().st_size == ids.nbytes):
                from tinylm.data.shards import write_shard

                write_shard(out_dir / name, ids)
                write_json(marker, {"tokens": int(ids.size)})
            ranges[split].append({"file": name, "start": 0, "tokens": int(ids.size)})
            arrays.clear()
        staged[0] = 0
        index[0] += 1

    doc = 0
    for item, forced_val in items:
        where = str(item.path if isinstance(item, FlatFile) else item.where)
        n_before = sum(r["tokens"] for rs in ranges.values() for r in rs) + staged[0]
        flat_docs = 0
        pieces = _documents(item, token_field)
        # Packed rows (fixed-length windows of a stream) carry their own end-of-text ids: the
        # first rows tell, and then no row gets one added (documents are counted by their ids).
        head = list(itertools.islice(pieces, PACKED_PROBE_ROWS))
        packed = eot is not None and any(row and bool((ids == eot).any()) for ids, row in head)
        for ids, row in itertools.chain(head, pieces):
            _check_ids(ids, vocab, where)
            # Rows are split by document; a flat stream stays whole (val: its end, by tokens).
            split = "val" if forced_val or (row and to_val(doc)) else "train"
            parts[split].append(ids.astype(np.int64, copy=False))
            staged[0] += ids.size
            if row and not packed:
                if eot is not None:
                    parts[split].append(eot_array)
                    staged[0] += 1
                docs[split] += 1
            elif row:
                docs[split] += int(np.count_nonzero(ids == eot))
            else:
                flat_docs += int(np.count_nonzero(ids == eot)) if eot is not None else 0
            doc += row and not forced_val
            if staged[0] >= CHUNK_TOKENS:
                flush()
        if isinstance(item, FlatFile):
            docs["val" if forced_val else "train"] += max(flat_docs, 1)
        if sum(r["tokens"] for rs in ranges.values() for r in rs) + staged[0] == n_before:
            raise DataError(f"{where}: holds no token ids (column '{token_field}' is empty?)")
    if staged[0]:
        flush()
    log(
        f"data: copied {sum(r['tokens'] for rs in ranges.values() for r in rs):,} ids into {out_dir}"
    )
    return ranges, docs


def _documents(item: Item, token_field: str) -> Iterator[tuple[np.ndarray, bool]]:
    """(ids, is a whole row) pieces of an item: rows of a table, blocks of a flat file."""
    if isinstance(item, FlatFile):
        for block in _flat_blocks(item):
            yield block, False
        return
    for row in iter_rows(item, token_field):
        yield row, True
