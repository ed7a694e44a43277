"""What the GPT-2-style byte-level BPE splits text into before merging, shared by the tokenizer
(`bpe.py`) and the trainer (`bpe_train.py`): the pre-token pattern and where text can be cut
into chunks without changing its pre-tokens.

Kept apart so that the encoder does not import the trainer (and the trainer can import the
encoder to hand back a ready `BPETokenizer`).
"""

from __future__ import annotations

# GPT-2's pre-tokenizer: contractions, letter runs, number runs, other-symbol runs, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def last_safe_cut(text: str | bytes, lo: int = 0, hi: int | None = None) -> int:
    """The last position in [lo, hi) between a visible ASCII character and a space, tab or
    newline, or -1: cutting `text` there changes neither its pre-tokens nor its BPE encoding.

    No GPT-2 pattern matches non-space then space and none looks behind, so both sides
    tokenize as in the whole text; the cut never splits a UTF-8 character. Just after a newline
    is *not* safe: "\n\n" before "x" is two tokens in the whole text, one at a chunk end.
    Searched backwards with rfind: a forward regex scan cost more than pre-tokenizing.
    """
    space, newline, tab, first, last = (
        (" ", "\n", "\t", "!", "~") if isinstance(text, str) else (b" ", b"\n", b"\t", b"!", b"~")
    )
    end = len(text) if hi is None else hi
    while True:
        p = max(text.rfind(space, lo, end), text.rfind(newline, lo, end), text.rfind(tab, lo, end))
        if p <= lo:
            return -1
        if first <= text[p - 1 : p] <= last:
            return p
        end = p
