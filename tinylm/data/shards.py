"""The on-disk format of a prepared dataset and read-only access to it (`PreparedDataset`, `TokenArray`).

A prepared dataset is a directory:

    meta.json            written last: a directory without it is not (yet) a dataset
    tokenizer.json       the tokenizer the ids belong to
    train_000000.bin     headerless little-endian uint16 (vocab <= 65,536) or uint32 ids
    val_000003.bin       ...

Each document's ids are followed by the end-of-text id. `meta.json` lists, per split, the shard
ranges `{"file", "start", "tokens"}` (a range of a file, in tokens) that make up the split, in
order, so that a split can also be a range of another split's files (a single-document source is
split by a token range at its end, without copying). A pretokenized source already in this layout
(a nanoGPT or llm.c `.bin`, a 1-D `.npy`) is read in place instead of copied: its ranges name the
file by absolute `"path"` (instead of `"file"`) and skip its header with `"offset"` (bytes), and
`meta.json` says `"in_place": true` (only such a dataset may name files outside its directory).
Every file is written under a temporary name and renamed when complete (after fsync,
`fileio.atomic_write`), so a shard name never refers to a half-written file.

`PreparedDataset.open` checks `meta.json` against its schema before anything is mapped: field
types, a dtype that holds the vocabulary, shard names that are plain names inside the directory
(never `../x` or `/x`), ranges that add up to the split's token count, and every shard's size
against the ranges that use it. Anything else is a DataError naming the file.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import numpy as np

from tinylm.data.errors import DataError
from tinylm.fileio import atomic_write_bytes, confined
from tinylm.tokenizer.base import Tokenizer

FORMAT = "tinylm-prepared"
VERSION = 1
META = "meta.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest shard dtype that holds every id of a vocabulary of this size."""
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise DataError(
        f"vocabulary of {vocab_size:,} ids does not fit in uint32 shards (at most {1 << 32:,}); "
        "use a smaller tokenizer"
    )


def write_shard(path: Path, ids: np.ndarray) -> None:
    """Write one shard of ids (already in the dataset's dtype) atomically."""
    atomic_write_bytes(path, memoryview(np.ascontiguousarray(ids)).cast("B"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, ensure_ascii=False).encode())


def invalid_utf8_note(stats: dict[str, Any]) -> str | None:
    """The warning about replaced invalid UTF-8, from a dataset's `meta.json` stats (or None).

    Said when the dataset is made and again whenever it is used, so a cached dataset never hides it.
    """
    n = stats.get("invalid_utf8") or 0
    if not isinstance(n, int) or n <= 0:
        return None
    files = stats.get("invalid_utf8_files") or {}
    where = (
        " in " + ", ".join(f"{f} ({k:,})" for f, k in files.items())
        if isinstance(files, dict) and files
        else ""
    )
    return (
        f"warning: {n:,} invalid UTF-8 sequence(s) in the source text were replaced with U+FFFD{where}; "
        "re-encode the source as UTF-8 if that is not intended"
    )


def range_path(directory: Path, r: dict[str, Any]) -> Path:
    """The file a shard range reads: a shard of the dataset, or a source file read in place."""
    return Path(r["path"]) if "path" in r else Path(directory) / r["file"]


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_meta(directory: Path, meta: Any) -> None:
    """Raise DataError (naming meta.json) unless `meta` has the shape this version writes."""
    path = directory / META

    def bad(what: str) -> DataError:
        return DataError(
            f"{path}: {what}; the file was edited or damaged: delete '{directory}' and prepare it again"
        )

    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise DataError(
            f'{path}: not a tinylm prepared dataset (no "format": "{FORMAT}"); point at a '
            "directory made by `tinylm prepare`, or choose another output directory"
        )
    if meta.get("version") != VERSION:
        raise DataError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, this tinylm "
            f"reads {FORMAT!r} version {VERSION}; prepare the dataset again with this version"
        )
    dtype = meta.get("dtype")
    if dtype not in ("uint16", "uint32"):
        raise bad(f"dtype {dtype!r} is not uint16 or uint32")
    tok = meta.get("tokenizer")
    if not (
        isinstance(tok, dict)
        and isinstance(tok.get("fingerprint"), str)
        and isinstance(tok.get("type"), str)
        and _is_int(tok.get("vocab_size"), 1)
        and (tok.get("eot_id") is None or _is_int(tok.get("eot_id")))
    ):
        raise bad("'tokenizer' must hold type, fingerprint, vocab_size and eot_id")
    if tok["vocab_size"] > np.iinfo(np.dtype(dtype)).max + 1:
        raise bad(f"a vocabulary of {tok['vocab_size']:,} ids does not fit {dtype} shards")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or "train" not in splits or not set(splits) <= set(SPLITS):
        raise bad("'splits' must map 'train' (and 'val') to their shards")
    for name, info in splits.items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise bad(f"split '{name}' has no list of shards")
        if not _is_int(info.get("tokens")) or not _is_int(info.get("documents")):
            raise bad(f"split '{name}' needs integer 'tokens' and 'documents'")
        total = 0
        for r in info["shards"]:
            if not isinstance(r, dict) or not (
                _is_int(r.get("start")) and _is_int(r.get("tokens")) and _is_int(r.get("offset", 0))
            ):
                raise bad(f"split '{name}': shard range {r!r} needs 'file', 'start' and 'tokens'")
            if "path" in r:
                if meta.get("in_place") is not True or not (
                    isinstance(r["path"], str) and Path(r["path"]).is_absolute()
                ):
                    raise bad(f"split '{name}': range {r!r} names an outside file")
            else:
                confined(directory, r.get("file"), path, DataError)
            total += r["tokens"]
        if total != info["tokens"]:
            raise bad(
                f"split '{name}' says {info['tokens']:,} tokens but its shards hold {total:,}"
            )


class TokenArray:
    """A read-only view over the memory-mapped shard ranges of one split.

    `len(a)` is the number of tokens; `a[i:j]` is an int64 NumPy array (copied out of the maps,
    crossing shard boundaries); `a[i]` is an int; `a.num_documents` counts documents.
    """

    def __init__(
        self, directory: Path, ranges: list[dict[str, Any]], dtype: np.dtype, num_documents: int
    ) -> None:
        self.directory = directory
        self.dtype = dtype
        self.num_documents = num_documents
        self._ranges = [r for r in ranges if r["tokens"] > 0]
        self._starts = [0]
        for r in self._ranges:
            self._starts.append(self._starts[-1] + r["tokens"])
        self._maps: list[np.memmap | None] = [None] * len(self._ranges)

    def __len__(self) -> int:
        return self._starts[-1]

    def count(self, token_id: int, chunk: int = 1 << 24) -> int:
        """How many times `token_id` occurs (read in chunks: memory stays bounded)."""
        return sum(
            int(np.count_nonzero(self[i : i + chunk] == token_id))
            for i in range(0, len(self), chunk)
        )

    def _map(self, k: int) -> np.memmap:
        m = self._maps[k]
        if m is None:
            r = self._ranges[k]
            m = np.memmap(
                range_path(self.directory, r),
                dtype=self.dtype,
                mode="r",
                offset=r.get("offset", 0) + r["start"] * self.dtype.itemsize,
                shape=(r["tokens"],),
            )
            self._maps[k] = m
        return m

    def __getitem__(self, index: int | slice) -> Any:
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                raise IndexError("TokenArray slices must be contiguous (step 1)")
            return self._read(start, max(start, stop))
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token index {index} out of range for {n} tokens")
        return int(self._read(i, i + 1)[0])

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=np.int64)
        k = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < stop:
            lo = pos - self._starts[k]
            take = min(stop, self._starts[k + 1]) - pos
            out[pos - start : pos - start + take] = self._map(k)[lo : lo + take]
            pos += take
            k += 1
        return out

    def __repr__(self) -> str:
        return (
            f"TokenArray({len(self):,} tokens, {self.num_documents:,} documents, {self.directory})"
        )


class PreparedDataset:
    """A prepared dataset directory, validated on open (see the module docstring)."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")  # shards are little-endian

    @classmethod
    def open(cls, directory: str | Path) -> PreparedDataset:
        """Open and check a prepared dataset; DataError names what is wrong and what to do."""
        directory = Path(directory)
        meta_path = directory / META
        if not meta_path.is_file():
            raise DataError(
                f"'{directory}' is not a prepared dataset: it has no {META} (an interrupted "
                "`tinylm prepare` leaves none). Re-run the prepare command to finish it."
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(
                f"{meta_path}: unreadable ({e}); delete the directory and prepare it again"
            ) from None
        except OSError as e:
            from tinylm.fileio import os_error_message

            raise DataError(os_error_message(e, meta_path, "read")) from None
        check_meta(directory, meta)
        ds = cls(directory, meta)
        # Every file must be exactly as long as the furthest range that uses it: shorter is a
        # truncated copy, longer means the file is not the one the metadata describes.
        # A file read in place may hold more than the ranges use (a header, another split).
        ends: dict[Path, tuple[int, str]] = {}
        for split, info in meta["splits"].items():
            for r in info["shards"]:
                end = r.get("offset", 0) + (r["start"] + r["tokens"]) * ds.dtype.itemsize
                if end > ends.get(range_path(directory, r), (-1, ""))[0]:
                    ends[range_path(directory, r)] = (end, split)
        for path, (need, split) in ends.items():
            size = path.stat().st_size if path.is_file() else -1
            if size != need and not (meta.get("in_place") and size > need):
                raise DataError(
                    f"{path}: {'missing' if size < 0 else f'{size:,} bytes, expected {need:,}'} "
                    f"({split} split, from {META}); the dataset is damaged: delete '{directory}' "
                    "and prepare it again"
                )
        return ds

    def notes(self) -> list[str]:
        """What a user of this dataset should be told each time (replaced invalid UTF-8)."""
        note = invalid_utf8_note(self.meta.get("stats") or {})
        return [note] if note else []

    def tokenizer(self) -> Tokenizer:
        """The tokenizer this dataset was made with."""
        from tinylm.tokenizer import tokenizer_from_file

        tokenizer = tokenizer_from_file(self.directory / TOKENIZER)
        if tokenizer.fingerprint() != self.fingerprint:
            raise DataError(
                f"{self.directory / TOKENIZER} is not the tokenizer {self.directory / META} was made "
                f"with (fingerprint {tokenizer.fingerprint()}, expected {self.fingerprint}); the "
                f"dataset was edited: delete '{self.directory}' and prepare it again"
            )
        return tokenizer

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse a tokenizer other than the one the ids were made with."""
        theirs = tokenizer.fingerprint()
        if theirs != self.fingerprint:
            mine = self.meta["tokenizer"]
            raise DataError(
                f"prepared dataset '{self.directory}' was made with a different tokenizer "
                f"({mine['type']}, vocab {mine['vocab_size']:,}, fingerprint {self.fingerprint}) than the one "
                f"given ({tokenizer.kind}, vocab {tokenizer.vocab_size:,}, fingerprint {theirs}). "
                "Prepare the data again with this tokenizer, or use the dataset's own tokenizer.json."
            )

    def split(self, name: str) -> TokenArray:
        """The tokens of split `name` ("train" or "val")."""
        if name not in self.meta["splits"]:
            raise DataError(f"prepared dataset '{self.directory}' has no '{name}' split")
        info = self.meta["splits"][name]
        return TokenArray(self.directory, info["shards"], self.dtype, info["documents"])

    def num_tokens(self, name: str) -> int:
        return int(self.meta["splits"].get(name, {}).get("tokens", 0))

    def summary(self) -> str:
        """Lines for the console: where it is, tokenizer, and per-split token/document counts."""
        tok = self.meta["tokenizer"]
        lines = [
            f"{self.directory}: {tok['type']} tokenizer (vocab {tok['vocab_size']:,}), {self.meta['dtype']}"
        ]
        for name, info in self.meta["splits"].items():
            lines.append(f"  {name}: {info['tokens']:,} tokens, {info['documents']:,} documents")
        if "note" in self.meta.get("split", {}):
            lines.append(f"  split: {self.meta['split']['note']}")
        stats = self.meta.get("stats", {})
        if stats:
            lines.append(
                f"  read {stats['source_bytes'] / 1e6:,.1f} MB in {stats['seconds']:.1f} s "
                f"({stats['mb_per_s']:.1f} MB/s, {stats['workers']} worker(s))"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.num_tokens(s):,}" for s in self.meta["splits"])
        return f"PreparedDataset({self.directory}, {counts} tokens)"
