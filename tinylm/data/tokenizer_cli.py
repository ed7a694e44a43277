"""`tinylm tokenizer train|encode|stats|import|export`: thin argument handling over the tokenizer package.

In `data/`, not `tokenizer/`: `tokenizer train FILES` reads its documents through the data sources
(`data.train_bpe_on_sources`), and the tokenizer package sits below data (docs/DESIGN.md, "Layers").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tinylm.cli_args import int_in, utf8_text


def add_commands(subparsers) -> None:
    """Register `tinylm tokenizer ...` on the top-level subparsers."""
    p = subparsers.add_parser(
        "tokenizer", help="train, apply, inspect, import and export tokenizers"
    )
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    t.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="SOURCE",
        help="files, directories or globs (quoted), as in `tinylm train` and `tinylm prepare`: "
        "UTF-8 text, .jsonl/.json/.parquet, .gz/.zst",
    )
    t.add_argument(
        "--vocab-size",
        type=int_in(1, 2**24),
        required=True,
        help="total ids: 256 bytes + specials + merges",
    )
    t.add_argument(
        "--special",
        action="append",
        default=None,
        metavar="TOKEN",
        help="special token (repeatable; default <|endoftext|>)",
    )
    t.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    t.add_argument(
        "--workers",
        type=int_in(1, 1024),
        default=None,
        help="pre-tokenization processes (default: all cores)",
    )
    t.add_argument("--python", action="store_true", help="use the pure-Python merge loop")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("encode", help="print the token ids of a text or file")
    e.add_argument("--tokenizer", required=True, help="'gpt2' or a tokenizer .json")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=utf8_text, help="text to encode")
    src.add_argument("--input", help="UTF-8 file to encode")
    e.add_argument("--show", action="store_true", help="print each token's text beside its id")
    e.set_defaults(func=cmd_encode)

    s = sub.add_parser("stats", help="bytes per token, vocabulary usage and speed on files")
    s.add_argument("--tokenizer", required=True, help="'gpt2' or a tokenizer .json")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.set_defaults(func=cmd_stats)

    i = sub.add_parser(
        "import", help="convert a Hugging Face tokenizer.json or GPT-2 vocab/merges to ours"
    )
    i.add_argument(
        "--hf", metavar="TOKENIZER_JSON", help="Hugging Face byte-level BPE tokenizer.json"
    )
    i.add_argument(
        "--gpt2", nargs=2, metavar=("VOCAB_JSON", "MERGES_TXT"), help="GPT-2-style files"
    )
    i.add_argument("--out", required=True, help="where to write our tokenizer JSON")
    i.set_defaults(func=cmd_import)

    x = sub.add_parser(
        "export", help="write one of our BPE tokenizers as HF tokenizer.json or GPT-2 files"
    )
    x.add_argument("--tokenizer", required=True, help="'gpt2' or a tokenizer .json")
    x.add_argument("--to", choices=["hf", "gpt2"], required=True)
    x.add_argument("--out", required=True, help="hf: the tokenizer.json path; gpt2: a directory")
    x.set_defaults(func=cmd_export)


def _bpe(spec: str):
    from tinylm.tokenizer import TokenizerError, load_tokenizer
    from tinylm.tokenizer.bpe import BPETokenizer

    tok = load_tokenizer(spec)
    if not isinstance(tok, BPETokenizer):
        raise TokenizerError(f"{spec}: a {tok.kind} tokenizer; this command needs a BPE tokenizer")
    return tok


def cmd_train(args: argparse.Namespace) -> int:
    from tinylm.data import train_bpe_on_sources
    from tinylm.tokenizer.base import EOT, save_tokenizer

    specials = args.special if args.special is not None else [EOT]
    result = train_bpe_on_sources(
        args.input,
        args.vocab_size,
        specials,
        num_workers=args.workers,
        native=False if args.python else None,
        progress=sys.stderr.isatty(),
    )
    tok = result.tokenizer()
    save_tokenizer(tok, args.out)
    tm = result.timings
    print(
        f"trained {tok.vocab_size} tokens ({len(result.merges)} merges, {result.num_words:,} distinct pre-tokens) "
        f"in {tm['total_s']:.2f}s (pre-tokenize {tm['pretokenize_s']:.2f}s, merges {tm['merge_s']:.2f}s, "
        f"{result.engine}) -> {args.out}"
    )
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from tinylm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = args.text if args.text is not None else _read(args.input)
    ids = tok.encode(text)
    if args.show:
        for i in ids:
            print(f"{i}\t{tok.decode([i])!r}")
    else:
        print(" ".join(map(str, ids)))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    import numpy as np

    from tinylm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    used = np.zeros(tok.vocab_size, dtype=bool)
    total_bytes = total_tokens = 0
    seconds = 0.0
    for f in args.files:
        text = _read(f)
        t0 = time.perf_counter()
        ids = tok.encode(text)
        seconds += time.perf_counter() - t0
        used[np.asarray(ids, dtype=np.int64)] = True
        n_bytes = len(text.encode("utf-8"))
        total_bytes += n_bytes
        total_tokens += len(ids)
        print(
            f"{f}: {n_bytes:,} bytes -> {len(ids):,} tokens, {n_bytes / max(len(ids), 1):.3f} bytes/token"
        )
    print(
        f"total: {total_bytes:,} bytes -> {total_tokens:,} tokens, "
        f"{total_bytes / max(total_tokens, 1):.3f} bytes/token; "
        f"vocab used {int(used.sum()):,}/{tok.vocab_size:,} ({used.mean():.1%}); "
        f"encode {total_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s (one process)"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from tinylm.tokenizer import TokenizerError
    from tinylm.tokenizer.base import save_tokenizer
    from tinylm.tokenizer.bpe import from_gpt2_files, from_hf_json

    if bool(args.hf) == bool(args.gpt2):
        raise TokenizerError(
            "give exactly one of --hf TOKENIZER_JSON or --gpt2 VOCAB_JSON MERGES_TXT"
        )
    tok = from_hf_json(args.hf) if args.hf else from_gpt2_files(*args.gpt2)
    save_tokenizer(tok, args.out)
    print(
        f"imported {tok.vocab_size} tokens, {len(tok.merges)} merges, specials {list(tok.special_tokens)} -> {args.out}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    tok = _bpe(args.tokenizer)
    out = Path(args.out)
    if args.to == "hf":
        tok.save_hf(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        tok.save_gpt2(out / "vocab.json", out / "merges.txt")
    print(f"exported {tok.vocab_size} tokens as {args.to} -> {out}")
    return 0


def _read(path: str) -> str:
    from tinylm.tokenizer import TokenizerError

    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"input file '{path}' not found")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(
            f"{path}: byte {e.start} is not valid UTF-8; convert the file to UTF-8 first (e.g. iconv)"
        ) from None
