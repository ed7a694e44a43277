"""`tinylm data check` and the start-of-training check: constructed leaks and mismatches are each
flagged, the shipped split (eight plays vs The Tempest) is not."""

from __future__ import annotations

import json
import random
import time

import pytest
from helpers import SMALL, run_cli

from tinylm.config import DataConfig, DataSourceConfig
from tinylm.data import resolve_data
from tinylm.data.check import THRESHOLDS, check_split, parse_fail_on, start_check

QUIET = {"log": lambda _: None}
EOT = "<|endoftext|>"
WORDS = [
    "the",
    "a",
    "king",
    "queen",
    "sword",
    "crown",
    "river",
    "mountain",
    "castle",
    "forest",
    "night",
    "morning",
    "storm",
    "ship",
    "sailor",
    "letter",
    "promise",
    "secret",
    "garden",
    "bird",
    "song",
    "winter",
    "summer",
    "fire",
    "stone",
    "road",
    "bridge",
    "tower",
    "bell",
    "whispered",
    "carried",
    "followed",
    "remembered",
    "opened",
    "watched",
    "under",
    "over",
    "beyond",
    "beside",
    "quietly",
]


def _docs(seed: int, n: int, words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "." for _ in range(n)]


def _write(path, docs: list[str]):
    path.write_text(f"\n{EOT}\n".join(docs))
    return str(path)


def _check(train: str, val: str, **kw):
    data = resolve_data(DataConfig(train=train, val=val, num_workers=1, **kw), None, 8, **QUIET)
    return check_split(data.train, data.val, data.tokenizer)


def test_shipped_split_is_clean_and_the_start_check_is_fast():
    data = resolve_data(DataConfig(train="shakespeare", num_workers=1), None, 128, **QUIET)
    t0 = time.perf_counter()
    report, line = start_check(data.train, data.val, data.tokenizer)
    seconds = time.perf_counter() - t0
    assert report is not None and not report.flags, report.verdict
    assert line.startswith("data check: val looks clean")
    assert report.metrics["ngram"] < THRESHOLDS["ngram"] / 2
    assert report.sampled["train"] == len(data.train[0][1])  # the quickstart is read whole
    assert seconds < 10  # 0.7 s at load 12 on 2 cores; a guard against a gross regression only


def test_clean_split_of_independent_documents_is_not_flagged(tmp_path):
    report = _check(
        _write(tmp_path / "t.txt", _docs(1, 80)), _write(tmp_path / "v.txt", _docs(2, 10))
    )
    assert not report.flags, report.verdict
    assert report.metrics["duplicates"] == 0 and report.metrics["ngram"] < 0.01


def test_duplicated_documents_and_13_gram_leak_are_flagged(tmp_path):
    train = _docs(1, 80)
    val = _docs(2, 8) + train[:4]  # a third of val copied from train
    report = _check(_write(tmp_path / "t.txt", train), _write(tmp_path / "v.txt", val))
    assert {"duplicates", "ngram"} <= set(report.flags)
    assert report.metrics["duplicate_documents"] == 4
    assert 0.25 < report.metrics["ngram"] < 0.45
    assert "of val 13-grams appear in train" in report.verdict


def test_paraphrase_free_partial_overlap_is_a_13_gram_leak_not_a_duplicate(tmp_path):
    train = _docs(1, 80)
    # Val documents each quote a 60-word passage of a train document inside new text.
    val = [d + " " + " ".join(t.split()[:60]) for d, t in zip(_docs(2, 12), train, strict=False)]
    report = _check(_write(tmp_path / "t.txt", train), _write(tmp_path / "v.txt", val))
    assert "ngram" in report.flags and "duplicates" not in report.flags


def test_val_from_another_domain_is_flagged(tmp_path, shared_data):
    plays = sorted((shared_data / "shakespeare_plays").glob("*"))[:3]
    train = _write(tmp_path / "t.txt", [p.read_text() for p in plays])
    report = _check(train, "synthetic-stories:200")
    assert "js_char" in report.flags or "js_token" in report.flags, report.metrics


def test_unknown_characters_and_length_mismatch_are_flagged(tmp_path):
    train = _write(tmp_path / "t.txt", _docs(1, 60))
    val = _write(tmp_path / "v.txt", ["Жили-были король и королева " * 3] * 40)
    report = _check(train, val)
    assert "unknown" in report.flags and report.metrics["unknown"] > 0.5
    assert "length_ratio" in report.flags  # ~90 characters against ~800


def test_mixture_shares_that_differ_are_flagged(tmp_path):
    a = _write(tmp_path / "a.txt", _docs(1, 200))
    b = _write(tmp_path / "b.txt", _docs(3, 20, words=40))
    cfg = DataConfig(
        mix=[DataSourceConfig(path=a, weight=0.1), DataSourceConfig(path=b, weight=0.9)],
        num_workers=1,
        val_fraction=0.2,
    )
    data = resolve_data(cfg, None, 8, **QUIET)
    report = check_split(data.train, data.val, data.tokenizer)
    assert "mixture" in report.flags and "of the training mixture but" in report.verdict
    shares = report.metrics["mixture_shares"]
    assert shares["b"]["train"] == pytest.approx(0.9) and shares["b"]["val"] < 0.1


def test_cli_table_verdict_report_and_fail_on(tmp_path, capsys):
    train = _write(tmp_path / "t.txt", _docs(1, 60))
    leak = _write(tmp_path / "v.txt", _docs(1, 60)[:6])
    clean = _write(tmp_path / "c.txt", _docs(2, 6))
    out = tmp_path / "r.json"
    assert run_cli("data", "check", train, "--val", leak, "--report", out) == 0  # no --fail-on
    text = capsys.readouterr().out
    assert "val 13-grams found in train" in text and "FLAG" in text
    assert json.loads(out.read_text())["flags"]["duplicates"]
    assert run_cli("data", "check", train, "--val", leak, "--fail-on", "any") == 1
    assert run_cli("data", "check", train, "--val", clean, "--fail-on", "any") == 0
    assert run_cli("data", "check", train, "--val", leak, "--fail-on", "unknown=0.5") == 0


def test_fail_on_parsing():
    assert parse_fail_on("any") == {}
    assert parse_fail_on("ngram=0.05,duplicates=0") == {"ngram": 0.05, "duplicates": 0.0}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_fail_on("ngrams=1")


def test_training_warns_and_writes_the_report(tmp_path, capsys):
    train = _write(tmp_path / "t.txt", _docs(1, 60))
    leak = _write(tmp_path / "v.txt", _docs(1, 60)[:6])
    code = run_cli(
        "train", "tiny", *SMALL, f"data.train={train}", f"data.val={leak}", f"out_dir={tmp_path}",
        "run_name=r", "train.max_steps=1", "eval.interval=0", "eval.samples=0",
    )  # fmt: skip
    assert code == 0
    assert "data check: warning: " in capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "data_check.json").read_text())
    assert report["flags"]["duplicates"]


def test_explicit_val_wins_over_a_named_datasets_own_val(tmp_path):
    val = _write(tmp_path / "v.txt", _docs(2, 5))
    data = resolve_data(DataConfig(train="shakespeare", val=val, num_workers=1), None, 8, **QUIET)
    (tokens,) = data.val.values()
    assert tokens.num_documents == 5  # not The Tempest
