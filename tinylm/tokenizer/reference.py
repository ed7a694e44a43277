"""A small, slow, obviously-correct BPE encoder: the textbook merge-list algorithm.

Tests compare `BPETokenizer` (tiktoken, which merges by the rank of the resulting bytes) with
this (which applies the merge list, lowest-ranked adjacent pair first), so a difference between
the two definitions would show up on real text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import pairwise

import regex

from tinylm.tokenizer.pretokenize import GPT2_PATTERN


class ReferenceBPE:
    """encode(text) by splitting on specials (longest first), GPT-2 regex, then merges in order."""

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
    ) -> None:
        self.special_tokens = dict(special_tokens or {})
        special_ids = set(self.special_tokens.values())
        self.merges = list(merges)
        self.rank = {pair: i for i, pair in reversed(list(enumerate(self.merges)))}
        self.ids: dict[bytes, int] = {}
        for i in sorted(vocab):  # lowest id wins if two merges made the same bytes
            if i not in special_ids:
                self.ids.setdefault(vocab[i], i)
        self.pattern = regex.compile(pattern)
        ordered = sorted(self.special_tokens, key=len, reverse=True)
        self.special_re = (
            re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
        )

    def encode_word(self, word: bytes) -> list[int]:
        """Apply the merges to one pre-token."""
        parts = [bytes([b]) for b in word]
        while len(parts) > 1:
            ranks = [self.rank[p] for p in pairwise(parts) if p in self.rank]
            if not ranks:
                break
            a, b = self.merges[min(ranks)]
            out, i = [], 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        return [self.ids[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        """Ids for `text`; special-token strings become their ids."""
        pieces = self.special_re.split(text) if self.special_re else [text]
        out: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2 == 1:  # the capture group puts the specials at odd positions
                out.append(self.special_tokens[piece])
                continue
            for word in self.pattern.findall(piece):
                out.extend(self.encode_word(word.encode("utf-8")))
        return out
