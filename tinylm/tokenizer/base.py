"""The one interface every tokenizer implements, and our tokenizer file envelope."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FILE_FORMAT = "tinylm-tokenizer"
FILE_VERSION = 1
EOT = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer could not be built, loaded or applied; the message says why and what to do."""


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", list: "a list", dict: "an object", int: "an integer"}
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in types)


def check_fields(d: dict[str, Any], fields: dict[str, type | tuple[type, ...]], kind: str) -> None:
    """Refuse a tokenizer file dict whose fields are absent or of the wrong JSON type.

    Checked before the fields are used, so a hand-edited file gets a message naming the field
    instead of a TypeError from deep inside the constructor.
    """
    for name, expected in fields.items():
        if name not in d:
            raise TokenizerError(
                f"{kind} tokenizer file lacks the field '{name}'; re-create it with tinylm"
            )
        value = d[name]
        if not isinstance(value, expected) or isinstance(value, bool):
            raise TokenizerError(
                f"{kind} tokenizer file: '{name}' is {type(value).__name__}, expected {_type_name(expected)}"
            )


def check_special_tokens(specials: Any, kind: str) -> dict[str, int]:
    """`special_tokens` as str -> non-negative int, or a TokenizerError naming the bad entry."""
    if not isinstance(specials, dict):
        raise TokenizerError(f"{kind} tokenizer file: 'special_tokens' must be an object")
    for token, i in specials.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TokenizerError(
                f"{kind} tokenizer file: special token {token!r} has id {i!r}, not a non-negative integer"
            )
    return dict(specials)


class Tokenizer(ABC):
    """Text <-> token ids.

    Subclasses provide `to_dict`/`from_dict` for our JSON file format (see `save`/`load`), and
    the byte length of every token so that losses convert to bits per byte.
    """

    kind: str = ""  # "char", "bpe": the `type` field of the file

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0..vocab_size-1)."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special token string -> id."""

    @property
    def eot_id(self) -> int | None:
        """The end-of-text id that separates documents, if the tokenizer has one."""
        return self.special_tokens.get(EOT)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Encode text; special token strings in it become their ids."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids; invalid UTF-8 is replaced (never raises for ids in range)."""

    @abstractmethod
    def token_bytes(self) -> np.ndarray:
        """int32 array [vocab_size]: UTF-8 bytes each token stands for (0 for special tokens)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer (without the file envelope)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_to_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode_batch` as int64 arrays (what data preparation writes); subclasses vectorize."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def encode_iterable(self, texts: Iterable[str]) -> Iterator[int]:
        """Yield ids lazily, chunk by chunk, so memory does not grow with the input."""
        for text in texts:
            yield from self.encode(text)

    # -- files ----------------------------------------------------------------------------

    def file_dict(self) -> dict[str, Any]:
        return {"format": FILE_FORMAT, "version": FILE_VERSION, "type": self.kind, **self.to_dict()}

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON atomically (a temporary file of this process + rename).

        Two processes caching the same tokenizer at once, or one killed mid-write, never leave
        a half-written file under `path`. A write that fails (disk full, permission) raises
        OSError with `path` untouched; callers that own the user-facing error translate it.
        """
        from tinylm.fileio import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(self.file_dict(), ensure_ascii=False, indent=1))

    def fingerprint(self) -> str:
        """A short hash identifying exactly this tokenizer (vocab, merges, specials).

        Computed once: a tokenizer does not change after construction, and serializing a 50k
        vocabulary costs ~0.2 s, which data preparation and caching would otherwise pay per call.
        """
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            canonical = json.dumps(self.file_dict(), ensure_ascii=False, sort_keys=True)
            cached = self._fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        return cached

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"
        )


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """`tokenizer.save(path)` for commands: a failed write is a TokenizerError naming the path.

    An existing file is replaced only if it is a tinylm tokenizer file (re-training one): a
    file of anything else named by mistake is refused, not overwritten.
    """
    from tinylm.fileio import os_error_message

    path = Path(path)
    if path.is_file() and not _is_tokenizer_file(path):
        raise TokenizerError(
            f"'{path}' exists and is not a tinylm tokenizer file; refusing to overwrite it: "
            "choose another --out path (or remove that file)"
        )
    try:
        return tokenizer.save(path)
    except OSError as e:
        raise TokenizerError(os_error_message(e, path, "write the tokenizer file")) from None


def _is_tokenizer_file(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return f'"format": "{FILE_FORMAT}"' in head
