"""Hugging Face tokenizer files for tinylm tokenizers, and tinylm tokenizers from HF directories.

Byte-level BPE (ours and GPT-2) is HF's own BPE model (`BPETokenizer.to_hf_json`). The character
tokenizer becomes a WordLevel model over its characters with a pre-tokenizer that isolates every
code point, a `Fuse` decoder (no spaces between tokens), and unknown characters handled as
tinylm handles them: `<|unk|>` (the WordLevel unknown token) under the "unk" and "error" policies
(where tinylm would raise, HF cannot, so it gives `<|unk|>`), and removed by a normalizer under
"skip". `<|endoftext|>` is an added special token, matched before pre-tokenization, as tinylm
matches it before encoding characters; `<|unk|>` is deliberately not an added token, because
tinylm encodes the text "<|unk|>" character by character.

Reading back: a directory holding our char form becomes a `CharTokenizer`; any byte-level BPE
`tokenizer.json` (or GPT-2 `vocab.json` + `merges.txt`) becomes a `BPETokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinylm.fileio import atomic_write_text
from tinylm.tokenizer import CharTokenizer, Tokenizer, TokenizerError
from tinylm.tokenizer.base import EOT
from tinylm.tokenizer.char import UNK

# Matches one code point, newlines included (Oniguruma, as used by `tokenizers`).
_ONE_CHAR = r"(?m:.)"


def _added_token(content: str, i: int) -> dict[str, Any]:
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def char_to_hf_json(tok: CharTokenizer) -> dict[str, Any]:
    """A `tokenizer.json` that encodes every text exactly as `tok` does (see the module doc)."""
    specials = tok.special_tokens
    vocab = {c: i for i, c in enumerate(tok.chars)} | specials
    normalizer = None
    if tok.unknown == "skip":
        known = "".join(f"\\x{{{ord(c):x}}}" for c in tok.chars)
        normalizer = {"type": "Replace", "pattern": {"Regex": f"[^{known}]"}, "content": ""}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(EOT, specials[EOT])],
        "normalizer": normalizer,
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": _ONE_CHAR},
            "behavior": "Isolated",
            "invert": False,
        },
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK},
    }


def _is_char_form(d: dict[str, Any]) -> bool:
    pre = d.get("pre_tokenizer") or {}
    return (
        d.get("model", {}).get("type") == "WordLevel"
        and pre.get("type") == "Split"
        and pre.get("pattern") == {"Regex": _ONE_CHAR}
    )


def char_from_hf_json(d: dict[str, Any], where: str) -> CharTokenizer:
    """The CharTokenizer a `char_to_hf_json` file describes."""
    vocab: dict[str, int] = d["model"]["vocab"]
    n = len(vocab) - 2
    by_id = {i: s for s, i in vocab.items()}
    if vocab.get(EOT) != n or vocab.get(UNK) != n + 1 or sorted(by_id) != list(range(n + 2)):
        raise TokenizerError(
            f"{where}: a WordLevel tokenizer.json, but not one tinylm wrote (it expects the "
            f"characters, then {EOT} and {UNK}); only tinylm's char form and byte-level BPE import"
        )
    unknown = "skip" if d.get("normalizer") else "unk"
    return CharTokenizer([by_id[i] for i in range(n)], unknown)


def hf_tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    """`tokenizer.json` for any tinylm tokenizer."""
    if isinstance(tok, CharTokenizer):
        return char_to_hf_json(tok)
    from tinylm.tokenizer.bpe import BPETokenizer

    if isinstance(tok, BPETokenizer):
        return tok.to_hf_json()
    raise TokenizerError(f"no Hugging Face form for a {type(tok).__name__}")


def write_tokenizer_files(tok: Tokenizer, out: Path, model_max_length: int) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`.

    BOS, EOS and PAD are all `<|endoftext|>`: tinylm separates documents with it and has no other
    special token that HF's generation or batching would need. Returns the file names.
    """
    eot = EOT if tok.eot_id is not None else None
    specials = {"bos_token": eot, "eos_token": eot, "pad_token": eot}
    files = {
        "tokenizer.json": hf_tokenizer_json(tok),
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "model_max_length": model_max_length,
            # No token_type_ids: the causal LM classes take none, and generate(**tok(...)) fails.
            "model_input_names": ["input_ids", "attention_mask"],
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        },
        "special_tokens_map.json": specials,
    }
    for name, content in files.items():
        atomic_write_text(out / name, json.dumps(content, ensure_ascii=False, indent=1))
    return list(files)


def tokenizer_from_hf_dir(path: Path) -> Tokenizer:
    """The tinylm tokenizer of an HF model directory (tokenizer.json, or vocab.json + merges.txt)."""
    from tinylm.tokenizer.bpe import from_gpt2_files, from_hf_json

    file = path / "tokenizer.json"
    if file.is_file():
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{file}: not a readable tokenizer.json ({e})") from None
        if _is_char_form(d):
            return char_from_hf_json(d, str(file))
        return from_hf_json(file)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return from_gpt2_files(path / "vocab.json", path / "merges.txt")
    raise TokenizerError(
        f"{path} has no tokenizer.json (nor vocab.json + merges.txt): tinylm needs the model's "
        "tokenizer to train it; copy the tokenizer files from where the model came from"
    )
