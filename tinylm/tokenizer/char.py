"""Character-level tokenizer fitted on a corpus, with an explicit policy for unseen characters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

from tinylm.tokenizer.base import (
    EOT,
    Tokenizer,
    TokenizerError,
    check_fields,
    check_special_tokens,
)

UNK = "<|unk|>"
UnknownPolicy = Literal["unk", "skip", "error"]


def replaced_note(replaced: int, total: int, where: str) -> str:
    """The one line that says how many characters of `where` became <|unk|> (never silent)."""
    share = 100 * replaced / max(total, 1)
    return (
        f"{where}: {replaced:,} of {total:,} characters ({share:.3g}%) were never seen when the "
        f"char tokenizer was fitted and became {UNK} (shown as \ufffd)"
    )


class CharTokenizer(Tokenizer):
    """One id per character seen when fitting, then `<|endoftext|>` and `<|unk|>`.

    `unknown` decides what happens to a character not seen when fitting: "unk" maps it to
    `<|unk|>` (decoded as U+FFFD), "skip" drops it, "error" raises naming the character.
    """

    kind = "char"

    def __init__(self, chars: Sequence[str], unknown: UnknownPolicy = "unk") -> None:
        if unknown not in ("unk", "skip", "error"):
            raise TokenizerError(
                f"unknown-character policy must be unk, skip or error, got {unknown!r}"
            )
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise TokenizerError("a char tokenizer needs distinct single characters")
        self.chars = list(chars)
        self.unknown = unknown
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        n = len(self.chars)
        self._specials = {EOT: n, UNK: n + 1}
        # Code point -> id table for vectorized encoding; one slot past the largest known code
        # point catches every unknown one after clipping (-1 = not encodable by lookup).
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        unknown_id = self._specials[UNK] if unknown == "unk" else -1
        self._table = np.full(int(codes.max(initial=0)) + 2, unknown_id, dtype=np.int64)
        self._table[codes] = np.arange(n)

    @classmethod
    def fit(cls, texts: Iterable[str], unknown: UnknownPolicy = "unk") -> CharTokenizer:
        """Collect the character set of `texts` (streamed; memory is the alphabet, not the text)."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise TokenizerError(
                "cannot fit a char tokenizer on an empty corpus: the text has no characters"
            )
        return cls(sorted(seen), unknown)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self._specials)

    @property
    def unk_id(self) -> int:
        return self._specials[UNK]

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def _encode_plain(self, text: str, out: list[int]) -> None:
        stoi = self._stoi
        for ch in text:
            i = stoi.get(ch)
            if i is not None:
                out.append(i)
            elif self.unknown == "unk":
                out.append(self._specials[UNK])
            elif self.unknown == "error":
                raise TokenizerError(
                    f"character {ch!r} (U+{ord(ch):04X}) was not in the corpus this tokenizer was fitted on; "
                    "refit on text that contains it, or use the 'unk' or 'skip' policy"
                )

    def encode(self, text: str) -> list[int]:
        return self.encode_to_arrays([text])[0].tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [ids.tolist() for ids in self.encode_to_arrays(texts)]

    def encode_to_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Vectorized: one table lookup over the joined texts (~20x the per-character loop).

        Texts holding special-token strings, or unknown characters under the skip/error
        policies, take the exact per-character path (`_encode_exact`), so ids never differ.
        """
        if not texts:
            return []
        joined = "".join(texts)
        # One lookup over the joined batch: per-text NumPy calls cost more than the lookup
        # itself for short documents (6.6 vs ~100 MB/s on 570-character stories).
        if not any(s in joined for s in self._specials):
            ids = self._lookup(joined)
            if not (ids < 0).any():
                # UTF-32 has one unit per code point, so string lengths are the split points.
                return np.split(ids, np.cumsum([len(t) for t in texts[:-1]]))
        return [np.asarray(self._encode_exact(t), dtype=np.int64) for t in texts]

    def _lookup(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        return self._table[np.minimum(points, len(self._table) - 1)]

    def _encode_exact(self, text: str) -> list[int]:
        """The reference encoding: special tokens first, then one id per character."""
        out: list[int] = []
        start = 0
        while True:
            pos = text.find(EOT, start)
            if pos < 0:
                self._encode_plain(text[start:], out)
                return out
            self._encode_plain(text[start:pos], out)
            out.append(self._specials[EOT])
            start = pos + len(EOT)

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.chars)
        parts = []
        for i in ids:
            i = int(i)
            if 0 <= i < n:
                parts.append(self.chars[i])
            elif i == self._specials[EOT]:
                parts.append(EOT)
            else:
                parts.append("\ufffd")
        return "".join(parts)

    def token_bytes(self) -> np.ndarray:
        lengths = [len(c.encode("utf-8")) for c in self.chars] + [0] * len(self._specials)
        return np.asarray(lengths, dtype=np.int32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chars": "".join(self.chars),
            "unknown": self.unknown,
            "special_tokens": self.special_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        check_fields(d, {"chars": str, "unknown": str}, "char")
        tok = cls(list(d["chars"]), d["unknown"])
        if (
            "special_tokens" in d
            and check_special_tokens(d["special_tokens"], "char") != tok.special_tokens
        ):
            raise TokenizerError(
                f"char tokenizer file: special_tokens {d['special_tokens']} contradict its "
                f"{len(tok.chars)} characters (expected {tok.special_tokens})"
            )
        return tok
