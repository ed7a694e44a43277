"""Does the validation set tell the truth? Leak and mismatch checks between train and val tokens.

`check_split(data)` compares the train and val token arrays of a resolved data section (a sample
of each when they are large) and returns a `Report`:

- exact duplicates: val documents (between end-of-text ids) whose ids also form a train document;
- 13-gram overlap: word 13-grams of val (lower-cased `\\w+` words of the decoded text, as in the
  contamination checks of GPT-3 and later papers) found in train, as a share of val 13-grams,
  and the share of val words such a 13-gram covers (64-bit hashes: a false match is ~1e-9);
- distribution distance: Jensen-Shannon divergence (bits, 0..1) of the token and the character
  unigram distributions, and the ratio of median document lengths;
- unknown rate: val tokens the training tokenizer could not represent (`<|unk|>` of a char
  tokenizer) or that never occur in the train sample;
- mixtures: each source's share of the train mixture (its weight) against its share of val.

Each measure has a threshold (`THRESHOLDS`, overridable) above which it is flagged; the verdict
line names the worst. The same function runs on a small sample at the start of `tinylm train`
(`quick_check`, about a second on the quickstart) and in full from `tinylm data check`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinylm.tokenizer.base import Tokenizer

NGRAM = 13
# Flag above these. Measured on the shipped split (eight plays vs The Tempest, char tokenizer,
# notes/issue-23-data.md): 13-gram overlap 0.07%, token JS 0.004, char JS 0.004, unseen 0.0%,
# median length ratio 0.8; TinyStories as val for the plays: token JS 0.06, 13-grams 0%.
THRESHOLDS: dict[str, float] = {
    "duplicates": 0.005,  # share of val documents that are exact copies of train documents
    "ngram": 0.01,  # share of val 13-grams found in train
    "js_token": 0.03,  # Jensen-Shannon divergence of token unigrams, bits
    "js_char": 0.03,  # the same over characters
    "length_ratio": 4.0,  # median document length, val vs train (either way)
    "unknown": 0.005,  # share of val tokens unknown to / never seen in train
    "mixture": 0.25,  # |train weight share - val token share| of any source
}
# Distances and unknown rates are flagged above `threshold + REFERENCE_FACTOR * reference`, the
# reference being the same measure inside train (see check_split).
REFERENCE_FACTOR = 2.0
SAMPLE_BLOCKS = 32  # a large split is sampled as this many contiguous blocks, evenly spread
_WORD = re.compile(r"\w+")


@dataclass
class Report:
    """What `check_split` measured, what it flagged, and the one-line verdict."""

    metrics: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)  # metric -> why it is flagged
    verdict: str = ""
    sampled: dict[str, int] = field(default_factory=dict)  # tokens read per split
    seconds: float = 0.0

    def table(self) -> str:
        """A short table: check, value, the same measure between parts of train, threshold, flag."""

        def show(name: str, value: float | None) -> str:
            if value is None:
                return "-"
            return f"{value:.2%}" if name in _PERCENT else f"{value:.3f}"

        rows = [("check", "value", "within train", "threshold", "")]
        for name, limit in THRESHOLDS.items():
            ref = self.metrics.get(f"{name}_reference")
            if ref is not None:  # the threshold in force: see REFERENCE_FACTOR
                limit += REFERENCE_FACTOR * ref
            if name in self.metrics:
                rows.append(
                    (
                        _LABELS[name],
                        show(name, self.metrics[name]),
                        show(name, ref),
                        show(name, limit),
                        "FLAG" if name in self.flags else "ok",
                    )
                )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"thresholds": THRESHOLDS}

    def write(self, path: str | Path) -> Path:
        from tinylm.fileio import atomic_write_bytes

        path = Path(path)
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=1).encode())
        return path


_PERCENT = {"duplicates", "ngram", "unknown"}
_LABELS = {
    "duplicates": "duplicate val documents in train",
    "ngram": f"val {NGRAM}-grams found in train",
    "js_token": "token unigram distance (JS, bits)",
    "js_char": "character unigram distance (JS, bits)",
    "length_ratio": "median document length, val/train",
    "unknown": "val tokens unknown to train",
    "mixture": "largest mixture share gap",
}


def _sample(tokens: Any, budget: int) -> np.ndarray:
    """All of a split, or `SAMPLE_BLOCKS` contiguous blocks spread over it (int64)."""
    n = len(tokens)
    if n <= budget:
        return np.asarray(tokens[0:n], dtype=np.int64)
    block = budget // SAMPLE_BLOCKS
    starts = np.linspace(0, n - block, SAMPLE_BLOCKS).astype(np.int64)
    return np.concatenate([np.asarray(tokens[int(s) : int(s) + block]) for s in starts]).astype(
        np.int64
    )


def _documents(ids: np.ndarray, eot: int | None) -> list[np.ndarray]:
    """The documents between end-of-text ids (the first and last may be cut by sampling)."""
    if eot is None:
        return [ids]
    cuts = np.flatnonzero(ids == eot)
    return [d for d in np.split(ids, cuts + 1) if d.size and not (d.size == 1 and d[0] == eot)]


def _strip(doc: np.ndarray, eot: int | None) -> np.ndarray:
    return doc[:-1] if eot is not None and doc.size and doc[-1] == eot else doc


def _reference(train_docs: list[np.ndarray], train_ids: np.ndarray, size: int) -> np.ndarray:
    """Train's last whole documents adding up to about `size` tokens (at most half of train).

    With too few documents for that, the last `size` tokens (at most half) instead.
    """
    size = min(size, train_ids.size // 2)
    taken, n = [], 0
    for doc in reversed(train_docs[1:]):
        if n >= size:
            break
        taken.append(doc)
        n += doc.size
    if not taken or n > train_ids.size // 2:
        return train_ids[train_ids.size - size :]
    return np.concatenate(taken[::-1])


def _js(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same distribution, 1 = disjoint)."""
    p = p_counts / max(p_counts.sum(), 1)
    q = q_counts / max(q_counts.sum(), 1)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, (kl(p) + kl(q)) / 2)


class _Text:
    """Decoding ids to text by gathering each token's UTF-8 bytes with NumPy (no Python loop)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        eot = tokenizer.eot_id
        pieces = [
            b" " if i == eot else tokenizer.decode([i]).encode("utf-8", "replace")
            for i in range(tokenizer.vocab_size)
        ]
        self.lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)

    def __call__(self, ids: np.ndarray) -> str:
        lengths = self.lengths[ids]
        ends = np.cumsum(lengths)
        # Output byte k comes from flat[starts[id] + (k - first output byte of that token)].
        index = np.arange(int(ends[-1]) if ends.size else 0) + np.repeat(
            self.starts[ids] - (ends - lengths), lengths
        )
        return self.flat[index].tobytes().decode("utf-8", "replace")


def _ngram_hashes(words: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """A 64-bit hash of every run of `n` word ids (sum of ids times random odd constants)."""
    if words.size < n:
        return np.empty(0, dtype=np.uint64)
    mult = np.random.default_rng(NGRAM).integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)
    w = words.astype(np.uint64) + np.uint64(1)
    h = np.zeros(words.size - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h += w[k : k + h.size] * mult[k]
    return h


def check_split(
    train: Sequence[tuple[str, Any, float]],
    val: Mapping[str, Any],
    tokenizer: Tokenizer,
    *,
    sample_tokens: int = 64 << 20,
    thresholds: Mapping[str, float] | None = None,
) -> Report:
    """Compare train `(name, tokens, weight)` sources with val `{name: tokens}` (see the module doc)."""
    start = time.perf_counter()
    limits = {**THRESHOLDS, **(thresholds or {})}
    report = Report()
    if not val:
        report.verdict = "no validation set to check (data.val_fraction=0 and no data.val)"
        return report
    eot = tokenizer.eot_id
    total_train = sum(len(t) for _, t, _ in train) or 1
    train_ids = np.concatenate(
        [_sample(t, max(NGRAM, sample_tokens * len(t) // total_train)) for _, t, _ in train]
    )
    total_val = sum(len(t) for t in val.values()) or 1
    val_ids = np.concatenate(
        [_sample(t, max(NGRAM, sample_tokens // 4 * len(t) // total_val)) for t in val.values()]
    )
    report.sampled = {"train": int(train_ids.size), "val": int(val_ids.size)}
    m = report.metrics

    # Exact duplicate documents (only whole documents: those with an end-of-text id after them).
    train_docs = _documents(train_ids, eot)
    val_docs = _documents(val_ids, eot)
    seen = {hashlib.blake2b(_strip(d, eot).tobytes(), digest_size=16).digest() for d in train_docs}
    dup = sum(
        hashlib.blake2b(_strip(d, eot).tobytes(), digest_size=16).digest() in seen for d in val_docs
    )
    m["duplicates"] = dup / max(len(val_docs), 1)
    m["duplicate_documents"] = dup
    m["val_documents"] = len(val_docs)

    # Word 13-grams.
    text = _Text(tokenizer)
    train_text, val_text = text(train_ids), text(val_ids)
    # Python's string hash (the same for both splits within this process) names each word.
    words = [
        np.fromiter(map(hash, _WORD.findall(t.lower())), np.int64) for t in (train_text, val_text)
    ]
    train_h, val_h = _ngram_hashes(words[0]), _ngram_hashes(words[1])
    if val_h.size:
        known = np.sort(train_h)
        at = np.minimum(np.searchsorted(known, val_h), max(known.size - 1, 0))
        hit = known[at] == val_h if known.size else np.zeros(val_h.size, dtype=bool)
        m["ngram"] = float(hit.mean())
        covered = np.zeros(words[1].size + 1, dtype=np.int64)
        np.add.at(covered, np.flatnonzero(hit), 1)
        np.add.at(covered, np.flatnonzero(hit) + NGRAM, -1)
        m["ngram_val_words_covered"] = float((np.cumsum(covered)[:-1] > 0).mean())

    # Distributions, each against a reference: the same measure between train's last documents
    # (about val's size) and the rest of train. A sample of a big vocabulary is never complete
    # (GPT-2 ids: a held-out play has 4% of its tokens unseen in seven others, token JS 0.15),
    # so "val is unlike train" means "more unlike than train is unlike itself".
    vocab_size = tokenizer.vocab_size
    ref_ids = _reference(train_docs, train_ids, val_ids.size)
    tc, vc, fc = (
        np.bincount(a, minlength=vocab_size).astype(np.float64)
        for a in (train_ids, val_ids, ref_ids)
    )
    if eot is not None:
        tc[eot] = vc[eot] = fc[eot] = 0
    m["js_token"], m["js_token_reference"] = _js(tc, vc), _js(tc - fc, fc)
    codes = [
        np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32)
        for t in (train_text, val_text, text(ref_ids) if ref_ids.size else "")
    ]
    top = max(int(c.max()) if c.size else 0 for c in codes) + 1
    ct, cv, cf = (np.bincount(c, minlength=top).astype(np.float64) for c in codes)
    m["js_char"], m["js_char_reference"] = _js(ct, cv), _js(ct - cf, cf)
    whole_train = [d.size for d in train_docs if eot is not None and d[-1] == eot]
    whole_val = [d.size for d in val_docs if eot is not None and d[-1] == eot]
    if whole_train and whole_val:
        m["length_ratio"] = float(np.median(whole_val) / max(np.median(whole_train), 1))
    unk = getattr(tokenizer, "unk_id", None)
    unknown = (vc[tc == 0]).sum() + (vc[unk] if unk is not None and tc[unk] > 0 else 0)
    m["unknown"] = float(unknown / max(vc.sum(), 1))
    m["unknown_reference"] = float(fc[(tc - fc) == 0].sum() / max(fc.sum(), 1))

    # Mixture shares.
    if len(train) > 1:
        weights = sum(w for _, _, w in train) or 1.0
        shares = {}
        for name, _, w in train:
            shares[name] = {"train": w / weights, "val": len(val.get(name, ())) / total_val}
        m["mixture_shares"] = shares
        m["mixture"] = max(abs(s["train"] - s["val"]) for s in shares.values())

    _flag(report, limits)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _flag(report: Report, limits: Mapping[str, float]) -> None:
    m, flags = report.metrics, report.flags
    if m.get("duplicates", 0) > limits["duplicates"]:
        flags["duplicates"] = (
            f"{m['duplicate_documents']:,} of {m['val_documents']:,} val documents "
            f"({m['duplicates']:.1%}) are exact copies of train documents"
        )
    if m.get("ngram", 0) > limits["ngram"]:
        flags["ngram"] = (
            f"val overlaps train: {m['ngram']:.0%} of val {NGRAM}-grams appear in train"
        )
    for key, what in (("js_token", "token"), ("js_char", "character")):
        ref = m.get(f"{key}_reference", 0.0)
        if m.get(key, 0) > limits[key] + REFERENCE_FACTOR * ref:
            flags[key] = (
                f"val does not look like train: {what} distributions differ (JS {m[key]:.3f} bits; "
                f"{ref:.3f} between parts of train)"
            )
    r = m.get("length_ratio")
    if r is not None and not 1 / limits["length_ratio"] <= r <= limits["length_ratio"]:
        flags["length_ratio"] = f"val documents are {r:.2g}x as long as train's (median)"
    ref = m.get("unknown_reference", 0.0)
    if m.get("unknown", 0) > limits["unknown"] + REFERENCE_FACTOR * ref:
        flags["unknown"] = (
            f"{m['unknown']:.1%} of val tokens never occur in train ({ref:.1%} for a part of train)"
        )
    if m.get("mixture", 0) > limits["mixture"]:
        worst = max(m["mixture_shares"].items(), key=lambda kv: abs(kv[1]["train"] - kv[1]["val"]))
        flags["mixture"] = (
            f"source '{worst[0]}' is {worst[1]['train']:.0%} of the training mixture but "
            f"{worst[1]['val']:.0%} of val"
        )
    if flags:
        report.verdict = "; ".join(flags.values())
    else:
        report.verdict = (
            f"val looks clean: {m.get('ngram', 0):.1%} of val {NGRAM}-grams appear in train, "
            f"{m.get('duplicate_documents', 0)} duplicate documents, token JS {m.get('js_token', 0):.3f} bits"
        )


def parse_fail_on(spec: str) -> dict[str, float] | None:
    """`--fail-on any` -> {} (any flag fails); `ngram=0.05,duplicates=0` -> those thresholds."""
    if spec in ("", "any"):
        return {}
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in THRESHOLDS or not value:
            raise ValueError(
                f"--fail-on {part!r}: expected NAME=VALUE with NAME one of {', '.join(THRESHOLDS)}, or 'any'"
            )
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--fail-on {part!r}: {value!r} is not a number") from None
        if not out[name] >= 0:
            raise ValueError(f"--fail-on {part!r}: thresholds are >= 0")
    return out


REPORT_NAME = "data_check.json"
# The start-of-training sample: 1.5 M train tokens (all of the quickstart's 1.05 M) keeps the check
# near a second on 2 loaded cores (notes/issue-23-data.md), long enough to catch a leak of any size.
START_SAMPLE_TOKENS = 3 << 19


def start_check(
    train: Sequence[tuple[str, Any, float]], val: Mapping[str, Any], tokenizer: Tokenizer
) -> tuple[Report | None, str]:
    """The check at the start of `tinylm train`: (report, the one line for the run's header).

    A failure of the check itself never stops a run: it is reported in that line instead.
    """
    if all(name.startswith("synthetic-stories") for name, _, _ in train):
        # The generator's templates repeat by design (66% of val 13-grams recur): nothing to learn.
        return None, "data check: skipped (generated synthetic stories)"
    try:
        report = check_split(train, val, tokenizer, sample_tokens=START_SAMPLE_TOKENS)
    except Exception as e:  # a diagnostic: training must not depend on it
        return None, f"data check: skipped ({type(e).__name__}: {e})"
    if report.flags:
        return report, (
            f"data check: warning: {report.verdict} (see {REPORT_NAME} in the run directory, "
            "or `tinylm data check`)"
        )
    return report, f"data check: {report.verdict} ({report.seconds:.1f} s)"
