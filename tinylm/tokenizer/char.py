"""Character-level tokenizer fitted on a corpus, with an explicit policy for unseen characters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

from tinylm.tokenizer.base import EOT, Tokenizer, TokenizerError

UNK = "<|unk|>"
UnknownPolicy = Literal["unk", "skip", "error"]


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
        return cls(list(d["chars"]), d.get("unknown", "unk"))
