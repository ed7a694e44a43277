"""Byte-level BPE tokenizer on tiktoken's native engine; GPT-2 loading; HF and GPT-2 file import/export.

One class, `BPETokenizer(vocab, merges, special_tokens, pattern)`, serves our trained tokenizers,
GPT-2, and imported Hugging Face tokenizers. Ids are the tiktoken ranks: a merged token's id must
grow with its merge's position, which holds for every standard BPE vocabulary (GPT-2: id = 256 +
merge index; ours: 256 + number of specials + merge index).

Files store bytes in GPT-2's byte-to-unicode form (every byte maps to one printable character),
which is lossless, readable, and what `vocab.json`/`merges.txt`/`tokenizer.json` use.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tinylm.fileio import atomic_write_text
from tinylm.interrupts import exit_with_parent, workers_ignore_sigint
from tinylm.tokenizer.base import (
    EOT,
    Tokenizer,
    TokenizerError,
    check_fields,
    check_special_tokens,
)
from tinylm.tokenizer.pretokenize import GPT2_PATTERN, last_safe_cut

BYTE_ENCODING = "gpt2-unicode"


@functools.lru_cache(maxsize=1)
def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (openai/gpt-2 encoder.py)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in gpt2_bytes_to_unicode().items()}


def bytes_to_gpt2_str(b: bytes) -> str:
    """bytes -> GPT-2 unicode form (lossless)."""
    table = gpt2_bytes_to_unicode()
    return "".join(table[x] for x in b)


def gpt2_str_to_bytes(s: str, where: str = "token") -> bytes:
    """GPT-2 unicode form -> bytes; a character outside the table is a TokenizerError."""
    table = _unicode_to_bytes()
    try:
        return bytes(table[c] for c in s)
    except KeyError as e:
        raise TokenizerError(
            f"{where} {s!r}: character {e.args[0]!r} is not in GPT-2's byte-to-unicode table, "
            "so this is not a byte-level BPE vocabulary"
        ) from None


class BPETokenizer(Tokenizer):
    """Byte-level BPE: `vocab` id -> bytes, `merges` in order, `special_tokens` str -> id.

    Encoding runs in tiktoken (Rust) with our ranks; special tokens are split off first,
    longest first, so `<|endoftext|><|endoftext|>` can be a token beside `<|endoftext|>`.
    """

    kind = "bpe"

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
        name: str = "tinylm-bpe",
    ) -> None:
        special_tokens = dict(special_tokens or {})
        n = len(vocab)
        if sorted(vocab) != list(range(n)):
            raise TokenizerError("BPE vocab ids must be exactly 0..N-1 with no gaps")
        for s, i in special_tokens.items():
            if not s:
                raise TokenizerError("special tokens must be non-empty strings")
            if not 0 <= i < n or vocab[i] != s.encode("utf-8"):
                raise TokenizerError(
                    f"special token {s!r} has id {i}, but the vocab does not hold it there"
                )
        self.vocab = dict(vocab)
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self.pattern = pattern
        self.name = name
        self._specials = dict(sorted(special_tokens.items(), key=lambda kv: kv[1]))
        special_ids = set(self._specials.values())

        # tiktoken ranks: bytes -> id for ordinary tokens. If two merges produced the same bytes,
        # the lower id wins (tiktoken merges by resulting bytes; the other id is never produced).
        ranks: dict[bytes, int] = {}
        for i in range(n):
            if i not in special_ids:
                ranks.setdefault(self.vocab[i], i)
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(
                f"BPE vocab lacks {len(missing)} of the 256 single bytes (e.g. {bytes([missing[0]])!r}); "
                "a byte-level vocabulary must contain every byte"
            )
        last = -1
        made: set[bytes] = set()
        for k, (a, b) in enumerate(self.merges):
            rank = ranks.get(a + b)
            if a not in ranks or b not in ranks or rank is None:
                raise TokenizerError(
                    f"merge {k} ({a!r}, {b!r}) uses or makes a token missing from the vocab"
                )
            if a + b in made:  # a second merge making the same bytes: it keeps the first rank
                continue
            made.add(a + b)
            if rank <= last:
                raise TokenizerError(
                    f"merge {k} ({a!r}, {b!r}) makes token id {rank}, not above the previous merge's "
                    f"id {last}: ids of merged tokens must follow the merge order"
                )
            last = max(last, rank)
        self._ranks = ranks
        self._enc = _tiktoken_encoding(name, pattern, ranks, self._specials)
        self._special_re = (
            re.compile(
                "|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True))
            )
            if self._specials
            else None
        )
        self._decode_table = [self.vocab[i] for i in range(n)]

    # -- Tokenizer interface ---------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def encode(self, text: str) -> list[int]:
        if self._special_re is None:
            return self._enc.encode_ordinary(text)
        out: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.extend(self._enc.encode_ordinary(text[pos : m.start()]))
            out.append(self._specials[m.group()])
            pos = m.end()
        if pos < len(text):
            out.extend(self._enc.encode_ordinary(text[pos:]))
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating special-token strings as plain text."""
        return self._enc.encode_ordinary(text)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for; ids out of range become U+FFFD's bytes."""
        table = self._decode_table
        n = len(table)
        return b"".join(table[i] if 0 <= i < n else b"\xef\xbf\xbd" for i in map(int, ids))

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str], num_workers: int | None = None) -> list[list[int]]:
        """Encode many texts in threads (tiktoken releases the GIL while it encodes)."""
        if num_workers is None or num_workers <= 1 or len(texts) <= 1:
            return [self.encode(t) for t in texts]
        with ThreadPoolExecutor(num_workers) as pool:
            return list(pool.map(self.encode, texts))

    def encode_iterable(self, texts: Iterable[str]) -> Iterator[int]:
        """Yield the ids of the concatenated texts lazily; equal to `encode("".join(texts))`.

        Text is buffered only up to a cut where encoding the two sides separately changes
        nothing (between a visible ASCII character and a space, tab or newline), so memory
        stays bounded for any input that has such places now and then.
        """
        parts: list[str] = []  # joined only when large: repeated `buf += line` would be quadratic
        size = 0
        for text in texts:
            parts.append(text)
            size += len(text)
            if size < _STREAM_BUFFER_CHARS:
                continue
            buf = "".join(parts)
            cut = self._safe_cut(buf)
            if cut > 0:
                yield from self.encode(buf[:cut])
                buf = buf[cut:]
            parts, size = [buf], len(buf)
        buf = "".join(parts)
        if buf:
            yield from self.encode(buf)

    def _safe_cut(self, buf: str) -> int:
        """The last position where `buf` can be split without changing its encoding, or 0."""
        longest = max((len(s) for s in self._specials), default=0)
        limit = len(buf) - max(longest, 2)  # a special or a lookahead could still straddle later
        if limit <= 0:
            return 0
        cut = last_safe_cut(buf, max(0, limit - _STREAM_BUFFER_CHARS), limit)
        if cut <= 0:
            return 0
        if self._special_re is not None:
            # never cut inside a special token: move the cut to that token's start
            for m in self._special_re.finditer(buf, max(0, cut - longest), cut + longest):
                if m.start() < cut < m.end():
                    return m.start()
        return cut

    def token_bytes(self) -> np.ndarray:
        special_ids = set(self._specials.values())
        return np.asarray(
            [0 if i in special_ids else len(b) for i, b in enumerate(self._decode_table)],
            dtype=np.int32,
        )

    # -- our file format -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "byte_encoding": BYTE_ENCODING,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab": [bytes_to_gpt2_str(self._decode_table[i]) for i in range(self.vocab_size)],
            "merges": [f"{bytes_to_gpt2_str(a)} {bytes_to_gpt2_str(b)}" for a, b in self.merges],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        check_fields(
            d, {"vocab": list, "merges": list, "special_tokens": dict, "pattern": str}, "BPE"
        )
        if d.get("byte_encoding", BYTE_ENCODING) != BYTE_ENCODING:
            raise TokenizerError(
                f"unknown byte_encoding {d['byte_encoding']!r} (expected {BYTE_ENCODING!r})"
            )
        specials = check_special_tokens(d["special_tokens"], "BPE")
        for k, t in enumerate(d["vocab"]):
            if not isinstance(t, str):
                raise TokenizerError(f"BPE tokenizer file: vocab entry {k} is {t!r}, not a string")
        for k, m in enumerate(d["merges"]):
            if not (
                isinstance(m, str) or (isinstance(m, list) and all(isinstance(x, str) for x in m))
            ):
                raise TokenizerError(
                    f'BPE tokenizer file: merge {k} is {m!r}, not "a b" or [a, b] strings'
                )
        by_id = {i: s for s, i in specials.items()}
        vocab = {
            i: by_id[i].encode("utf-8") if i in by_id else gpt2_str_to_bytes(t, f"vocab entry {i}")
            for i, t in enumerate(d["vocab"])
        }
        return cls(vocab, _parse_merges(d["merges"]), specials, pattern=d["pattern"])

    def __reduce__(self):
        # tiktoken's Encoding is rebuilt in the receiving process (worker processes for data prep)
        return (_rebuild, (self.vocab, self.merges, self._specials, self.pattern, self.name))

    # -- other formats ---------------------------------------------------------------------

    def save_gpt2(self, vocab_path: str | Path, merges_path: str | Path) -> None:
        """Write GPT-2-style `vocab.json` (token -> id) and `merges.txt`."""
        special_ids = set(self._specials.values())
        vocab = {
            (s if i in special_ids else bytes_to_gpt2_str(b)): i
            for i, b in enumerate(self._decode_table)
            for s in [b.decode("utf-8", "replace")]
        }
        atomic_write_text(vocab_path, json.dumps(vocab, ensure_ascii=False))
        lines = ["#version: 0.2"] + [
            f"{bytes_to_gpt2_str(a)} {bytes_to_gpt2_str(b)}" for a, b in self.merges
        ]
        atomic_write_text(merges_path, "\n".join(lines) + "\n")

    def to_hf_json(self) -> dict[str, Any]:
        """A Hugging Face `tokenizer.json` (BPE model, byte-level) encoding exactly like this one."""
        special_ids = set(self._specials.values())
        if self.pattern == GPT2_PATTERN:
            pre = {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            }
        else:
            pre = {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": {"Regex": self.pattern},
                        "behavior": "Isolated",
                        "invert": False,
                    },
                    {
                        "type": "ByteLevel",
                        "add_prefix_space": False,
                        "trim_offsets": True,
                        "use_regex": False,
                    },
                ],
            }
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {
                    "id": i,
                    "content": s,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
                for s, i in self._specials.items()
            ],
            "normalizer": None,
            "pre_tokenizer": pre,
            "post_processor": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": False,
                "use_regex": False,
            },
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": {
                    (s if i in special_ids else bytes_to_gpt2_str(b)): i
                    for i, b in enumerate(self._decode_table)
                    for s in [b.decode("utf-8", "replace")]
                },
                "merges": [
                    f"{bytes_to_gpt2_str(a)} {bytes_to_gpt2_str(b)}" for a, b in self.merges
                ],
            },
        }

    def save_hf(self, path: str | Path) -> Path:
        """Write a Hugging Face `tokenizer.json`."""
        return atomic_write_text(path, json.dumps(self.to_hf_json(), ensure_ascii=False, indent=1))


# -- construction helpers --------------------------------------------------------------------

_STREAM_BUFFER_CHARS = 1 << 16


def _rebuild(vocab, merges, specials, pattern, name) -> BPETokenizer:
    return BPETokenizer(vocab, merges, specials, pattern=pattern, name=name)


def _tiktoken_encoding(name: str, pattern: str, ranks: dict[bytes, int], specials: dict[str, int]):
    import tiktoken

    try:
        return tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )
    except BaseException as e:  # tiktoken raises a Rust panic (a BaseException) on a bad regex
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        raise TokenizerError(
            f"tiktoken rejected this tokenizer (pattern {pattern!r}): {e}"
        ) from None


def _parse_merges(items: Iterable[Any]) -> list[tuple[bytes, bytes]]:
    """Merges as "a b" strings (merges.txt, older tokenizer.json) or [a, b] lists (newer)."""
    out = []
    for k, m in enumerate(items):
        parts = m.split(" ") if isinstance(m, str) else list(m)
        if len(parts) != 2:
            raise TokenizerError(f"merge {k} {m!r}: expected two tokens separated by one space")
        out.append(
            (gpt2_str_to_bytes(parts[0], f"merge {k}"), gpt2_str_to_bytes(parts[1], f"merge {k}"))
        )
    return out


def from_gpt2_files(
    vocab_path: str | Path,
    merges_path: str | Path,
    special_tokens: Sequence[str] = (EOT,),
    name: str = "gpt2",
) -> BPETokenizer:
    """Load GPT-2-style `vocab.json` (token -> id, GPT-2 unicode form) and `merges.txt`."""
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise TokenizerError(f"GPT-2 tokenizer file '{p}' not found")
    try:
        raw = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{vocab_path}: not a vocab JSON file ({e})") from None
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merge_items = [ln for ln in lines if ln and not ln.startswith("#version")]
    return _from_token_map(raw, _parse_merges(merge_items), special_tokens, name, str(vocab_path))


def _from_token_map(
    raw: dict[str, int],
    merges: list[tuple[bytes, bytes]],
    special_tokens: Iterable[str],
    name: str,
    where: str,
    pattern: str = GPT2_PATTERN,
) -> BPETokenizer:
    """Build from a token (GPT-2 unicode form) -> id map, as in vocab.json and tokenizer.json."""
    specials = {s: raw[s] for s in special_tokens if s in raw}
    vocab = {
        int(i): (t.encode("utf-8") if t in specials else gpt2_str_to_bytes(t, f"{where}: token"))
        for t, i in raw.items()
    }
    return BPETokenizer(vocab, merges, specials, pattern=pattern, name=name)


def from_hf_json(path: str | Path) -> BPETokenizer:
    """Import a Hugging Face byte-level BPE `tokenizer.json` (GPT-2, RoBERTa, our exports, ...)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        model = d["model"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e!r})") from None
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"{path}: model type {model.get('type')!r}; only byte-level BPE can be imported"
        )
    pattern = _hf_pattern(d.get("pre_tokenizer"), path)
    specials = [t["content"] for t in d.get("added_tokens", [])]
    return _from_token_map(
        model["vocab"], _parse_merges(model["merges"]), specials, path.stem, str(path), pattern
    )


def _hf_pattern(pre: dict | None, path: Path) -> str:
    if (
        pre
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space")
    ):
        return GPT2_PATTERN
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and "Regex" in parts[0].get("pattern", {})
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
        ):
            return parts[0]["pattern"]["Regex"]
    raise TokenizerError(
        f"{path}: unsupported pre-tokenizer {json.dumps(pre)[:200]}; tinylm imports byte-level BPE with "
        "the GPT-2 ByteLevel pre-tokenizer (add_prefix_space=false) or Split(regex) + ByteLevel"
    )


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list from tiktoken ranks: BPE-encode each token with the lower ranks."""
    merges = []
    for token, _rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(
                range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 62)
            )
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        merges.append((parts[0], parts[1]))
    return merges


@functools.lru_cache(maxsize=4)
def gpt2_tokenizer(vocab_path: str | None = None, merges_path: str | None = None) -> BPETokenizer:
    """GPT-2's tokenizer: from the given files, else `gpt2_vocab.json`/`gpt2_merges.txt` in the
    shared data or cache directory, else tiktoken's download of "gpt2" (needs internet)."""
    if vocab_path or merges_path:
        if not (vocab_path and merges_path):
            raise TokenizerError("give both the GPT-2 vocab.json and merges.txt paths")
        return from_gpt2_files(vocab_path, merges_path)
    from tinylm.paths import cache_dir, shared_data_dir

    for d in (shared_data_dir(), cache_dir() / "gpt2"):
        for v, m in (
            ("gpt2_vocab.json", "gpt2_merges.txt"),
            ("vocab.json", "merges.txt"),
            ("encoder.json", "vocab.bpe"),
        ):
            if (d / v).is_file() and (d / m).is_file():
                return from_gpt2_files(d / v, d / m)
    try:
        import tiktoken

        enc = tiktoken.get_encoding("gpt2")
        ranks = enc._mergeable_ranks
    except Exception as e:
        raise TokenizerError(
            f"GPT-2 tokenizer files not found and tiktoken could not download them ({type(e).__name__}: {e}). "
            f"Offline, put GPT-2's vocab.json and merges.txt (as gpt2_vocab.json/gpt2_merges.txt) in "
            f"{cache_dir() / 'gpt2'} or $TINYLM_DATA_DIR, or pass a tokenizer .json file instead"
        ) from None
    vocab = {i: b for b, i in ranks.items()} | {
        i: s.encode() for s, i in enc._special_tokens.items()
    }
    return BPETokenizer(
        vocab,
        _merges_from_ranks(ranks),
        dict(enc._special_tokens),
        pattern=GPT2_PATTERN,
        name="gpt2",
    )


# -- parallel encoding for data preparation --------------------------------------------------

_WORKER_TOKENIZER: list[Tokenizer] = []


def _init_encode_worker(tokenizer: Tokenizer) -> None:
    exit_with_parent()  # a SIGKILLed parent must not leave its workers behind
    _WORKER_TOKENIZER[:] = [tokenizer]


def _encode_in_worker(text: str) -> list[int]:
    return _WORKER_TOKENIZER[0].encode(text)


def encode_parallel(
    tokenizer: Tokenizer, texts: Iterable[str], num_workers: int = 2, chunksize: int = 16
) -> Iterator[list[int]]:
    """Encode documents in worker processes, yielding their ids in input order, lazily.

    For data preparation: each worker rebuilds the tokenizer once; in-flight work is bounded by
    the pool's queue, not the corpus. Any `Tokenizer` works (BPE, char).
    """
    if num_workers <= 1:
        yield from map(tokenizer.encode, texts)
        return
    # fork starts workers in milliseconds; spawn would re-import numpy/tiktoken in each
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with workers_ignore_sigint():  # Ctrl+C is the parent's to handle (tinylm/interrupts.py)
        pool = ctx.Pool(num_workers, initializer=_init_encode_worker, initargs=(tokenizer,))
    with pool:
        yield from pool.imap(_encode_in_worker, texts, chunksize=chunksize)
