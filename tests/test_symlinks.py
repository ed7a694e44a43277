"""No file tinylm writes is ever written through a symbolic link (issue 21, item 3).

A link planted where tinylm writes (a `.lock`, `metrics.jsonl`, a temporary name, an output
file) points at a "victim" file elsewhere; after each writer ran, the victim holds exactly what
it held before. Writers that replace their file atomically replace the link itself; writers that
open a file in place (locks, appended logs) refuse the link in one line, exit status 2.
"""

from __future__ import annotations

import datetime
import json
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
from helpers import run_cli, train_two_steps

from tinylm import crash
from tinylm.config import load_config
from tinylm.fileio import atomic_write_text, create_new, open_append, temp_name
from tinylm.locks import DirectoryLock
from tinylm.train.checkpoint import CheckpointError
from tinylm.train.sinks import RunLogger

SECRET = "the victim's own content\n"


@pytest.fixture()
def victim(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "victim.txt"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


def _link(at: Path, victim: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(victim)
    return at


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """A two-step run (copied per test that changes it)."""
    return train_two_steps(tmp_path_factory.mktemp("symlinks"), corpus)


@pytest.fixture()
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# ---- the helpers every writer uses


@pytest.mark.parametrize("where", ["final", "temp"])
def test_atomic_write_replaces_a_link_and_never_follows_one(tmp_path, victim, where):
    """config.yaml, tokenizer.json, meta.json, shards, sweep.json, results, exports, ..."""
    target = tmp_path / "out" / "config.yaml"
    _link(target if where == "final" else temp_name(target), victim)
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and not target.is_symlink()
    assert victim.read_text() == SECRET
    assert not temp_name(target).exists() and not temp_name(target).is_symlink()


def test_append_and_create_refuse_a_link(tmp_path, victim):
    """metrics.jsonl, sweep logs, harness metrics (append); reports, downloads (create)."""
    link = _link(tmp_path / "metrics.jsonl", victim)
    for opener in (lambda: open_append(link), lambda: open_append(link, truncate=True)):
        with pytest.raises(OSError) as e:
            opener()
        assert "symbolic link" in crash_free_message(e.value, link)
    with pytest.raises(FileExistsError):
        create_new(link)
    assert victim.read_text() == SECRET


def crash_free_message(e: OSError, path: Path) -> str:
    from tinylm.fileio import os_error_message

    return os_error_message(e, path, "write")


# ---- locks


def test_lock_refuses_a_link(tmp_path, victim):
    _link(tmp_path / "d" / ".lock", victim)
    with pytest.raises(RuntimeError, match="symbolic link"):
        DirectoryLock(tmp_path / "d", "train", wait=False).acquire()
    assert victim.read_text() == SECRET


def test_train_resume_never_writes_through_a_linked_lock(run, victim, capsys):
    _link(run / ".lock", victim)
    assert run_cli("train", "--resume", run, "train.max_steps=3") == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and ".lock" in err and "Traceback" not in err
    assert victim.read_text() == SECRET and (run / ".lock").is_symlink()


def test_prepare_never_writes_through_a_linked_lock(tmp_path, corpus, victim, capsys):
    out = tmp_path / "prepared"
    _link(out / ".lock", victim)
    assert run_cli("prepare", corpus, "--out", out, "--workers", "1") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert victim.read_text() == SECRET


# ---- run files


def test_metrics_file_of_a_new_run_refuses_a_link(tmp_path, victim):
    _link(tmp_path / "r" / "metrics.jsonl", victim)
    cfg = load_config("tiny")
    with pytest.raises(CheckpointError, match="symbolic link"):
        RunLogger(tmp_path / "r", cfg.log, enabled=True, run_name="r", config_dict={}, max_steps=1)
    assert victim.read_text() == SECRET


def test_resume_replaces_linked_run_files_without_touching_their_targets(run, victim, tmp_path):
    """metrics.jsonl is cut and rewritten on resume; config.yaml and tokenizer.json rewritten."""
    victims = {}
    for name in ("metrics.jsonl", "config.yaml", "tokenizer.json"):
        copy = tmp_path / f"victim-{name}"
        copy.write_bytes((run / name).read_bytes())
        (run / name).unlink()
        _link(run / name, copy)
        victims[copy] = copy.read_bytes()
    assert run_cli("train", "--resume", run, "train.max_steps=3") == 0
    for path, content in victims.items():
        assert path.read_bytes() == content
    assert not (run / "metrics.jsonl").is_symlink()
    assert victim.read_text() == SECRET


def test_plot_replaces_a_linked_output(run, victim, tmp_path):
    out = _link(tmp_path / "curves.png", victim)
    assert run_cli("plot", run, "--out", out) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and not out.is_symlink()
    assert victim.read_text() == SECRET


def test_export_force_replaces_linked_files(run, victim, tmp_path):
    out = tmp_path / "hf"
    _link(out / "config.json", victim)
    assert run_cli("export", run, "--out", out, "--force") == 0
    assert json.loads((out / "config.json").read_text())["model_type"]
    assert victim.read_text() == SECRET


def test_tokenizer_export_replaces_linked_files(tmp_path, victim):
    from tinylm.tokenizer.base import EOT
    from tinylm.tokenizer.bpe_train import train_bpe

    texts = ["a few words to merge, a few words to merge"] * 20
    tok = train_bpe(texts=texts, vocab_size=270, special_tokens=[EOT], num_workers=1).tokenizer()
    vocab, merges = _link(tmp_path / "vocab.json", victim), tmp_path / "merges.txt"
    tok.save_gpt2(vocab, merges)
    tok.save_hf(_link(tmp_path / "tokenizer.json", victim))
    assert json.loads(vocab.read_text()) and merges.read_text().startswith("#version")
    assert victim.read_text() == SECRET


def test_crash_report_never_writes_through_a_link(tmp_path, victim, monkeypatch):
    """A link at the report's name: the report goes to the next directory instead."""

    class FixedClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(crash.datetime, "datetime", FixedClock)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    import os

    _link(run_dir / f"{crash.REPORT_PREFIX}20260102-030405-{os.getpid()}.txt", victim)
    path = crash.write_report(Namespace(run_dir=run_dir), ["x"], RuntimeError("boom"))
    assert path is not None and path.parent != run_dir and "boom" in path.read_text()
    assert victim.read_text() == SECRET
