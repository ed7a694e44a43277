"""Train a byte-level BPE tokenizer: parallel streaming pre-tokenization, then incremental merges.

The algorithm is the standard one (GPT-2 / CS336 convention):

1. Initial vocabulary: the 256 byte values (ids 0..255), then the special tokens, then one token
   per merge, in order.
2. Text is split on the special tokens (never merged or split), then pre-tokenized with the
   GPT-2 regex; merges never cross pre-token boundaries. Only the pre-token *counts* are kept
   (a word-frequency table), so memory is bounded by the number of distinct pre-tokens.
3. Each step merges the most frequent adjacent pair; ties go to the lexicographically greatest
   pair of byte strings. Pair counts are updated incrementally, touching only the words that
   contain the merged pair, and the best pair comes from a max-heap with lazy invalidation.

Step 3 runs in the C++ extension `_bpe_native` when it is built; `_merge_python` is the
pure-Python fallback with identical results (tests check both agree).
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from tinylm.interrupts import exit_with_parent, workers_ignore_sigint
from tinylm.tokenizer.base import TokenizerError
from tinylm.tokenizer.bpe import BPETokenizer
from tinylm.tokenizer.pretokenize import GPT2_PATTERN, last_safe_cut

# Chunks handed to one worker. ~1 MB keeps both cores busy on a 5 MB corpus and bounds the
# memory of one in-flight chunk; the per-chunk Counter pickling overhead is small at this size.
CHUNK_BYTES = 1 << 20
# Below this much input, starting worker processes costs more than it saves. Measured on the
# 5 MB plays: forking 2 workers and merging their tables adds ~0.15 s, while one process
# pre-tokenizes at ~45 MB/s natively and ~6 MB/s with the `regex` module.
PARALLEL_MIN_BYTES = {True: 16 << 20, False: 2 << 20}  # by native
# Chunks are sent to workers in groups of at least this many bytes (see `_groups`).
GROUP_BYTES = 512 << 10


@dataclass
class BPETrainResult:
    """What training produced: vocabulary (id -> bytes), merges in order, and where time went."""

    vocab: dict[int, bytes]
    merges: list[tuple[bytes, bytes]]
    special_tokens: list[str]
    pattern: str = GPT2_PATTERN
    timings: dict[str, float] = field(default_factory=dict)
    num_words: int = 0  # distinct pre-tokens
    engine: str = ""  # "native" or "python"

    def tokenizer(self) -> BPETokenizer:
        """The trained `BPETokenizer`."""
        specials = {s: 256 + i for i, s in enumerate(self.special_tokens)}
        return BPETokenizer(self.vocab, self.merges, specials, pattern=self.pattern)


# -- pre-tokenization --------------------------------------------------------------------------


def _special_splitter(special_tokens: Sequence[str]) -> re.Pattern | None:
    """A regex that splits on special tokens, longest first (alternation is leftmost-first)."""
    if not special_tokens:
        return None
    ordered = sorted(set(special_tokens), key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in ordered))


def _ascii_classes() -> bytes:
    """Class of each ASCII character (0 letter, 1 number, 2 whitespace, 3 other) per `regex`,
    so that the native pre-tokenizer classifies exactly as the GPT-2 pattern does."""
    import regex

    letter, number, space = (regex.compile(p) for p in (r"\p{L}", r"\p{N}", r"\s"))
    return bytes(
        0 if letter.match(c) else 1 if number.match(c) else 2 if space.match(c) else 3
        for c in map(chr, range(128))
    )


def _count_text(text: str, counts: Counter) -> None:
    """Add the pre-token (bytes) counts of `text` (special tokens already allowed in it)."""
    state = _WORKER_STATE
    splitter, pattern, native = state["splitter"], state["pattern"], state["native"]
    pieces = splitter.split(text) if splitter is not None else [text]
    str_counts: Counter = Counter()
    for piece in pieces:
        if not piece:
            continue
        if native is None:
            str_counts.update(pattern.findall(piece))
            continue
        # ASCII stretches are pre-tokenized and counted in C++ (collected by `_take_counts`);
        # stretches with other characters come back for the regex.
        for segment in native.count_pretokens(piece, state["classes"]):
            str_counts.update(pattern.findall(segment))
    for word, n in str_counts.items():
        counts[word.encode("utf-8")] += n


_WORKER_STATE: dict = {}


def _worker_init(special_tokens: Sequence[str], pattern: str, native: bool) -> None:
    import regex

    exit_with_parent()  # a SIGKILLed parent must not leave its workers behind
    _WORKER_STATE["splitter"] = _special_splitter(special_tokens)
    _WORKER_STATE["pattern"] = regex.compile(pattern)
    _WORKER_STATE["native"] = None
    if native and pattern == GPT2_PATTERN:  # the C++ pre-tokenizer knows only the GPT-2 pattern
        from tinylm.tokenizer import _bpe_native

        _WORKER_STATE["native"] = _bpe_native
        _WORKER_STATE["classes"] = _ascii_classes()


def _decode(data: bytes, where: str, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(
            f"{where}: byte {offset + e.start} is not valid UTF-8 ({data[e.start : e.start + 4]!r}); "
            "BPE training reads UTF-8 text: convert the file first (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


Task = tuple[str, int, int] | str  # a (path, start, end) byte range of a file, or a document


def _task_text(task: Task) -> str:
    if isinstance(task, str):
        return task
    path, start, end = task
    with open(path, "rb") as f:
        f.seek(start)
        return _decode(f.read(end - start), path, start)


def _task_bytes(task: Task) -> int:
    return len(task) if isinstance(task, str) else task[2] - task[1]


def _take_counts(counts: Counter) -> Counter:
    """`counts` plus what the native pre-tokenizer has counted in this process (then cleared)."""
    native = _WORKER_STATE["native"]
    if native is None:
        return counts
    table = Counter(native.take_pretoken_counts())  # the big part: merge the small one into it
    for word, n in counts.items():
        table[word] += n
    return table


def _count_group(tasks: list[Task]) -> tuple[Counter, int]:
    """Pre-token (bytes) counts of a group of chunks, and their size in bytes (for progress)."""
    counts: Counter = Counter()
    for task in tasks:
        _count_text(_task_text(task), counts)
    return _take_counts(counts), sum(map(_task_bytes, tasks))


def _groups(tasks: Iterable[Task], target_bytes: int) -> Iterator[list[Task]]:
    """Batch small chunks (one per short file or document) so each worker result is sizeable:
    returning and merging one counts table per 100 kB play cost more than counting it."""
    group: list[Task] = []
    size = 0
    for task in tasks:
        group.append(task)
        size += _task_bytes(task)
        if size >= target_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def file_chunks(
    path: str | Path, special_tokens: Sequence[str] = (), chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[str, int, int]]:
    """Split a file into (path, start, end) byte ranges whose pre-tokens do not cross the cuts.

    Cuts go just before a special token when one is near the target size (so documents stay
    whole), else between a visible ASCII character and whitespace. The file is read one
    window at a time, never whole.
    """
    path = str(path)
    size = os.path.getsize(path)
    specials = [s.encode("utf-8") for s in special_tokens]
    # A whitespace cut could fall inside such a special token, so then only cut at specials.
    space_in_special = any(c in s for s in specials for c in b" \t\n")
    start = 0
    with open(path, "rb") as f:
        while start < size:
            if size - start <= chunk_bytes * 3 // 2:
                yield path, start, size
                return
            f.seek(start)
            window = f.read(chunk_bytes)
            lo = chunk_bytes // 2  # never make a chunk smaller than half the target
            cut = max((window.rfind(s, lo) for s in specials), default=-1)
            if cut <= 0 and not space_in_special:
                cut = last_safe_cut(window, lo)
            if cut <= 0:  # no boundary in this window: retry with a window twice as large
                chunk_bytes *= 2
                continue
            yield path, start, start + cut
            start += cut


def _mp_context():
    # fork starts a worker in milliseconds; spawn re-imports everything (~0.3 s per worker).
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return mp.get_context(method)


def count_pretokens(
    inputs: Sequence[str | Path] = (),
    texts: Iterable[str] | None = None,
    special_tokens: Sequence[str] = (),
    pattern: str = GPT2_PATTERN,
    num_workers: int | None = None,
    progress: bool = False,
    native: bool | None = None,
) -> Counter:
    """Pre-token (bytes) -> count over files (streamed in chunks) and/or in-memory documents.

    `native=None` uses the C++ ASCII pre-tokenizer when built; False forces the `regex` module.
    """
    if native is None:
        native = native_available()
    for p in inputs:
        if not Path(p).is_file():
            raise TokenizerError(f"training input '{p}' is not a file")
    total = sum(os.path.getsize(p) for p in inputs)
    tasks: Iterable = (c for p in inputs for c in file_chunks(p, special_tokens))
    if texts is not None:
        tasks = _chain(tasks, texts)
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    bar = _progress_bar(total, "pre-tokenize", progress)
    if workers <= 1 or (texts is None and total < PARALLEL_MIN_BYTES[bool(native)]):
        _worker_init(special_tokens, pattern, native)
        counts: Counter = Counter()
        for task in tasks:
            _count_text(_task_text(task), counts)
            if bar is not None:
                bar.update(_task_bytes(task))
        counts = _take_counts(counts)
    else:
        counts = Counter()
        # ~4 groups per worker: enough to balance the load, few enough that merging the
        # returned tables (a Python loop over ~30k words each) stays small next to counting.
        group_bytes = max(GROUP_BYTES, total // (workers * 4))
        ctx = _mp_context()
        with workers_ignore_sigint():  # Ctrl+C is the parent's to handle (tinylm/interrupts.py)
            pool = ctx.Pool(
                workers, initializer=_worker_init, initargs=(list(special_tokens), pattern, native)
            )
        with pool:
            for group_counts, size in pool.imap_unordered(
                _count_group, _groups(tasks, group_bytes)
            ):
                if counts:
                    counts.update(group_counts)
                else:
                    counts = group_counts
                if bar is not None:
                    bar.update(size)
    if bar is not None:
        bar.close()
    return counts


def _chain(a: Iterable, b: Iterable) -> Iterator:
    yield from a
    yield from b


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total or None, desc=desc, unit="B", unit_scale=True, leave=False)


# -- merges ------------------------------------------------------------------------------------


class _Desc:
    """Wraps bytes so that heapq (a min-heap) pops the lexicographically greatest first."""

    __slots__ = ("b",)

    def __init__(self, b: bytes) -> None:
        self.b = b

    def __lt__(self, other: _Desc) -> bool:
        return self.b > other.b

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.b == other.b

    __hash__ = None  # type: ignore[assignment]


def _merge_python(
    words: Sequence[bytes],
    counts: Sequence[int],
    first_new_id: int,
    num_merges: int,
    callback: Callable[[int], None] | None = None,
) -> list[tuple[int, int]]:
    """Pure-Python merge loop; same algorithm and results as `_bpe_native.train_merges`."""
    tok: list[bytes] = [bytes([i]) for i in range(256)] + [b""] * (first_new_id - 256)
    seqs = [list(w) for w in words]
    pair_count: dict[tuple[int, int], int] = {}
    pair_words: dict[tuple[int, int], list[int]] = {}
    for wi, (seq, n) in enumerate(zip(seqs, counts, strict=True)):
        for p in pairwise(seq):
            pair_count[p] = pair_count.get(p, 0) + n
            ws = pair_words.setdefault(p, [])
            if not ws or ws[-1] != wi:
                ws.append(wi)

    def entry(p: tuple[int, int], c: int):
        return (-c, _Desc(tok[p[0]]), _Desc(tok[p[1]]), p)

    heap = [entry(p, c) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges:
        while heap and pair_count.get(heap[0][3]) != -heap[0][0]:
            heapq.heappop(heap)  # stale entry: the count changed since it was pushed
        if not heap:
            break
        best = heapq.heappop(heap)[3]
        a, b = best
        new_id = len(tok)
        tok.append(tok[a] + tok[b])
        merges.append(best)
        del pair_count[best]
        # Only pairs at merge sites change; net them over all words, then touch the heap once
        # per changed pair (as the C++ loop does).
        changes: dict[tuple[int, int], int] = {}
        for wi in pair_words.pop(best):
            seq, n = seqs[wi], counts[wi]
            out: list[int] = []
            i, length, last_site_end = 0, len(seq), 0
            while i < length:
                if seq[i] == a and i + 1 < length and seq[i + 1] == b:
                    if i > 0 and last_site_end != i:  # else counted as the previous site's right
                        p = (seq[i - 1], a)
                        changes[p] = changes.get(p, 0) - n
                    if i + 2 < length:
                        p = (b, seq[i + 2])
                        changes[p] = changes.get(p, 0) - n
                    out.append(new_id)
                    i += 2
                    last_site_end = i
                else:
                    out.append(seq[i])
                    i += 1
            if len(out) == length:
                continue  # a stale listing: an earlier merge removed the pair here
            for p in pairwise(out):
                if new_id in p:
                    changes[p] = changes.get(p, 0) + n
                    ws = pair_words.setdefault(p, [])
                    if not ws or ws[-1] != wi:
                        ws.append(wi)
            seqs[wi] = out
        for p, d in changes.items():
            if d == 0 or p == best:  # best's overlapping occurrences went with its count
                continue
            c = pair_count.get(p, 0) + d
            if c:
                pair_count[p] = c
                heapq.heappush(heap, entry(p, c))
            else:
                del pair_count[p]
        if callback is not None and len(merges) % 1000 == 0:
            callback(len(merges))
    return merges


def native_available() -> bool:
    """Whether the C++ merge loop was built (`pip install -e .` with a C++ compiler)."""
    try:
        from tinylm.tokenizer import _bpe_native  # noqa: F401
    except ImportError:
        return False
    return True


def merge_words(
    words: Sequence[bytes],
    counts: Sequence[int],
    first_new_id: int,
    num_merges: int,
    native: bool | None = None,
    callback: Callable[[int], None] | None = None,
) -> tuple[list[tuple[int, int]], str]:
    """Run the merge loop; returns merges as (left id, right id) and which engine ran it.

    `native=None` uses the C++ loop when built, else Python; True requires it; False forces Python.
    """
    if native is None:
        native = native_available()
    if native:
        try:
            from tinylm.tokenizer import _bpe_native
        except ImportError:
            raise TokenizerError(
                "the native BPE merge loop is not built: run `pip install -e .` with a C++ compiler "
                "(g++), or pass native=False for the pure-Python loop"
            ) from None
        return _bpe_native.train_merges(
            list(words), list(counts), first_new_id, num_merges, callback
        ), "native"
    return _merge_python(words, counts, first_new_id, num_merges, callback), "python"


# -- entry point -------------------------------------------------------------------------------


def train_bpe(
    inputs: Sequence[str | Path] = (),
    vocab_size: int = 8192,
    special_tokens: Sequence[str] = (),
    *,
    texts: Iterable[str] | None = None,
    pattern: str = GPT2_PATTERN,
    num_workers: int | None = None,
    native: bool | None = None,
    progress: bool = False,
) -> BPETrainResult:
    """Train byte-level BPE on files (`inputs`, streamed) and/or in-memory documents (`texts`).

    Returns the vocabulary (256 bytes, then `special_tokens`, then merges) and the merges.
    Stops early, with fewer merges, if the corpus runs out of pairs before `vocab_size`.
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    if any(not s for s in special_tokens):
        raise TokenizerError("special tokens must be non-empty strings")
    min_size = 256 + len(special_tokens)
    if vocab_size < min_size:
        raise TokenizerError(
            f"vocab size {vocab_size} is too small: byte-level BPE needs at least 256 byte tokens + "
            f"{len(special_tokens)} special token(s) = {min_size}; choose --vocab-size >= {min_size}"
        )
    if not inputs and texts is None:
        raise TokenizerError("nothing to train on: give input files or texts")
    t0 = time.perf_counter()
    word_counts = count_pretokens(
        inputs, texts, special_tokens, pattern, num_workers, progress, native
    )
    if not word_counts:
        where = ", ".join(str(p) for p in inputs) or "the given texts"
        raise TokenizerError(
            f"cannot train BPE on an empty corpus: {where} contain(s) no text outside special tokens"
        )
    words = list(word_counts)
    counts = list(word_counts.values())
    del word_counts
    t1 = time.perf_counter()
    num_merges = vocab_size - min_size
    bar = None
    if progress and num_merges >= 2000:
        from tqdm import tqdm

        bar = tqdm(total=num_merges, desc="merges", leave=False)
    callback = (lambda n: bar.update(n - bar.n)) if bar is not None else None
    id_merges, engine = merge_words(words, counts, min_size, num_merges, native, callback)
    if bar is not None:
        bar.close()
    t2 = time.perf_counter()

    vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
    for i, s in enumerate(special_tokens):
        vocab[256 + i] = s.encode("utf-8")
    merges: list[tuple[bytes, bytes]] = []
    for k, (a, b) in enumerate(id_merges):
        merges.append((vocab[a], vocab[b]))
        vocab[min_size + k] = vocab[a] + vocab[b]
    return BPETrainResult(
        vocab=vocab,
        merges=merges,
        special_tokens=special_tokens,
        pattern=pattern,
        timings={"pretokenize_s": t1 - t0, "merge_s": t2 - t1, "total_s": t2 - t0},
        num_words=len(words),
        engine=engine,
    )
