"""resolve_data: caching, mixtures, prepared directories, size checks; the registry; the CLI."""

from __future__ import annotations

import hashlib
import urllib.error

import pytest

from tinylm import cli
from tinylm.config import DataConfig, DataSourceConfig
from tinylm.data import prepare as prep
from tinylm.data import registry, resolve_data
from tinylm.data.errors import DataError
from tinylm.data.synthetic import DEFAULT_STORIES, generate_stories, story
from tinylm.tokenizer import CharTokenizer

QUIET = {"log": lambda _: None}


def test_synthetic_default_is_prepared_once_then_reused(tmp_path, monkeypatch):
    cfg = DataConfig(train="synthetic-stories:300", num_workers=1)
    first = resolve_data(cfg, None, 64, **QUIET)
    name, tokens, weight = first.train[0]
    assert name == "synthetic-stories" and weight == 1.0 and len(tokens) > 100_000
    assert set(first.val) == {"synthetic-stories"} and first.val[name].num_documents > 10
    assert first.tokenizer.decode(tokens[0:9].tolist()) == story(0, 0)[:9]
    monkeypatch.setattr(prep, "prepare", lambda *a, **k: pytest.fail("prepared again"))
    again = resolve_data(cfg, None, 64, **QUIET)
    assert again.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert len(again.train[0][1]) == len(tokens)


def test_changed_source_file_is_prepared_again(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello world " * 100)
    cfg = DataConfig(train=str(path), num_workers=1)
    n1 = len(resolve_data(cfg, None, 16, **QUIET).train[0][1])
    path.write_text("hello world " * 200)
    assert len(resolve_data(cfg, None, 16, **QUIET).train[0][1]) > n1


def test_too_small_dataset_says_how_much_and_what_to_do(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("just a few characters here")
    with pytest.raises(DataError) as e:
        resolve_data(DataConfig(train=str(path), num_workers=1), None, 256, **QUIET)
    msg = str(e.value)
    assert "257" in msg and "model.context_length=" in msg and "tokens" in msg


def test_empty_source_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(Exception, match="empty"):
        resolve_data(DataConfig(train=str(tmp_path / "empty.txt")), None, 8, **QUIET)


def test_mixture_names_weights_and_per_dataset_val(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("<|endoftext|>".join(f"alpha {i} " * 20 for i in range(40)))
    b.write_text("\n".join(f'{{"text": "beta {i} {"x" * 50}"}}' for i in range(40)))
    cfg = DataConfig(
        mix=[
            DataSourceConfig(path=str(a), weight=0.2),
            DataSourceConfig(path=str(b), weight=0.8, name="bee"),
        ],
        num_workers=1,
    )
    data = resolve_data(cfg, None, 16, **QUIET)
    assert [(n, w) for n, _, w in data.train] == [("a", 0.2), ("bee", 0.8)]
    assert set(data.val) == {"a", "bee"}
    assert "x" in data.tokenizer.decode(data.train[1][1][0:60].tolist())


def test_prepared_directory_is_used_directly_and_other_tokenizers_refused(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("<|endoftext|>".join(f"story {i} " * 10 for i in range(30)))
    tok = prep.fit_char_tokenizer([str(path)])
    ds = prep.prepare([str(path)], tmp_path / "ds", tok, **QUIET)
    data = resolve_data(DataConfig(train=str(tmp_path / "ds")), None, 16, **QUIET)
    assert data.tokenizer.fingerprint() == tok.fingerprint() and len(
        data.train[0][1]
    ) == ds.num_tokens("train")
    with pytest.raises(DataError, match="different tokenizer"):
        resolve_data(
            DataConfig(train=str(tmp_path / "ds")),
            CharTokenizer(list("story 0123456789")),
            16,
            **QUIET,
        )


def test_explicit_val_source(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("<|endoftext|>".join(f"train doc {i} " * 5 for i in range(30)))
    val.write_text("<|endoftext|>".join(f"valid doc {i} " * 5 for i in range(10)))
    data = resolve_data(
        DataConfig(train=str(train), val=str(val), num_workers=1), None, 16, **QUIET
    )
    assert data.val["train"].num_documents == 10 and data.train[0][1].num_documents == 30


def test_registry_offline_message_names_path_and_variable(tmp_path, monkeypatch):
    def offline(url, dest, sha256):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(registry, "download", offline)
    with pytest.raises(DataError) as e:
        resolve_data(DataConfig(train="tinyshakespeare"), None, 16, **QUIET)
    msg = str(e.value)
    assert "TINYLM_DATA_TINYSHAKESPEARE" in msg and "downloads/tinyshakespeare/input.txt" in msg
    assert "data.train=" in msg


def test_registry_env_override_and_checked_download(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("TINYLM_DATA_TINYSHAKESPEARE", str(shared_data / "tinyshakespeare.txt"))
    train, val = registry.resolve_named("tinyshakespeare", tmp_path)
    assert train == [str(shared_data / "tinyshakespeare.txt")] and val == []
    # download() itself, offline, through a file:// URL: checksum verified, atomic rename.
    src = tmp_path / "src.txt"
    src.write_bytes(b"some bytes")
    good = hashlib.sha256(b"some bytes").hexdigest()
    registry.download(src.as_uri(), tmp_path / "dl" / "ok.txt", good)
    assert (tmp_path / "dl" / "ok.txt").read_bytes() == b"some bytes"
    with pytest.raises(DataError, match="SHA-256"):
        registry.download(src.as_uri(), tmp_path / "dl" / "bad.txt", "0" * 64)
    assert not list((tmp_path / "dl").glob("bad.txt*"))


def test_synthetic_stories_are_deterministic_varied_and_sized():
    a = list(generate_stories(200, seed=3))
    assert a == list(generate_stories(200, seed=3)) and a != list(generate_stories(200, seed=4))
    assert list(generate_stories(50, seed=3)) == a[:50]  # a prefix does not depend on n
    assert len(set(a)) == 200 and len({s.split(".")[1] for s in a}) > 20
    assert sum('"' in s for s in a) > 150  # dialogue
    size = sum(len(s) for s in generate_stories(DEFAULT_STORIES))
    assert 2_000_000 <= size <= 4_000_000


def test_cli_prepare_and_datasets(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("<|endoftext|>".join(f"doc {i} " * 20 for i in range(50)))
    out = tmp_path / "ds"
    assert (
        cli.main(["prepare", str(src), "--out", str(out), "--workers", "1", "--val-count", "5"])
        == 0
    )
    assert "val: " in capsys.readouterr().out and (out / "meta.json").exists()
    assert cli.main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["datasets"]) == 0 and "tinyshakespeare" in capsys.readouterr().out
    assert (
        cli.main(["datasets", "write", "synthetic-stories:20", "--out", str(tmp_path / "s.txt")])
        == 0
    )
    assert (tmp_path / "s.txt").read_text().count("<|endoftext|>") == 20


@pytest.mark.parametrize("source_kind", ["txt", "jsonl"])
def test_bpe_tokenizer_trained_on_the_data_and_cached(tmp_path, monkeypatch, source_kind):
    """data.tokenizer=bpe:N trains our BPE on the training sources once, then reuses it."""
    import json

    from tinylm.tokenizer.bpe import BPETokenizer
    from tinylm.tokenizer.bpe_train import train_bpe as real_train_bpe

    docs = [story(i, 3) for i in range(200)]
    if source_kind == "txt":
        path = tmp_path / "stories.txt"
        path.write_text("<|endoftext|>".join(docs))
    else:
        path = tmp_path / "stories.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(train=str(path), tokenizer="bpe:400", num_workers=1)
    calls = []
    monkeypatch.setattr(
        "tinylm.tokenizer.bpe_train.train_bpe",
        lambda *a, **k: calls.append(1) or real_train_bpe(*a, **k),
    )
    first = resolve_data(cfg, None, 32, **QUIET)
    assert isinstance(first.tokenizer, BPETokenizer) and first.tokenizer.vocab_size == 400
    assert first.tokenizer.eot_id is not None
    _, tokens, _ = first.train[0]
    assert first.tokenizer.decode(tokens[: len(tokens) // 20].tolist()).startswith(docs[0][:50])
    again = resolve_data(cfg, None, 32, **QUIET)
    assert again.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert len(calls) == 1  # trained once, then read from the cache


def test_bad_bpe_spec(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("some text " * 100)
    with pytest.raises(DataError, match="bpe:VOCAB_SIZE"):
        resolve_data(DataConfig(train=str(path), tokenizer="bpe:lots"), None, 8, **QUIET)


def test_prepare_command_trains_bpe_on_its_sources(tmp_path, capsys):
    path = tmp_path / "stories.txt"
    path.write_text("<|endoftext|>".join(story(i, 4) for i in range(100)))
    out = tmp_path / "prepared"
    args = ["prepare", str(path), "--tokenizer", "bpe:300", "--out", str(out), "--workers", "1"]
    assert cli.main([*args, "--no-progress"]) == 0
    from tinylm.data.shards import PreparedDataset

    ds = PreparedDataset.open(out)
    assert ds.tokenizer().vocab_size == 300 and ds.tokenizer().kind == "bpe"
