"""Data for training: `resolve_data(cfg.data, tokenizer, context_length)` -> tokenizer + token arrays.

Each configured source (`data.train`, or every entry of `data.mix`) is one of: a prepared dataset
directory (has meta.json; used as it is), a registered name (downloaded once, see registry.py),
`synthetic-stories[:N[:SEED]]`, `hf:NAME`, or local files. Raw sources are prepared once into
`<cache>/prepared/<name>-<hash>/`, the hash covering the source files (path, size, mtime), the
tokenizer fingerprint and the split settings, and reused by later runs. See docs/DESIGN.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tinylm.config import DataConfig, DataSourceConfig
from tinylm.data.errors import DataError
from tinylm.data.shards import META, PreparedDataset, TokenArray
from tinylm.tokenizer.base import Tokenizer


@dataclass
class ResolvedData:
    """What training needs from the data section: the tokenizer and the token arrays."""

    tokenizer: Tokenizer
    train: list[tuple[str, TokenArray, float]]  # (name, tokens, mixing weight)
    val: dict[str, TokenArray]  # per-dataset validation tokens (empty when val_fraction=0)
    datasets: dict[str, PreparedDataset] = field(default_factory=dict)


@dataclass
class _Source:
    name: str
    weight: float
    prepared: PreparedDataset | None = None  # a ready dataset directory
    train_specs: list[str] = field(default_factory=list)  # raw sources to prepare
    val_specs: list[str] = field(default_factory=list)


def source_name(spec: str) -> str:
    """A short label for a source spec: the registry name, file stem, or directory name."""
    from tinylm.data.registry import lookup

    named = lookup(spec)
    if named is not None:
        return named.name
    if spec.startswith("hf:"):
        spec = spec[3:].split("@")[0].split(":")[0]
    path = Path(spec.split("*")[0].rstrip("/") or ".")
    stem = path.name
    for suffix in (
        ".gz",
        ".zst",
        ".zstd",
        ".jsonl",
        ".ndjson",
        ".json",
        ".parquet",
        ".txt",
        ".bin",
        ".npy",
        ".arrow",
    ):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "data"


def _resolve_source(src: DataSourceConfig, cache: Path) -> _Source:
    from tinylm.data.registry import resolve_named

    name = src.name or source_name(src.path)
    path = Path(src.path).expanduser()
    if (path / META).is_file():
        return _Source(name, src.weight, prepared=PreparedDataset.open(path))
    if (path / ".progress").is_dir():
        raise DataError(
            f"'{path}' is an unfinished prepared dataset (no meta.json): re-run the `tinylm prepare` "
            "command that made it to finish it, or delete the directory"
        )
    train, val = resolve_named(src.path, cache)
    return _Source(name, src.weight, train_specs=train, val_specs=val)


def unique_names(names: list[str]) -> list[str]:
    """The second `x` becomes `x-2`, the third `x-3`: one label per source, in order."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(f"{name}-{n + 1}" if n else name)
    return out


def mix_names(mix: list[DataSourceConfig]) -> list[str]:
    """The label of each `data.mix` source, as in its `val_<name>/...` metrics."""
    return unique_names([src.name or source_name(src.path) for src in mix])


def _unique_names(sources: list[_Source]) -> None:
    for s, name in zip(sources, unique_names([s.name for s in sources]), strict=True):
        s.name = name


def fitted_tokenizer(
    spec: str, specs: list[str], cfg: DataConfig, cache: Path, log: Callable[[str], None]
) -> Tokenizer:
    """Fit (streaming) or reuse the `char` or `bpe:N` tokenizer of these training sources.

    The fitted tokenizer is cached under a hash of the sources' identity (paths, sizes, mtimes)
    and the fitting settings, so every run on the same corpus shares one tokenizer.
    """
    from tinylm.data.sources import source_identity
    from tinylm.tokenizer import tokenizer_from_file
    from tinylm.tokenizer.base import save_tokenizer

    ident = json.dumps(
        [spec, [source_identity(s) for s in specs], cfg.text_field, cfg.doc_delimiter],
        sort_keys=True,
    )
    kind = spec.replace(":", "")
    path = cache / "tokenizers" / f"{kind}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return tokenizer_from_file(path)
    log(f"data: fitting a {spec} tokenizer on {', '.join(specs)}")
    if spec == "char":
        from tinylm.data.prepare import fit_char_tokenizer

        tokenizer = fit_char_tokenizer(specs, cfg.text_field, cfg.doc_delimiter)
    else:
        tokenizer = _train_bpe_on(specs, _bpe_vocab_size(spec), cfg, log)
    save_tokenizer(tokenizer, path)  # atomic: a kill mid-write never leaves a partial cache entry
    return tokenizer


def _bpe_vocab_size(spec: str) -> int:
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise DataError(
            f"data.tokenizer='{spec}': expected bpe:VOCAB_SIZE, e.g. bpe:8192"
        ) from None


def _train_bpe_on(
    specs: list[str], vocab_size: int, cfg: DataConfig, log: Callable[[str], None]
) -> Tokenizer:
    """Our BPE trainer on the training sources (see `train_bpe_on_sources`)."""
    from tinylm.tokenizer import EOT

    result = train_bpe_on_sources(
        specs,
        vocab_size,
        [EOT],
        text_field=cfg.text_field,
        delimiter=cfg.doc_delimiter,
        num_workers=cfg.num_workers or None,
    )
    t = result.timings
    log(f"data: trained a {vocab_size}-token BPE in {t['total_s']:.1f} s ({result.engine} merges)")
    return result.tokenizer()


def train_bpe_on_sources(
    specs: list[str],
    vocab_size: int,
    special_tokens: list[str],
    *,
    text_field: str = "text",
    delimiter: str = "<|endoftext|>",
    num_workers: int | None = None,
    progress: bool = False,
    native: bool | None = None,
):
    """Train our byte-level BPE on data sources (files, directories, globs, any format).

    Plain-text files are streamed from disk by the trainer's workers; other formats (jsonl,
    parquet, compressed, synthetic, HF) and other document delimiters are streamed as documents.
    Returns the `BPETrainResult`.
    """
    from tinylm.data.sources import expand_files, is_synthetic, iter_pieces
    from tinylm.tokenizer import EOT
    from tinylm.tokenizer.bpe_train import train_bpe

    def plain_text_files(spec: str) -> list[Path] | None:
        if is_synthetic(spec) or spec.startswith("hf:"):
            return None
        files = expand_files(spec)
        return files if all(f.suffix in (".txt", "") for f in files) else None

    file_lists = [plain_text_files(s) for s in specs]
    inputs: list[Path] = []
    texts = None
    if delimiter == EOT and all(f is not None for f in file_lists):
        inputs = [f for files in file_lists for f in files]
    else:
        texts = (
            text
            for spec in specs
            for text, _ in iter_pieces(spec, text_field=text_field, delimiter=delimiter)
        )
    return train_bpe(
        inputs,
        vocab_size,
        special_tokens,
        texts=texts,
        num_workers=num_workers,
        native=native,
        progress=progress,
    )


def _choose_tokenizer(
    cfg: DataConfig,
    sources: list[_Source],
    cache: Path,
    log: Callable[[str], None],
    val_specs: list[str] = (),  # type: ignore[assignment]
) -> Tokenizer:
    for s in sources:  # a prepared dataset brings its own tokenizer; raw sources then share it
        if s.prepared is not None:
            return s.prepared.tokenizer()
    from tinylm.data.pretokenized import pretokenized_tokenizer

    # Token ids bring the tokenizer that made them (declared: data.tokenizer or metadata).
    specs = [spec for s in sources for spec in s.train_specs + s.val_specs] + list(val_specs)
    declared = pretokenized_tokenizer(specs, cfg.tokenizer, cfg.token_field, cfg.token_dtype)
    if declared is not None:
        return declared
    if cfg.tokenizer == "char" or cfg.tokenizer.startswith("bpe:"):
        specs = [spec for s in sources for spec in s.train_specs]
        return fitted_tokenizer(cfg.tokenizer, specs, cfg, cache, log)
    from tinylm.tokenizer import load_tokenizer

    return load_tokenizer(cfg.tokenizer)


def _prepare_source(
    s: _Source,
    explicit_val: list[str],
    cfg: DataConfig,
    tokenizer: Tokenizer,
    cache: Path,
    log: Callable[[str], None],
) -> PreparedDataset:
    from tinylm.data.prepare import SplitSettings, dataset_key, prepare

    val_specs = explicit_val or s.val_specs  # data.val wins over a named dataset's own val
    settings = SplitSettings(
        text_field=cfg.text_field,
        delimiter=cfg.doc_delimiter,
        val_fraction=cfg.val_fraction,
        val_count=cfg.val_count,
        split_seed=cfg.split_seed,
    )
    key = dataset_key(s.train_specs, val_specs, tokenizer.fingerprint(), settings)
    from tinylm.data.pretokenized import is_pretokenized, prepare_pretokenized, pretokenized_key

    tokens = [is_pretokenized(spec, cfg.token_field) for spec in s.train_specs + val_specs]
    if any(tokens) and not all(tokens):
        raise DataError(
            f"data source '{s.name}': its train and val sources mix text and token ids; give "
            "both as text or both as ids made by one tokenizer"
        )
    if any(tokens):
        key = pretokenized_key(key, cfg.token_field, cfg.token_dtype)
    out = cache / "prepared" / f"{source_name(s.train_specs[0]) if s.train_specs else s.name}-{key}"
    if (out / META).is_file():
        log(f"data: {s.name}: using prepared {out}")
        ds = PreparedDataset.open(out)
        for note in ds.notes():
            log(f"data: {s.name}: {note}")
        return ds
    log(
        f"data: {s.name}: preparing {', '.join(s.train_specs + val_specs)} ({tokenizer.kind} tokenizer) -> {out}"
    )
    if any(tokens):
        return prepare_pretokenized(
            s.train_specs,
            out,
            tokenizer,
            val_sources=val_specs,
            settings=settings,
            token_field=cfg.token_field,
            token_dtype=cfg.token_dtype,
            log=log,
        )
    return prepare(
        s.train_specs,
        out,
        tokenizer,
        val_sources=val_specs,
        settings=settings,
        workers=cfg.num_workers,
        log=log,
    )


def _suggest_context(n_tokens: int) -> int:
    k = 8
    while k * 2 <= n_tokens - 1:
        k *= 2
    return k


def _check_size(
    name: str, split: str, tokens: TokenArray, context_length: int, cfg: DataConfig
) -> None:
    need = context_length + 1  # one window of inputs plus the shifted target
    if len(tokens) >= need:
        return
    hint = f"lower model.context_length (e.g. model.context_length={_suggest_context(len(tokens))})"
    if split == "val":
        hint += f", raise data.val_fraction (now {cfg.val_fraction}), or set data.val_fraction=0"
    raise DataError(
        f"dataset '{name}' has {len(tokens):,} {split} tokens, fewer than the {need:,} "
        f"(model.context_length={context_length} + 1) needed for one {split} sequence: add more text, or {hint}"
    )


def resolve_data(
    cfg: DataConfig,
    tokenizer: Tokenizer | None,
    context_length: int,
    *,
    log: Callable[[str], None] = print,
    train_label: str = "train",
) -> ResolvedData:
    """Prepare (or reuse) every configured source and return the tokenizer and token arrays.

    `train_label` names the training sources' role in messages ("eval data" for `tinylm eval
    --data`, which scores them).

    `tokenizer=None` builds the one `cfg.tokenizer` names (char is fitted on the training
    sources, streamed); a resumed run passes its saved tokenizer, and a prepared dataset made
    with another tokenizer is refused. DataError explains empty or too-small data.
    """
    from tinylm.paths import cache_dir

    cache = cache_dir(cfg.cache_dir)
    entries = cfg.mix or [DataSourceConfig(path=cfg.train, weight=1.0)]
    sources = [_resolve_source(e, cache) for e in entries]
    _unique_names(sources)
    explicit_val: list[str] = []
    val_prepared: PreparedDataset | None = None
    if cfg.val:
        val_src = _resolve_source(DataSourceConfig(path=cfg.val), cache)
        val_prepared = val_src.prepared
        explicit_val = val_src.train_specs + val_src.val_specs
    tokenizer = tokenizer or _choose_tokenizer(cfg, sources, cache, log, explicit_val)

    # An explicit val source joins a single raw training source's dataset (one cache entry);
    # otherwise (a mixture, or a prepared training set) it is a dataset of its own.
    joint_val = bool(explicit_val) and len(sources) == 1 and sources[0].prepared is None
    datasets: dict[str, PreparedDataset] = {}
    for s in sources:
        ds = s.prepared or _prepare_source(
            s, explicit_val if joint_val else [], cfg, tokenizer, cache, log
        )
        ds.check_tokenizer(tokenizer)
        datasets[s.name] = ds
    train = [(s.name, datasets[s.name].split("train"), s.weight) for s in sources]
    val = {name: ds.split("val") for name, ds in datasets.items() if ds.num_tokens("val") > 0}
    if cfg.val and not joint_val:
        if val_prepared is None:
            val_prepared = _prepare_source(
                _Source(source_name(cfg.val), 1.0, val_specs=explicit_val),
                [],
                cfg,
                tokenizer,
                cache,
                log,
            )
        val_prepared.check_tokenizer(tokenizer)
        # A prepared dataset named as val contributes its val split, or all of it if it has none.
        val = {
            source_name(cfg.val): val_prepared.split(
                "val" if val_prepared.num_tokens("val") else "train"
            )
        }

    for s in sources:
        for note in s.prepared.notes() if s.prepared is not None else []:
            log(f"data: {s.name}: {note}")
    for name, tokens, _ in train:
        _check_size(name, train_label, tokens, context_length, cfg)
        weight = f", weight {_w(sources, name)}" if train_label == "train" else ""
        log(
            f"data: {name}: {train_label} {len(tokens):,} tokens ({tokens.num_documents:,} documents){weight}"
        )
        _report_unknown(tokenizer, tokens, f"data: {name}: {train_label}", log)
    for name, tokens in val.items():
        _check_size(name, "val", tokens, context_length, cfg)
        log(f"data: {name}: val {len(tokens):,} tokens ({tokens.num_documents:,} documents)")
        _report_unknown(tokenizer, tokens, f"data: {name}: val", log)
    return ResolvedData(tokenizer, train, val, datasets)


def _report_unknown(
    tokenizer: Tokenizer, tokens: TokenArray, where: str, log: Callable[[str], None]
) -> None:
    """Say how many characters a char tokenizer replaced by <|unk|> in this split (if any)."""
    from tinylm.tokenizer.char import CharTokenizer, replaced_note

    if isinstance(tokenizer, CharTokenizer) and (n := tokens.count(tokenizer.unk_id)):
        log(replaced_note(n, len(tokens) - tokens.num_documents, where))


def _w(sources: list[_Source], name: str) -> float:
    return next(s.weight for s in sources if s.name == name)
