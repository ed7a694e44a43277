"""`tinylm prepare` (sources -> prepared dataset) and `tinylm datasets` (the named-dataset registry).

Heavy imports happen inside the command functions so that `tinylm --help` stays instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from tinylm.cli_args import float_in, int_in
from tinylm.config import SEED_MAX

EOT = "<|endoftext|>"  # repeated here (not imported) to keep `tinylm --help` free of numpy


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `prepare` and `datasets` on the `tinylm` sub-command parser."""
    p = sub.add_parser(
        "prepare",
        help="tokenize text/jsonl/json/parquet/hf sources into a prepared dataset of token shards",
        description="Stream SOURCE... (files, directories, globs, hf:NAME, registered names, "
        "synthetic-stories[:N]) through a tokenizer in parallel worker processes and write a "
        "prepared dataset (meta.json, tokenizer.json, uint16/uint32 shards) to --out. Re-running "
        "an interrupted prepare continues where it stopped.",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--out", required=True, help="output directory of the prepared dataset")
    p.add_argument(
        "--tokenizer",
        default="char",
        help="char | gpt2 | bpe:N (train an N-token BPE on the sources) | tok.json (default: char)",
    )
    p.add_argument(
        "--val-fraction",
        type=float_in(ge=0, lt=1),
        default=0.1,
        help="share of documents held out (default 0.1)",
    )
    p.add_argument(
        "--val-count",
        type=int_in(0, 10**9),
        default=0,
        help="hold out exactly this many documents instead",
    )
    p.add_argument(
        "--val-source", action="append", default=[], help="explicit validation source (repeatable)"
    )
    p.add_argument(
        "--text-field", default="text", help="field/column holding text in jsonl/json/parquet/hf"
    )
    p.add_argument(
        "--delimiter", default=EOT, help=f"document separator in plain text (default {EOT})"
    )
    p.add_argument(
        "--token-field", default="input_ids", help="column of token ids (pretokenized sources)"
    )
    p.add_argument(
        "--token-dtype",
        default="uint16",
        choices=["uint16", "uint32", "int32"],
        help="id dtype of headerless (nanoGPT) .bin files (default uint16)",
    )
    p.add_argument(
        "--seed", type=int_in(0, SEED_MAX), default=1234, help="split seed (default 1234)"
    )
    p.add_argument(
        "--workers",
        type=int_in(0, 1024),
        default=0,
        help="tokenizer processes (default: one per core)",
    )
    # Each worker holds a chunk's text and its int64 ids (~9 bytes a character): 256 M
    # characters is ~2.3 GB per worker, beyond which a chunk is a memory hazard, not a speed-up.
    p.add_argument(
        "--chunk-mb",
        type=float_in(gt=0, le=256),
        default=4.0,
        help="characters per shard chunk, in millions",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_term_as_interrupt(cmd_prepare))

    d = sub.add_parser(
        "datasets",
        help="list named datasets, download one, or write one's documents to a text file",
        description="Named datasets: shakespeare (shipped with tinylm, no download), "
        "tinyshakespeare, tinystories (downloaded once into the cache), "
        "synthetic-stories[:N[:SEED]] (generated offline). `tinylm datasets list` describes each.",
    )
    d.add_argument("action", nargs="?", choices=["list", "download", "write"], default="list")
    d.add_argument("name", nargs="?", help="dataset name (download, write)")
    d.add_argument(
        "--out", help="write: the text file to create (documents separated by <|endoftext|>)"
    )
    d.set_defaults(func=cmd_datasets)

    g = sub.add_parser(
        "data", help="data tools: `tinylm data check` (is val leaking or mismatched?)"
    )
    gsub = g.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    c = gsub.add_parser(
        "check",
        help="check a train/val split for leaks and mismatches",
        description="Compare TRAIN and its validation set (--val, or the split training would "
        "make): exact duplicate documents, 13-gram overlap, token/character distribution "
        "distance, document lengths, unknown tokens, mixture shares. Prints a table and a verdict; "
        "exit status 1 when --fail-on thresholds are crossed.",
    )
    c.add_argument(
        "train", nargs="+", metavar="TRAIN", help="training source(s); several form a mixture"
    )
    c.add_argument("--val", default="", help="validation source (default: split from TRAIN)")
    c.add_argument(
        "--weights", default="", help="mixture weights, comma-separated (default: equal)"
    )
    c.add_argument(
        "--tokenizer", default="char", help="char | gpt2 | bpe:N | tok.json (default: char)"
    )
    c.add_argument("--text-field", default="text", help="field/column of text in jsonl/parquet/hf")
    c.add_argument("--token-field", default="input_ids", help="column of token ids (pretokenized)")
    c.add_argument(
        "--token-dtype",
        default="uint16",
        choices=["uint16", "uint32", "int32"],
        help="nanoGPT .bin ids",
    )
    c.add_argument(
        "--val-fraction", type=float_in(ge=0, lt=1), default=0.1, help="held out when no --val"
    )
    c.add_argument(
        "--sample-mb",
        type=float_in(gt=0, le=1e5),
        default=64.0,
        help="millions of train tokens to read at most (val: a quarter of it)",
    )
    c.add_argument("--report", help="write the JSON report to this file")
    c.add_argument(
        "--fail-on",
        default=None,
        metavar="any|NAME=V,...",
        help="exit 1 when a check crosses this threshold (any: any flag); names: duplicates, "
        "ngram, js_token, js_char, length_ratio, unknown, mixture",
    )
    c.set_defaults(func=cmd_data_check)


def _term_as_interrupt(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """`command` with SIGTERM unwinding like Ctrl+C: workers stopped and reaped, chunks kept."""

    def run(args: argparse.Namespace) -> int:
        from tinylm.interrupts import term_as_interrupt

        with term_as_interrupt():
            return command(args)

    return run


def cmd_prepare(args: argparse.Namespace) -> int:
    from tinylm.config import DataConfig
    from tinylm.data import fitted_tokenizer
    from tinylm.data.errors import DataError
    from tinylm.data.prepare import SplitSettings, prepare
    from tinylm.data.registry import resolve_named
    from tinylm.paths import cache_dir
    from tinylm.tokenizer import load_tokenizer

    cache = cache_dir()
    train: list[str] = []
    val: list[str] = []
    for spec in args.sources:
        t, v = resolve_named(spec, cache)
        train += t
        val += v
    for spec in args.val_source:
        t, v = resolve_named(spec, cache)
        val += t + v
    if not 0 <= args.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    from tinylm.data.pretokenized import pretokenized_tokenizer

    declared = pretokenized_tokenizer(
        train + val, args.tokenizer, args.token_field, args.token_dtype
    )
    if declared is not None:
        tokenizer = declared
    elif args.tokenizer == "char" or args.tokenizer.startswith("bpe:"):
        # Fitted on these sources and cached, exactly as `tinylm train` does.
        fit_cfg = DataConfig(
            text_field=args.text_field, doc_delimiter=args.delimiter, num_workers=args.workers or 0
        )
        tokenizer = fitted_tokenizer(
            args.tokenizer, train, fit_cfg, cache, lambda m: print(f"prepare: {m}")
        )
    else:
        tokenizer = load_tokenizer(args.tokenizer)
    settings = SplitSettings(
        text_field=args.text_field,
        delimiter=args.delimiter,
        val_fraction=args.val_fraction,
        val_count=args.val_count,
        split_seed=args.seed,
        chunk_chars=max(1, int(args.chunk_mb * 1e6)),
    )
    if declared is not None:  # token ids: no tokenizing (read in place when they can be)
        from tinylm.data.pretokenized import prepare_pretokenized

        ds = prepare_pretokenized(
            train,
            args.out,
            tokenizer,
            val_sources=val,
            settings=settings,
            token_field=args.token_field,
            token_dtype=args.token_dtype,
        )
    else:
        ds = prepare(
            train,
            args.out,
            tokenizer,
            val_sources=val,
            settings=settings,
            workers=args.workers,
            progress=False if args.no_progress else None,
        )
    print(ds.summary())
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from tinylm.data.errors import DataError
    from tinylm.data.registry import (
        REGISTRY,
        PackagedFile,
        env_var,
        local_path,
        lookup,
        resolve_named,
    )
    from tinylm.paths import cache_dir

    cache = cache_dir()
    if args.action == "list":
        for ds in REGISTRY.values():
            files = [*ds.train, *ds.val]
            shipped = bool(files) and all(isinstance(f, PackagedFile) for f in files)
            if not files:
                state = "generated"
            elif shipped:
                state = "shipped"
            elif all(local_path(ds, f, cache).is_file() for f in files):
                state = "cached"
            else:
                state = "not downloaded"
            print(f"{ds.name:<18} {state:<15} {ds.description}")
            if files and not shipped:
                print(f"{'':<18} {'':<15} local copy: {env_var(ds.name)}=PATH")
        return 0
    if not args.name or lookup(args.name) is None:
        raise DataError(f"name a registered dataset: {', '.join(REGISTRY)}")
    if args.action == "download":
        train, val = resolve_named(args.name, cache)
        print("\n".join(train + val))
        return 0
    if not args.out:
        raise DataError("datasets write needs --out FILE")
    from pathlib import Path

    from tinylm.data.sources import iter_documents
    from tinylm.fileio import atomic_write

    out = Path(args.out)
    n = 0

    def write(f) -> None:
        nonlocal n
        for spec in resolve_named(args.name, cache)[0]:
            for doc in iter_documents(spec):
                f.write((doc + f"\n{EOT}\n").encode("utf-8"))
                n += 1

    atomic_write(out, write)
    print(f"wrote {n:,} documents to {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from tinylm.config import DataConfig, DataSourceConfig
    from tinylm.data import resolve_data
    from tinylm.data.check import check_split, parse_fail_on
    from tinylm.data.errors import DataError

    try:
        fail_on = parse_fail_on(args.fail_on) if args.fail_on is not None else None
    except ValueError as e:
        raise DataError(str(e)) from None
    weights = [1.0] * len(args.train)
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise DataError(f"--weights {args.weights!r}: expected numbers, e.g. 0.9,0.1") from None
        if len(weights) != len(args.train) or not all(w > 0 for w in weights):
            raise DataError(
                f"--weights: give {len(args.train)} positive numbers, one per TRAIN source"
            )
    cfg = DataConfig(
        train=args.train[0],
        mix=[DataSourceConfig(path=t, weight=w) for t, w in zip(args.train, weights, strict=True)]
        if len(args.train) > 1
        else [],
        val=args.val,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        token_field=args.token_field,
        token_dtype=args.token_dtype,
        val_fraction=args.val_fraction,
    )
    data = resolve_data(cfg, None, 1, log=lambda m: print(m))
    report = check_split(
        data.train,
        data.val,
        data.tokenizer,
        sample_tokens=max(1, int(args.sample_mb * 1e6)),
        thresholds=fail_on or None,
    )
    print(report.table())
    print(report.verdict)
    if args.report:
        print(f"report: {report.write(args.report)}")
    if fail_on is None:
        return 0
    # `any`: every flag fails; NAME=V,...: only those checks (at those thresholds) fail the run.
    failing = [n for n in report.flags if not fail_on or n in fail_on]
    if failing:
        print(f"data check failed: {', '.join(failing)} over the --fail-on threshold")
    return 1 if failing else 0
