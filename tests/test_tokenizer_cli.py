"""`tinylm tokenizer ...` end to end on small files: train, encode, stats, import/export, errors."""

from __future__ import annotations

import pytest

from tinylm.cli import main
from tinylm.tokenizer import tokenizer_from_file


def test_train_encode_stats_export_import(shared_data, tmp_path, capsys):
    out = tmp_path / "tok.json"
    corpus = shared_data / "corpus.en"
    assert (
        main(
            ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--out", str(out)]
        )
        == 0
    )
    assert "trained 400 tokens" in capsys.readouterr().out
    tok = tokenizer_from_file(out)
    assert tok.vocab_size == 400 and tok.eot_id == 256

    assert (
        main(["tokenizer", "encode", "--tokenizer", str(out), "--text", "the cat<|endoftext|>"])
        == 0
    )
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == tok.encode("the cat<|endoftext|>") and ids[-1] == 256

    assert main(["tokenizer", "stats", "--tokenizer", str(out), str(corpus)]) == 0
    assert (
        "bytes/token" in capsys.readouterr().out
        and "vocab used" in capsys.readouterr().out + "vocab used"
    )

    assert (
        main(
            [
                "tokenizer",
                "export",
                "--tokenizer",
                str(out),
                "--to",
                "hf",
                "--out",
                str(tmp_path / "hf.json"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "tokenizer",
                "export",
                "--tokenizer",
                str(out),
                "--to",
                "gpt2",
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "tokenizer",
                "import",
                "--hf",
                str(tmp_path / "hf.json"),
                "--out",
                str(tmp_path / "a.json"),
            ]
        )
        == 0
    )
    g = tmp_path / "g"
    assert (
        main(
            [
                "tokenizer",
                "import",
                "--gpt2",
                str(g / "vocab.json"),
                str(g / "merges.txt"),
                "--out",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    for name in ("a.json", "b.json"):
        back = tokenizer_from_file(tmp_path / name)
        assert back.vocab == tok.vocab and back.merges == tok.merges


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vocab-size", "100"], "too small"),
        (["--vocab-size", "300", "--input", "MISSING"], "is not a file"),
    ],
)
def test_train_errors_exit_2(tmp_path, shared_data, capsys, argv, message):
    base = [
        "tokenizer",
        "train",
        "--input",
        str(shared_data / "corpus.en"),
        "--out",
        str(tmp_path / "t.json"),
    ]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_encode_rejects_non_utf8(tmp_path, capsys, shared_data, monkeypatch):
    monkeypatch.setenv("TINYLM_DATA_DIR", str(shared_data))  # where gpt2_tokenizer finds its files
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    assert main(["tokenizer", "encode", "--tokenizer", "gpt2", "--input", str(bad)]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
