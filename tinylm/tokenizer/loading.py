"""Loading a tokenizer by name or file: `load_tokenizer(spec)` ("char", "gpt2", a JSON path) and
`tokenizer_from_file(path)` (our JSON envelope, any type)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tinylm.tokenizer.base import FILE_FORMAT, FILE_VERSION, Tokenizer, TokenizerError
from tinylm.tokenizer.char import CharTokenizer


def tokenizer_from_file(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save` (our JSON format, any type)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file '{path}' not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not a tokenizer JSON file ({e})") from None
    except OSError as e:
        from tinylm.fileio import os_error_message

        raise TokenizerError(os_error_message(e, path, "read the tokenizer file")) from None
    try:
        return _from_file_dict(d, path)
    except TokenizerError as e:
        message = str(e)
        raise TokenizerError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None


def _from_file_dict(d: object, path: Path) -> Tokenizer:
    if not isinstance(d, dict) or d.get("format") != FILE_FORMAT:
        raise TokenizerError(
            f'{path}: not a tinylm tokenizer file (no "format": "{FILE_FORMAT}"). '
            "To import a Hugging Face tokenizer.json or GPT-2 vocab/merges, use `tinylm tokenizer import`."
        )
    if d.get("version") != FILE_VERSION:
        raise TokenizerError(
            f"{path}: tokenizer file version {d.get('version')!r}, this tinylm reads version {FILE_VERSION}; "
            "re-create it with this version of tinylm"
        )
    kind = d.get("type")
    if kind == "char":
        return CharTokenizer.from_dict(d)
    if kind == "bpe":
        from tinylm.tokenizer.bpe import BPETokenizer

        return BPETokenizer.from_dict(d)
    raise TokenizerError(f"{path}: unknown tokenizer type {kind!r} (expected 'char' or 'bpe')")


def load_tokenizer(spec: str, fit_texts: Iterable[str] | None = None) -> Tokenizer:
    """Build the tokenizer a config names: "char" (fitted on `fit_texts`), "gpt2", or a file path."""
    if spec == "char":
        if fit_texts is None:
            raise TokenizerError("tokenizer 'char' must be fitted on the training text (fit_texts)")
        return CharTokenizer.fit(fit_texts)
    if spec == "gpt2":
        from tinylm.tokenizer.bpe import gpt2_tokenizer

        return gpt2_tokenizer()
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        return tokenizer_from_file(path)
    raise TokenizerError(
        f"tokenizer '{spec}': expected 'char', 'gpt2' or a path to a tokenizer .json file"
    )
