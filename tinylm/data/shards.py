"""The on-disk format of a prepared dataset and read-only access to it (`PreparedDataset`, `TokenArray`).

A prepared dataset is a directory:

    meta.json            written last: a directory without it is not (yet) a dataset
    tokenizer.json       the tokenizer the ids belong to
    train_000000.bin     headerless little-endian uint16 (vocab <= 65,536) or uint32 ids
    val_000003.bin       ...

Each document's ids are followed by the end-of-text id. `meta.json` lists, per split, the shard
ranges `{"file", "start", "tokens"}` (a range of a file, in tokens) that make up the split, in
order, so that a split can also be a range of another split's files (a single-document source is
split by a token range at its end, without copying). Every file is written as `NAME.tmp` and
renamed when complete (after fsync), so a shard name never refers to a half-written file.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tinylm.data.errors import DataError
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


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `path` via `path.tmp` + fsync + rename, so the name only ever holds complete content."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: Path, ids: np.ndarray) -> None:
    """Write one shard of ids (already in the dataset's dtype) atomically."""
    atomic_write_bytes(path, memoryview(np.ascontiguousarray(ids)).cast("B"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, ensure_ascii=False).encode())


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

    def _map(self, k: int) -> np.memmap:
        m = self._maps[k]
        if m is None:
            r = self._ranges[k]
            m = np.memmap(
                self.directory / r["file"],
                dtype=self.dtype,
                mode="r",
                offset=r["start"] * self.dtype.itemsize,
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
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise DataError(
                f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, this tinylm "
                f"reads {FORMAT!r} version {VERSION}; prepare the dataset again with this version"
            )
        ds = cls(directory, meta)
        for split, info in meta["splits"].items():
            for r in info["shards"]:
                path = directory / r["file"]
                need = (r["start"] + r["tokens"]) * ds.dtype.itemsize
                size = path.stat().st_size if path.is_file() else -1
                if size < need:
                    raise DataError(
                        f"{path}: {'missing' if size < 0 else f'{size:,} bytes, expected {need:,}'} "
                        f"({split} split); the dataset is damaged: delete '{directory}' and prepare it again"
                    )
        return ds

    def tokenizer(self) -> Tokenizer:
        """The tokenizer this dataset was made with."""
        from tinylm.tokenizer import tokenizer_from_file

        return tokenizer_from_file(self.directory / TOKENIZER)

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
