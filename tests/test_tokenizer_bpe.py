"""Byte-level BPE: trainer exactness, native/Python agreement, encoding, GPT-2, files, bad input."""

from __future__ import annotations

import json
import pickle
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import regex

from tinylm.tokenizer import TokenizerError, load_tokenizer, tokenizer_from_file
from tinylm.tokenizer.bpe import (
    BPETokenizer,
    encode_parallel,
    from_gpt2_files,
    from_hf_json,
    gpt2_str_to_bytes,
    gpt2_tokenizer,
)
from tinylm.tokenizer.bpe_train import (
    GPT2_PATTERN,
    count_pretokens,
    file_chunks,
    native_available,
    train_bpe,
)
from tinylm.tokenizer.reference import ReferenceBPE

EOT = "<|endoftext|>"

VARIED = [
    "",
    "Hello, world! It's a test; we'll see what they've done.",
    "naïve café — “quotes” ½ € 日本語のテキスト 한국어 Ελληνικά русский",
    "emoji 👍🏽👨‍👩‍👧 🤖🚀 and flags 🇫🇷",
    "   leading spaces\n\n\n  trailing \t\t tabs \r\n  ",
    "numbers 1234567890 3.14159 -42 1e10 0x1F",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # code\n",
    f"doc one{EOT}doc two{EOT}{EOT}",
    "\x00\x01 control \u200b zero-width \ufeff bom",
    "a" * 300 + " " + "ab" * 200,
]


@pytest.fixture(scope="module")
def reference_merges(shared_data):
    lines = (
        (shared_data / "train-bpe-reference-merges.txt").read_text(encoding="utf-8").splitlines()
    )
    return [tuple(gpt2_str_to_bytes(t) for t in ln.split(" ")) for ln in lines]


@pytest.fixture(scope="module")
def small_tok(shared_data):
    """A 1,000-token BPE trained on a slice of tinyshakespeare + the TinyStories sample."""
    text = (shared_data / "tinyshakespeare.txt").read_text()[:300_000]
    stories = (shared_data / "tinystories_sample.txt").read_text()
    return train_bpe(
        texts=[text, stories], vocab_size=1000, special_tokens=[EOT], num_workers=1
    ).tokenizer()


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return from_gpt2_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt")


# -- trainer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_train_matches_reference(shared_data, reference_merges, native):
    if native and not native_available():
        pytest.skip("native merge loop not built (pip install -e . with a C++ compiler)")
    result = train_bpe([shared_data / "corpus.en"], 500, [EOT], native=native)
    assert result.merges == reference_merges
    ref_vocab = json.loads(
        (shared_data / "train-bpe-reference-vocab.json").read_text(encoding="utf-8")
    )
    expected = {t.encode() if t == EOT else gpt2_str_to_bytes(t) for t in ref_vocab}
    assert set(result.vocab.values()) == expected
    assert len(result.vocab) == 500
    assert result.vocab[256] == EOT.encode() and all(
        result.vocab[i] == bytes([i]) for i in range(256)
    )


def test_native_and_python_merge_loops_agree(shared_data):
    if not native_available():
        pytest.skip("native merge loop not built")
    text = (shared_data / "tinyshakespeare.txt").read_text()[:200_000]
    # repeated characters exercise overlapping pairs ("aaaa"), where the update order matters
    texts = [text, "aaaa aaaaa abab ababab " * 50, "héllo wörld 👍👍 " * 30]
    native = train_bpe(
        texts=texts, vocab_size=900, special_tokens=[EOT], native=True, num_workers=1
    )
    python = train_bpe(
        texts=texts, vocab_size=900, special_tokens=[EOT], native=False, num_workers=1
    )
    assert native.merges == python.merges and native.vocab == python.vocab
    assert native.engine == "native" and python.engine == "python"


def test_native_pretokenizer_equals_regex(shared_data):
    if not native_available():
        pytest.skip("native pre-tokenizer not built")
    texts = [
        *VARIED,
        "x'LL y'll z's 's '' ''s don't I'M 've're\n",
        "a\x0bb\x0cc\rd\x1ce\x1ff  \t\n \n\n  x  \n",
        "caf\u00e9 na\u00efve \u00a0nbsp\u2003em 12\u00b3 \u0661\u0662 end  ",
        (shared_data / "tinyshakespeare.txt").read_text()[:50_000],
    ]
    for text in texts:  # one at a time: a difference names its text
        kw = dict(texts=[text], special_tokens=[EOT], num_workers=1)
        assert count_pretokens(native=True, **kw) == count_pretokens(native=False, **kw), text[:60]


def test_parallel_pretokenization_equals_serial(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:400_000]
    path = tmp_path / "c.txt"
    path.write_text(text.replace("\n\n", f"\n\n{EOT}", 40))
    whole = Counter()
    pat = regex.compile(GPT2_PATTERN)
    for piece in path.read_text().split(EOT):
        whole.update(pat.findall(piece))
    chunked = Counter()
    chunks = list(file_chunks(path, [EOT], chunk_bytes=20_000))
    assert len(chunks) > 10 and chunks[0][1] == 0 and chunks[-1][2] == path.stat().st_size
    raw = path.read_bytes()
    for _, a, b in chunks:
        for piece in raw[a:b].decode().split(EOT):
            chunked.update(pat.findall(piece))
    assert chunked == whole
    docs = text.split("\n\n")
    serial = count_pretokens(texts=docs, num_workers=1)
    assert count_pretokens(texts=docs, num_workers=2) == serial  # worker processes
    assert count_pretokens(texts=docs, num_workers=2, native=False) == serial


@pytest.mark.parametrize("native", [True, False])
def test_train_stops_when_pairs_run_out(native):
    if native and not native_available():
        pytest.skip("native merge loop not built")
    result = train_bpe(texts=["ab ab ab"], vocab_size=1000, num_workers=1, native=native)
    assert result.merges == [(b"a", b"b"), (b" ", b"ab")]
    assert len(result.vocab) == 258
    # overlapping occurrences: "aaaaa" -> aa aa a -> aaaa a -> aaaaa, then nothing is left
    result = train_bpe(texts=["aaaaa"], vocab_size=1000, num_workers=1, native=native)
    assert result.merges == [(b"a", b"a"), (b"aa", b"aa"), (b"aaaa", b"a")]


def test_bad_training_input(tmp_path):
    with pytest.raises(TokenizerError, match=r"too small.*at least 256.*= 257"):
        train_bpe(texts=["abc"], vocab_size=200, special_tokens=[EOT])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_bpe([empty], 300)
    only_specials = tmp_path / "specials.txt"
    only_specials.write_text(EOT * 3)
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_bpe([only_specials], 300, [EOT])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("plain text then caf\xe9".encode("latin-1"))
    with pytest.raises(TokenizerError, match=r"latin1.txt: byte 19 is not valid UTF-8.*iconv"):
        train_bpe([latin1], 300)
    with pytest.raises(TokenizerError, match="not a file"):
        train_bpe([tmp_path / "missing.txt"], 300)


# -- encoding ------------------------------------------------------------------------------------


def test_encode_agrees_with_reference(small_tok, gpt2):
    for tok in (small_tok, gpt2):
        ref = ReferenceBPE(tok.vocab, tok.merges, tok.special_tokens, tok.pattern)
        for text in VARIED:
            ids = tok.encode(text)
            assert ids == ref.encode(text), text
            assert tok.decode(ids) == text


def test_reference_agrees_on_real_text(shared_data, small_tok):
    text = (shared_data / "tinyshakespeare.txt").read_text()[300_000:400_000]
    ref = ReferenceBPE(small_tok.vocab, small_tok.merges, small_tok.special_tokens)
    assert small_tok.encode(text) == ref.encode(text)


def test_gpt2_exact_on_every_shared_text_file(shared_data, gpt2):
    import tiktoken

    raw = json.loads((shared_data / "gpt2_vocab.json").read_text(encoding="utf-8"))
    ranks = {gpt2_str_to_bytes(t): i for t, i in raw.items() if t != EOT}
    enc = tiktoken.Encoding(
        "gpt2-files", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )
    files = [
        p
        for p in sorted(shared_data.rglob("*"))
        if p.is_file() and p.suffix in (".txt", ".en", ".md")
    ]
    assert len(files) >= 45
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert gpt2.encode(text) == enc.encode(text, allowed_special="all"), path.name
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]


def test_gpt2_tokenizer_finds_shared_files(shared_data, monkeypatch):
    monkeypatch.setenv("TINYLM_DATA_DIR", str(shared_data))
    gpt2_tokenizer.cache_clear()
    tok = load_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.encode("Hello world") == [15496, 995]


def test_gpt2_tokenizer_offline_error(tmp_path, monkeypatch):
    import tiktoken

    monkeypatch.setenv("TINYLM_DATA_DIR", str(tmp_path / "nothing"))
    gpt2_tokenizer.cache_clear()

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError, match=r"Offline, put GPT-2's vocab\.json and merges\.txt"):
        gpt2_tokenizer()
    gpt2_tokenizer.cache_clear()


def test_special_tokens_longest_first():
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[256] = EOT.encode()
    vocab[257] = (EOT + EOT).encode()
    tok = BPETokenizer(vocab, [], {EOT: 256, EOT + EOT: 257})
    assert tok.encode(f"a{EOT}{EOT}b{EOT}") == [97, 257, 98, 256]
    assert tok.encode(EOT * 3) == [257, 256]
    assert tok.decode([257, 256]) == EOT * 3
    ref = ReferenceBPE(vocab, [], tok.special_tokens)
    assert ref.encode(EOT * 3) == [257, 256]


def test_decode_never_raises(small_tok):
    ids = small_tok.encode("héllo 👍")
    assert "\ufffd" in small_tok.decode([*ids[:-1], small_tok.encode("👍")[0]])  # cut mid-character
    assert small_tok.decode([-1, small_tok.vocab_size, 10**9]) == "\ufffd" * 3
    assert small_tok.decode([]) == ""


def test_token_bytes(small_tok):
    tb = small_tok.token_bytes()
    assert tb.shape == (small_tok.vocab_size,) and tb.dtype.name == "int32"
    assert tb[small_tok.eot_id] == 0 and tb[ord("a")] == 1
    ids = small_tok.encode("The quick brown fox.")
    assert int(tb[ids].sum()) == len(b"The quick brown fox.")


def test_encode_iterable_equals_encode(shared_data, small_tok):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:300_000] + EOT + "tail  \n\n"
    lines = text.splitlines(keepends=True)
    assert list(small_tok.encode_iterable(lines)) == small_tok.encode(text)
    odd = ["ab", "c d", EOT[:5], EOT[5:], "  ", "\n\nx"] * 20_000  # cuts land near specials
    assert list(small_tok.encode_iterable(odd)) == small_tok.encode("".join(odd))


def test_encode_iterable_memory_is_bounded(small_tok):
    line = "The king is dead, long live the king! 1234 naïve\n"

    def peak_for(n):
        tracemalloc.start()
        count = sum(1 for _ in small_tok.encode_iterable(f"{i} {line}" for i in range(n)))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count > n * 10
        return peak

    small, large = peak_for(5_000), peak_for(20_000)  # ~0.27 MB and ~1.1 MB of text
    # Encoding the large input whole would hold 1.1 MB of text plus ~2 MB of id list.
    assert large < small + 256 * 1024, (
        f"peak grew from {small / 2**20:.2f} to {large / 2**20:.2f} MiB"
    )
    assert large < 2 * 2**20


def test_batch_and_parallel_encode(small_tok):
    texts = [f"document {i}: " + "the quick brown fox " * (i % 7) for i in range(200)]
    expected = [small_tok.encode(t) for t in texts]
    assert small_tok.encode_batch(texts) == expected
    assert small_tok.encode_batch(texts, num_workers=2) == expected
    assert list(encode_parallel(small_tok, iter(texts), num_workers=2)) == expected
    clone = pickle.loads(pickle.dumps(small_tok))
    assert clone.encode(texts[5]) == expected[5] and clone.fingerprint() == small_tok.fingerprint()


# -- files ---------------------------------------------------------------------------------------


def test_file_round_trip_exact(tmp_path, small_tok):
    vocab = dict(small_tok.vocab)
    vocab[len(vocab)] = b"\xff\xfe\x00"  # not UTF-8: must survive the file
    merges = [*small_tok.merges]
    tok = BPETokenizer(vocab, merges, small_tok.special_tokens)
    path = tok.save(tmp_path / "tok.json")
    loaded = tokenizer_from_file(path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.vocab == tok.vocab and loaded.merges == tok.merges
    assert loaded.special_tokens == tok.special_tokens and loaded.pattern == tok.pattern
    assert loaded.fingerprint() == tok.fingerprint()
    assert load_tokenizer(str(path)).encode(VARIED[2]) == tok.encode(VARIED[2])


def test_wrong_version_and_broken_files(tmp_path, small_tok):
    d = small_tok.file_dict()
    path = tmp_path / "tok.json"
    path.write_text(json.dumps({**d, "version": 99}))
    with pytest.raises(TokenizerError, match=r"version 99.*re-create"):
        tokenizer_from_file(path)
    path.write_text(json.dumps({k: v for k, v in d.items() if k != "merges"}))
    with pytest.raises(TokenizerError, match="lacks"):
        tokenizer_from_file(path)
    path.write_text(json.dumps({**d, "vocab": d["vocab"][:100]}))
    with pytest.raises(TokenizerError):
        tokenizer_from_file(path)


def test_hf_round_trip(tmp_path, small_tok):
    from tokenizers import Tokenizer as HFTokenizer

    path = small_tok.save_hf(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(path))
    for text in VARIED:
        assert hf.encode(text).ids == small_tok.encode(text), text
    back = from_hf_json(path)
    assert back.vocab == small_tok.vocab and back.merges == small_tok.merges
    assert back.special_tokens == small_tok.special_tokens


def test_import_hf_trained_tokenizer(tmp_path, shared_data):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train([str(shared_data / "corpus.en")], trainer)
    hf.save(str(tmp_path / "hf.json"))
    ours = from_hf_json(tmp_path / "hf.json")
    for text in VARIED[1:7]:
        assert ours.encode(text) == hf.encode(text).ids, text


def test_gpt2_files_round_trip(tmp_path, small_tok):
    small_tok.save_gpt2(tmp_path / "vocab.json", tmp_path / "merges.txt")
    back = from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert back.vocab == small_tok.vocab and back.merges == small_tok.merges
    assert back.special_tokens == small_tok.special_tokens


def test_inconsistent_vocab_is_rejected():
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[256], vocab[257] = b"ab", b"abc"
    with pytest.raises(TokenizerError, match="follow the merge order"):
        BPETokenizer(vocab, [(b"ab", b"c"), (b"a", b"b")])
    with pytest.raises(TokenizerError, match="256 single bytes"):
        BPETokenizer({i: bytes([i]) for i in range(200)}, [])


def test_shared_files_exist(shared_data):
    assert Path(shared_data / "gpt2_merges.txt").is_file()
