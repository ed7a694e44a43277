"""Named datasets: where each one lives online, where it is cached, and what to do offline.

`resolve_named(spec, cache)` turns a registered name into local file specs (downloading once into
`<cache>/downloads/<name>/`, with a progress bar, a checksum where one is known, and an atomic
rename) and returns `(train_specs, val_specs)`; any other spec is returned unchanged. A user can
skip the download by setting `TINYLM_DATA_<NAME>` to the file (or to a directory holding the
dataset's files) or by pointing `data.train` at a local copy. A dataset can also be shipped inside
the package (`PackagedFile`, see `tinylm/data/corpora/README.md`): it is always offline.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinylm.data.errors import DataError
from tinylm.data.sources import SYNTHETIC, is_synthetic
from tinylm.fileio import create_new
from tinylm.suggest import did_you_mean


@dataclass(frozen=True)
class RemoteFile:
    url: str
    filename: str
    sha256: str | None = None  # checked after download when known
    approx_bytes: int = 0


@dataclass(frozen=True)
class PackagedFile:
    """A file shipped in tinylm/data/corpora/ (small, public domain): no download, ever."""

    filename: str

    @property
    def path(self) -> Path:
        return CORPORA_DIR / self.filename


CORPORA_DIR = Path(__file__).parent / "corpora"


@dataclass(frozen=True)
class NamedDataset:
    name: str
    description: str
    train: tuple[RemoteFile | PackagedFile, ...] = ()
    val: tuple[RemoteFile | PackagedFile, ...] = ()  # published validation files; empty = split


_HF_TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
REGISTRY: dict[str, NamedDataset] = {
    d.name: d
    for d in (
        NamedDataset(
            "shakespeare",
            "eight Shakespeare plays to train on (1.05 MB) and The Tempest held out for validation "
            "(98 KB); Project Gutenberg texts, public domain, shipped with tinylm (no download)",
            train=(PackagedFile("shakespeare-train.txt.gz"),),
            val=(PackagedFile("shakespeare-val.txt.gz"),),
        ),
        NamedDataset(
            "tinyshakespeare",
            "Tiny Shakespeare: 40k lines of plays, one 1.1 MB file (char-rnn's input.txt)",
            train=(
                RemoteFile(
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    "input.txt",
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                    1_115_394,
                ),
            ),
        ),
        NamedDataset(
            "tinystories",
            "TinyStories V2 (GPT-4 stories, Eldan & Li 2023): 2.2 GB train, 22 MB valid, <|endoftext|>-separated",
            train=(
                RemoteFile(
                    _HF_TINYSTORIES + "TinyStoriesV2-GPT4-train.txt",
                    "TinyStoriesV2-GPT4-train.txt",
                    None,
                    2_227_753_162,
                ),
            ),
            val=(
                RemoteFile(
                    _HF_TINYSTORIES + "TinyStoriesV2-GPT4-valid.txt",
                    "TinyStoriesV2-GPT4-valid.txt",
                    None,
                    22_502_601,
                ),
            ),
        ),
        NamedDataset(
            SYNTHETIC,
            "generated simple children's stories, offline; synthetic-stories[:N[:SEED]] (default 5,000 stories, ~2.9 MB)",
        ),
    )
}


def env_var(name: str) -> str:
    """The environment variable that points at a local copy of a named dataset."""
    return "TINYLM_DATA_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def local_path(dataset: NamedDataset, remote: RemoteFile | PackagedFile, cache: Path) -> Path:
    """Where a dataset file is read from: in the package, $TINYLM_DATA_<NAME>, or the cache."""
    if isinstance(remote, PackagedFile):
        return remote.path
    override = os.environ.get(env_var(dataset.name))
    if override:
        p = Path(override).expanduser()
        return p / remote.filename if p.is_dir() else p
    return cache / "downloads" / dataset.name / remote.filename


def download(url: str, dest: Path, sha256: str | None = None) -> None:
    """Fetch `url` to `dest` with a progress bar: `dest.part`, checksum, then rename."""
    import urllib.request

    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    part.unlink(missing_ok=True)  # a leftover (or a link) at the name: removed, not followed
    with urllib.request.urlopen(url, timeout=30) as response, create_new(part) as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
            while block := response.read(1 << 20):
                f.write(block)
                digest.update(block)
                bar.update(len(block))
    if sha256 and digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise DataError(
            f"{url}: downloaded file has SHA-256 {digest.hexdigest()}, expected {sha256}; "
            "the download was corrupted or the file changed upstream. Try again, or fetch it yourself."
        )
    os.replace(part, dest)


def ensure_file(
    dataset: NamedDataset,
    remote: RemoteFile | PackagedFile,
    cache: Path,
    fetch: Callable[[str, Path, str | None], None] | None = None,
) -> Path:
    """The local path of one dataset file, downloading it first if needed (offline: a clear error)."""
    if isinstance(remote, PackagedFile):
        if not remote.path.is_file():  # an install that left out the package data
            raise DataError(
                f"{remote.path} is missing from this tinylm install; reinstall tinylm "
                "(pip install -e . from the repository) or point data.train at a local file"
            )
        return remote.path
    fetch = fetch or download  # looked up per call, so tests can replace the module's download
    path = local_path(dataset, remote, cache)
    if path.is_file():
        return path
    if os.environ.get(env_var(dataset.name)):
        raise DataError(
            f"{env_var(dataset.name)} points at '{path}', which does not exist; fix the variable"
        )
    print(f"data: downloading {dataset.name} ({remote.url}) to {path}")
    try:
        fetch(remote.url, path, remote.sha256)
    except OSError as e:  # URLError, timeouts, DNS failures are all OSErrors
        raise DataError(
            f"could not download '{dataset.name}' from {remote.url} ({e}). If you are offline: put the file at "
            f"{path}, or set {env_var(dataset.name)} to a local copy, or point data.train at a local file "
            f"(e.g. data.train=path/to/{remote.filename})."
        ) from None
    return path


def lookup(spec: str) -> NamedDataset | None:
    """The registered dataset a spec names (synthetic-stories:N included), or None."""
    if is_synthetic(spec):
        return REGISTRY[SYNTHETIC]
    return REGISTRY.get(spec)


def refuse_misspelled_name(spec: str) -> None:
    """DataError for a spec that is no path but close to a registered name (`tinyshakspeare`)."""
    if Path(spec).expanduser().exists() or any(c in spec for c in "/*:"):
        return
    if near := did_you_mean(spec, REGISTRY):
        raise DataError(f"data source '{spec}' is not a file or a registered dataset.{near}")


def resolve_named(spec: str, cache: Path) -> tuple[list[str], list[str]]:
    """(train specs, val specs) for a spec: registered names become local files; others pass through."""
    dataset = lookup(spec)
    if dataset is None:
        refuse_misspelled_name(spec)
    if dataset is None or is_synthetic(spec):
        return [spec], []
    train = [str(ensure_file(dataset, r, cache)) for r in dataset.train]
    val = [str(ensure_file(dataset, r, cache)) for r in dataset.val]
    return train, val
