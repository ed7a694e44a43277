"""Streaming, parallel, bounded-memory, resumable tokenization of sources into a prepared dataset.

The main process streams document pieces from the sources (`sources.iter_pieces`), decides each
document's split, and cuts the stream into chunks of about `chunk_chars` characters. Chunk `i`
is tokenized by a worker process, which writes `train_{i:06d}.bin` / `val_{i:06d}.bin` itself
(`.tmp` + rename) and then a marker `.progress/{i:06d}.json` with its counts. Chunks depend only
on the sources and settings, so the output is identical for any number of workers; at most
`2 * workers` chunks are in flight, so memory is bounded whatever the input size.

Resuming: a re-run with the same sources, tokenizer and settings (the `.progress/settings.json`
key) re-reads the sources but skips every chunk whose marker exists; anything else in the
directory is rewritten. `meta.json` is written last, so a directory without it is never taken
for a dataset. A user-data error (empty source, bad record) removes the partial output; an
interruption (Ctrl-C, SIGTERM, a killed worker) or a full disk keeps it for the re-run.

Files that are not ours are never touched: the output directory may hold other files, but if
one of them has a name prepare would write (`tokenizer.json`, `train_000000.bin`, ...) and the
directory is not an unfinished prepare of ours (`.progress/`), prepare refuses before writing
anything; clean-up removes only names of our own pattern. Two prepares of the same output
serialize on a lock (`locks.py`): the second waits, then finds the finished dataset.

Split: each document goes to val with probability `val_fraction`, decided by a seeded hash of
its index (document 0 always goes to train), or exactly `val_count` documents are held out; an
explicit val source goes entirely to val. When that leaves val empty (a single-document source
such as tinyshakespeare.txt), val is the last `val_fraction` of the train tokens instead, as a
token range of the same files, and meta.json says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tinylm.data.errors import DataError
from tinylm.data.shards import (
    FORMAT,
    META,
    TOKENIZER,
    VERSION,
    PreparedDataset,
    dtype_for_vocab,
    invalid_utf8_note,
    write_json,
    write_shard,
)
from tinylm.data.sources import SourceStats, iter_pieces, source_bytes, source_identity
from tinylm.fileio import make_dir, os_error_message
from tinylm.interrupts import exit_with_parent, signal_name, workers_ignore_sigint
from tinylm.locks import DirectoryLock
from tinylm.tokenizer.base import EOT, Tokenizer, TokenizerError

DEFAULT_CHUNK_CHARS = 4 << 20
PROGRESS = ".progress"
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SplitSettings:
    """Everything besides the sources and the tokenizer that changes the prepared output."""

    text_field: str = "text"
    delimiter: str = EOT
    val_fraction: float = 0.1
    val_count: int = 0  # > 0: hold out exactly this many documents instead of a fraction
    split_seed: int = 1234
    chunk_chars: int = DEFAULT_CHUNK_CHARS


def dataset_key(
    sources: Sequence[str],
    val_sources: Sequence[str],
    tokenizer_fingerprint: str,
    settings: SplitSettings,
) -> str:
    """Hash of source identities (path, size, mtime) + tokenizer + settings: names a prepared dataset."""
    settings = _effective(settings, val_sources)
    ident = {
        "version": VERSION,
        "sources": [source_identity(s) for s in sources],
        "val_sources": [source_identity(s) for s in val_sources],
        "tokenizer": tokenizer_fingerprint,
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _effective(settings: SplitSettings, val_sources: Sequence[str]) -> SplitSettings:
    """An explicit val source replaces the split: the fraction and count then mean nothing."""
    return replace(settings, val_fraction=0.0, val_count=0) if val_sources else settings


def fit_char_tokenizer(
    specs: Sequence[str], text_field: str = "text", delimiter: str = EOT
) -> Tokenizer:
    """A CharTokenizer fitted on the sources, streamed (memory is the alphabet, not the text)."""
    from tinylm.tokenizer import CharTokenizer

    return CharTokenizer.fit(
        text
        for spec in specs
        for text, _ in iter_pieces(spec, text_field=text_field, delimiter=delimiter)
    )


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a fast, well-mixed, platform-independent hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def doc_goes_to_val(index: int, seed: int, fraction: float) -> bool:
    """Seeded document-level split; document 0 stays in train so train is never empty."""
    if index == 0 or fraction <= 0:
        return False
    return _mix64((seed * 0x100000001B3 + index) & _MASK64) < fraction * 2.0**64


# --------------------------------------------------------------------------------------------
# Encoding a chunk (runs in worker processes)
# --------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    index: int
    texts: list[str]
    ends: list[bool]
    to_val: list[bool]
    source_bytes: int  # bytes of source files read for this chunk (progress)
    chars: int


def _tokenize_chunk(
    chunk: _Chunk,
    encode: Callable[[list[str]], list[np.ndarray]],
    out_dir: Path,
    dtype: np.dtype,
    eot: int,
) -> dict[str, Any]:
    """Tokenize one chunk, write its shards, then its completion marker; return its counts."""
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    eot_array = np.array([eot], dtype=np.int64)
    for ids, end, to_val in zip(encode(chunk.texts), chunk.ends, chunk.to_val, strict=True):
        split = "val" if to_val else "train"
        parts[split].append(ids)
        if end:
            parts[split].append(eot_array)
            docs[split] += 1
    result: dict[str, Any] = {
        "chunk": chunk.index,
        "bytes": chunk.source_bytes,
        "chars": chunk.chars,
        "splits": {},
    }
    for split, arrays in parts.items():
        if not arrays:
            continue
        ids = np.concatenate(arrays)
        name = f"{split}_{chunk.index:06d}.bin"
        write_shard(out_dir / name, ids.astype(dtype))
        result["splits"][split] = {"file": name, "tokens": int(ids.size), "documents": docs[split]}
    write_json(out_dir / PROGRESS / f"{chunk.index:06d}.json", result)  # last: marks the chunk done
    return result


_WORKER: dict[str, Any] = {}


def _worker_init(out_dir: str, dtype: str, eot: int) -> None:
    from tinylm.tokenizer import tokenizer_from_file

    exit_with_parent()  # a SIGKILLed prepare must not leave its workers behind
    # Workers tokenize whole chunks; letting each also use every core would oversubscribe.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    tokenizer = tokenizer_from_file(Path(out_dir) / TOKENIZER)
    _WORKER.update(
        encode=tokenizer.encode_to_arrays, out_dir=Path(out_dir), dtype=np.dtype(dtype), eot=eot
    )


def _worker_run(chunk: _Chunk) -> dict[str, Any]:
    w = _WORKER
    return _tokenize_chunk(chunk, w["encode"], w["out_dir"], w["dtype"], w["eot"])


# --------------------------------------------------------------------------------------------
# The main process: stream, chunk, dispatch, assemble
# --------------------------------------------------------------------------------------------


def _count_documents(sources: Sequence[str], settings: SplitSettings) -> int:
    return sum(
        end
        for spec in sources
        for _, end in iter_pieces(
            spec, text_field=settings.text_field, delimiter=settings.delimiter
        )
    )


def _val_chooser(
    sources: Sequence[str], settings: SplitSettings, log: Callable[[str], None]
) -> Callable[[int], bool]:
    if settings.val_count <= 0:
        return lambda i: doc_goes_to_val(i, settings.split_seed, settings.val_fraction)
    # An exact count needs the number of documents: one extra read of the sources (no tokenizing).
    total = _count_documents(sources, settings)
    if settings.val_count >= total:
        raise DataError(
            f"val count {settings.val_count:,} is not smaller than the {total:,} documents in the source; "
            "hold out fewer documents (data.val_count / --val-count) or use a fraction"
        )
    chosen = set(random.Random(settings.split_seed).sample(range(1, total), settings.val_count))
    log(f"prepare: holding out {len(chosen):,} of {total:,} documents for validation")
    return chosen.__contains__


def _read_marker(out_dir: Path, chunk: _Chunk, dtype: np.dtype) -> dict[str, Any] | None:
    """A finished chunk's marker, if it and the shards it names check out (else: redo the chunk)."""
    try:
        marker = json.loads((out_dir / PROGRESS / f"{chunk.index:06d}.json").read_text())
        ok = marker["chunk"] == chunk.index and marker["chars"] == chunk.chars
        for split, info in marker["splits"].items():
            expected = f"{split}_{chunk.index:06d}.bin"
            size = (out_dir / expected).stat().st_size
            ok = ok and info["file"] == expected and size == int(info["tokens"]) * dtype.itemsize
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return marker if ok else None


def _iter_chunks(
    sources: Sequence[str],
    val_sources: Sequence[str],
    settings: SplitSettings,
    to_val: Callable[[int], bool],
    stats: SourceStats,
) -> Iterator[_Chunk]:
    index, texts, ends, vals, chars, last_bytes = 0, [], [], [], 0, 0
    doc = 0
    for spec, forced_val in [(s, False) for s in sources] + [(s, True) for s in val_sources]:
        source_chars = 0
        for text, end in iter_pieces(
            spec, text_field=settings.text_field, delimiter=settings.delimiter, stats=stats
        ):
            texts.append(text)
            ends.append(end)
            vals.append(forced_val or to_val(doc))
            chars += len(text)
            source_chars += len(text)
            doc += end and not forced_val
            if chars >= settings.chunk_chars:
                yield _Chunk(index, texts, ends, vals, stats.bytes_read - last_bytes, chars)
                index, texts, ends, vals, chars, last_bytes = (
                    index + 1,
                    [],
                    [],
                    [],
                    0,
                    stats.bytes_read,
                )
        if source_chars == 0:
            raise DataError(
                f"data source '{spec}' is empty: it holds no text (records are read from the field "
                f"'{settings.text_field}'). Point data.train (or the prepare SOURCE) at text."
            )
    if texts:
        yield _Chunk(index, texts, ends, vals, stats.bytes_read - last_bytes, chars)


def _split_ranges(
    ranges: list[dict[str, Any]], at: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Cut a list of shard ranges at token `at`: (ranges before, ranges after)."""
    head: list[dict[str, Any]] = []
    tail: list[dict[str, Any]] = []
    pos = 0
    for r in ranges:
        n = r["tokens"]
        if pos + n <= at:
            head.append(r)
        elif pos >= at:
            tail.append(r)
        else:
            k = at - pos
            head.append({**r, "tokens": k})
            tail.append({**r, "start": r["start"] + k, "tokens": n - k})
        pos += n
    return head, tail


# Every name prepare writes, with the temporary names `fileio.temp_name` gives them.
_OURS = re.compile(
    r"^(?:(?:train|val)_\d{6}\.bin|meta\.json|tokenizer\.json)(?:\.\d+-\d+\.tmp|\.tmp)?$"
)
_TEMP = re.compile(r"\.tmp$")


def _settings(out_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((out_dir / PROGRESS / "settings.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _foreign_files(out_dir: Path, tokenizer: Tokenizer) -> list[str]:
    """Files with names prepare would write that an earlier prepare of ours did not write."""
    if (out_dir / PROGRESS).is_dir():
        return []  # an unfinished prepare of ours: those names are ours
    found = []
    for p in sorted(out_dir.iterdir()):
        if not _OURS.match(p.name) or _TEMP.search(p.name):
            continue
        if p.name == TOKENIZER and p.is_file() and _same_tokenizer(p, tokenizer):
            continue  # the very tokenizer we would write (e.g. --tokenizer OUT/tokenizer.json)
        found.append(p.name)
    return found


def _same_tokenizer(path: Path, tokenizer: Tokenizer) -> bool:
    from tinylm.tokenizer import tokenizer_from_file

    try:
        return tokenizer_from_file(path).fingerprint() == tokenizer.fingerprint()
    except (TokenizerError, OSError):
        return False


def _remove_partial(out_dir: Path) -> None:
    """Delete what an unfinished prepare of ours wrote (shards, temp files, progress), nothing else."""
    keep_tokenizer = not _settings(out_dir).get("tokenizer_written", True)
    for p in out_dir.iterdir():
        if p.name == META or not _OURS.match(p.name) or not p.is_file():
            continue
        if p.name == TOKENIZER and keep_tokenizer:
            continue
        p.unlink(missing_ok=True)
    shutil.rmtree(out_dir / PROGRESS, ignore_errors=True)


def _remove_temps(out_dir: Path) -> None:
    """Temporary files of ours left by a killed prepare (we hold the lock: no one is writing)."""
    for p in out_dir.iterdir():
        if _OURS.match(p.name) and _TEMP.search(p.name) and p.is_file():
            p.unlink(missing_ok=True)


class _Dispatcher:
    """Runs chunks inline (one worker) or in a process pool started at the second chunk."""

    def __init__(
        self, workers: int, out_dir: Path, tokenizer: Tokenizer, dtype: np.dtype, eot: int
    ) -> None:
        self.workers, self.out_dir, self.dtype, self.eot = workers, out_dir, dtype, eot
        self.tokenizer = tokenizer
        self.pool: Any = None
        self.pending: deque[Future[dict[str, Any]]] = deque()
        self.held: _Chunk | None = None  # first chunk, kept until we know a pool is worth starting
        self._encode: Callable[[list[str]], list[np.ndarray]] | None = None

    def _inline(self, chunk: _Chunk) -> dict[str, Any]:
        if self._encode is None:
            self._encode = self.tokenizer.encode_to_arrays
        return _tokenize_chunk(chunk, self._encode, self.out_dir, self.dtype, self.eot)

    def submit(self, chunk: _Chunk) -> Iterator[dict[str, Any]]:
        """Queue a chunk; yield results of chunks that finished meanwhile (bounded in flight)."""
        if self.workers <= 1:
            yield self._inline(chunk)
            return
        if self.pool is None and self.held is None:
            self.held = chunk
            return
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the caller may be a training process with torch threads running.
            self.pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(str(self.out_dir), self.dtype.str, self.eot),
            )
            assert self.held is not None
            self._submit(self.held)
            self.held = None
        self._submit(chunk)
        while len(self.pending) >= 2 * self.workers:
            yield self.pending.popleft().result()

    def _submit(self, chunk: _Chunk) -> None:
        # Under spawn the pool starts its workers on demand, one per submit until it is full, so
        # any submit may start one: each is made where workers never see Ctrl+C (interrupts.py).
        assert self.pool is not None
        with workers_ignore_sigint():
            self.pending.append(self.pool.submit(_worker_run, chunk))

    def drain(self) -> Iterator[dict[str, Any]]:
        if self.held is not None:
            yield self._inline(self.held)
            self.held = None
        while self.pending:
            yield self.pending.popleft().result()

    def close(self, abort: bool = False) -> None:
        """Shut the pool down and reap its workers; `abort` stops the chunks in progress too."""
        if self.pool is None:
            return
        if abort:
            # A chunk is seconds of work: an interrupted prepare should not wait for the running
            # ones (Python 3.11 has no `terminate_workers()`). Their temporary files are removed
            # by the next run; their markers were never written, so those chunks are redone.
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None


def _progress_bar(total: int | None, enabled: bool | None) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="prepare",
        disable=True if enabled is False else (False if enabled else None),  # None: only on a TTY
    )


def prepare(
    sources: Sequence[str],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    *,
    val_sources: Sequence[str] = (),
    settings: SplitSettings | None = None,
    workers: int = 0,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> PreparedDataset:
    """Tokenize `sources` (and `val_sources`, all to val) into a prepared dataset at `out_dir`.

    Returns the opened dataset. Re-running with the same inputs returns the finished dataset, or
    finishes an interrupted one; `workers=0` means one process per CPU core. `progress=None`
    shows a bar only on a terminal.
    """
    settings = _effective(settings or SplitSettings(), val_sources)
    out_dir = Path(out_dir)
    if not sources and not val_sources:
        raise DataError("prepare needs at least one source")
    if tokenizer.eot_id is None:
        raise TokenizerError(
            f"tokenizer {tokenizer!r} has no {EOT} token to separate documents; add one"
        )
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    key = dataset_key(sources, val_sources, tokenizer.fingerprint(), settings)
    created = not out_dir.exists()
    make_dir(out_dir, DataError, "dataset directory")
    try:
        with DirectoryLock(out_dir, "prepare a dataset", wait=True, error=DataError, log=log):
            if (ds := finished_dataset(out_dir, key, log)) is not None:
                return ds
            foreign = _foreign_files(out_dir, tokenizer)
            if foreign:
                raise DataError(
                    f"'{out_dir}' holds files that `tinylm prepare` would overwrite but did not write: "
                    f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}. "
                    "Choose an empty or new output directory (--out)"
                )
            progress_dir = out_dir / PROGRESS
            settings_path = progress_dir / "settings.json"
            if settings_path.is_file() and _settings(out_dir).get("key") != key:
                _remove_partial(out_dir)  # an unfinished prepare of something else: start over
            _remove_temps(out_dir)
            done = {int(p.stem) for p in progress_dir.glob("[0-9]*.json")}
            if done:
                log(f"prepare: resuming in {out_dir}: {len(done)} chunk(s) already done")
            try:
                progress_dir.mkdir(exist_ok=True)
                # A tokenizer.json already there is the very same tokenizer (see _foreign_files):
                # kept as it is, and not removed by a clean-up.
                tokenizer_written = _settings(out_dir).get(
                    "tokenizer_written", not (out_dir / TOKENIZER).is_file()
                )
                if tokenizer_written:
                    tokenizer.save(out_dir / TOKENIZER)
                write_json(settings_path, {"key": key, "tokenizer_written": tokenizer_written})
                meta = _run(
                    sources,
                    val_sources,
                    out_dir,
                    tokenizer,
                    dtype,
                    settings,
                    workers,
                    done,
                    progress,
                    log,
                )
                meta["key"] = key
                write_json(out_dir / META, meta)  # last: from now on the directory is a dataset
            except (DataError, TokenizerError):
                _remove_partial(out_dir)  # bad input: nothing half-made of ours is left behind
                raise
            except KeyboardInterrupt as e:
                kept = len(list(progress_dir.glob("[0-9]*.json")))
                log(
                    f"prepare: interrupted ({signal_name(e)}): {kept} finished chunk(s) are kept in "
                    f"'{out_dir}'; run the same command again to continue"
                )
                raise
            except OSError as e:
                # Disk full, permission lost, read-only: finished chunks are intact (written
                # atomically), the failed write left nothing behind.
                raise DataError(
                    os_error_message(e, out_dir, "write the prepared dataset into")
                    + "; the chunks finished so far are kept, so the same command continues from them"
                ) from None
            except Exception as e:
                from concurrent.futures.process import BrokenProcessPool

                if isinstance(e, BrokenProcessPool):
                    raise DataError(
                        f"a tokenizer worker process died (killed, or out of memory?) while preparing '{out_dir}'; "
                        "finished chunks are kept: run the same command again to continue"
                    ) from None
                raise
            shutil.rmtree(progress_dir, ignore_errors=True)
    finally:
        if created:  # a directory we made and left empty (bad input) goes too
            with contextlib.suppress(OSError):
                out_dir.rmdir()
    return PreparedDataset.open(out_dir)


def finished_dataset(out_dir: Path, key: str, log: Callable[[str], None]) -> PreparedDataset | None:
    """The dataset already prepared at `out_dir` from the same inputs (`key`), or None if none is."""
    if not (out_dir / META).is_file():
        return None
    ds = PreparedDataset.open(out_dir)
    if ds.meta.get("key") != key:
        raise DataError(
            f"'{out_dir}' already holds a prepared dataset made from other sources, tokenizer or "
            "settings; choose another output directory or delete that one"
        )
    for note in ds.notes():
        log(f"prepare: {note}")
    return ds


def _run(
    sources: Sequence[str],
    val_sources: Sequence[str],
    out_dir: Path,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    settings: SplitSettings,
    workers: int,
    done: set[int],
    progress: bool | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    workers = workers or os.cpu_count() or 1
    stats = SourceStats()
    totals = [source_bytes(s) for s in [*sources, *val_sources]]
    bar = _progress_bar(None if None in totals else sum(t or 0 for t in totals), progress)
    to_val = _val_chooser(sources, settings, log) if not val_sources else (lambda i: False)
    results: dict[int, dict[str, Any]] = {}
    dispatcher = _Dispatcher(workers, out_dir, tokenizer, dtype, int(tokenizer.eot_id or 0))
    start = time.perf_counter()

    def finished(result: dict[str, Any]) -> None:
        results[result["chunk"]] = result
        bar.update(result["bytes"])

    aborted = True
    try:
        for chunk in _iter_chunks(sources, val_sources, settings, to_val, stats):
            if chunk.index in done and (marker := _read_marker(out_dir, chunk, dtype)):
                finished(marker)
                continue
            for result in dispatcher.submit(chunk):
                finished(result)
        for result in dispatcher.drain():
            finished(result)
        aborted = False
    finally:
        dispatcher.close(abort=aborted)
        bar.close()
    seconds = time.perf_counter() - start
    meta = _assemble_meta(results, sources, val_sources, tokenizer, dtype, settings)
    meta["stats"] = {
        "source_bytes": stats.bytes_read,
        "chars": sum(r["chars"] for r in results.values()),
        "invalid_utf8": stats.invalid_utf8,
        "invalid_utf8_files": dict(list(stats.invalid_files.items())[:3]),
        "seconds": round(seconds, 3),
        "mb_per_s": round(stats.bytes_read / 1e6 / max(seconds, 1e-9), 2),
        "workers": workers,
    }
    if note := invalid_utf8_note(meta["stats"]):
        log(f"prepare: {note}")
    return meta


def _assemble_meta(
    results: dict[int, dict[str, Any]],
    sources: Sequence[str],
    val_sources: Sequence[str],
    tokenizer: Tokenizer,
    dtype: np.dtype,
    settings: SplitSettings,
) -> dict[str, Any]:
    ranges: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    for index in sorted(results):
        for split, info in results[index]["splits"].items():
            ranges[split].append({"file": info["file"], "start": 0, "tokens": info["tokens"]})
            docs[split] += info["documents"]
    return assemble_meta(ranges, docs, sources, val_sources, tokenizer, dtype, settings)


def assemble_meta(
    ranges: dict[str, list[dict[str, Any]]],
    docs: dict[str, int],
    sources: Sequence[str],
    val_sources: Sequence[str],
    tokenizer: Tokenizer,
    dtype: np.dtype,
    settings: SplitSettings,
    *,
    split_by_tokens: bool = False,
) -> dict[str, Any]:
    """`meta.json` for per-split shard ranges; with no val documents, val is the train tokens' end.

    `split_by_tokens`: the source is token streams (read in place), never split by document.
    """
    split_meta: dict[str, Any] = {
        "mode": "source" if val_sources else "documents",
        "val_fraction": settings.val_fraction,
        "val_count": settings.val_count,
        "seed": settings.split_seed,
    }
    wants_val = settings.val_fraction > 0 or settings.val_count > 0
    if not val_sources and wants_val and not ranges["val"]:
        # Too few documents for a document-level split (e.g. one book): hold out the end instead.
        n_train = sum(r["tokens"] for r in ranges["train"])
        fraction = settings.val_fraction or 0.1
        n_val = max(1, round(n_train * fraction))
        ranges["train"], ranges["val"] = _split_ranges(ranges["train"], n_train - n_val)
        docs["val"] = 1
        split_meta["mode"] = "tokens"
        split_meta["note"] = (
            f"the source has {docs['train']} document(s), too few for a document-level split: "
            f"val is the last {fraction:.1%} of the tokens ({n_val:,}); the document it cuts is in both counts"
            if not split_by_tokens
            else f"val is the last {fraction:.1%} of the token stream ({n_val:,} tokens)"
        )
    splits = {
        name: {"tokens": sum(r["tokens"] for r in rs), "documents": docs[name], "shards": rs}
        for name, rs in ranges.items()
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {
            "type": tokenizer.kind,
            "fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
        },
        "dtype": dtype.name,
        "splits": splits,
        "split": split_meta,
        "sources": list(sources),
        "val_sources": list(val_sources),
        "text_field": settings.text_field,
        "delimiter": settings.delimiter,
    }
