"""Character tokenizer: the vectorized encoding equals the exact one; unseen-character policies."""

import random

import pytest

from tinylm.tokenizer import CharTokenizer, TokenizerError

ALPHABET = sorted(set("abc é\n<|>endoftxt"))


@pytest.mark.parametrize("policy", ["unk", "skip", "error"])
def test_vectorized_encoding_equals_the_exact_path(policy):
    """Batches with special-token strings, unknown characters and empty texts, seeded."""
    rng = random.Random(0)
    tok = CharTokenizer(ALPHABET, policy)
    letters = "abc é\n🙂<|>endoftxt"
    for _ in range(1000):
        texts = [
            "".join(rng.choice(letters) for _ in range(rng.randint(0, 30)))
            for _ in range(rng.randint(0, 4))
        ]
        if policy == "error" and any("🙂" in t for t in texts):
            continue
        assert [a.tolist() for a in tok.encode_to_arrays(texts)] == [
            tok._encode_exact(t) for t in texts
        ]
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode("") == [] and tok.encode_to_arrays([]) == []


def test_unseen_character_policies():
    text = "ab🙂c<|endoftext|>"
    unk = CharTokenizer(list("abc"), "unk")
    assert unk.decode(unk.encode(text)) == "ab\ufffdc<|endoftext|>"
    skip = CharTokenizer(list("abc"), "skip")
    assert skip.decode(skip.encode(text)) == "abc<|endoftext|>"
    with pytest.raises(TokenizerError, match="U\\+1F642"):
        CharTokenizer(list("abc"), "error").encode(text)
