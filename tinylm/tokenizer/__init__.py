"""Tokenizers behind one interface: character-level, GPT-2, and our own trained byte-level BPE.

`load_tokenizer(spec)` (in `loading.py`) is the single entry point used by training and data
preparation: `spec` is "char" (needs `fit_texts`), "gpt2", or a path to one of our tokenizer JSON
files.
"""

from __future__ import annotations

from tinylm.tokenizer.base import EOT, Tokenizer, TokenizerError
from tinylm.tokenizer.char import CharTokenizer
from tinylm.tokenizer.loading import load_tokenizer, tokenizer_from_file

__all__ = [
    "EOT",
    "CharTokenizer",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "tokenizer_from_file",
]
