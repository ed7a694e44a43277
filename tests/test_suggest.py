"""'Did you mean': close names, and a misspelled path's neighbour on disk."""

from __future__ import annotations

from tinylm.suggest import did_you_mean, nearby_path


def test_did_you_mean_names_close_candidates_only():
    assert did_you_mean("tiyn", ["tiny", "gpt2-124m"]) == " Did you mean 'tiny'?"
    assert did_you_mean("zzzz", ["tiny", "gpt2-124m"]) == ""


def test_nearby_path_fixes_the_name_and_a_misspelled_parent(tmp_path):
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "shakespeare.txt").write_text("x")
    assert (
        nearby_path(tmp_path / "corpora" / "shakespear.txt")
        == tmp_path / "corpora" / "shakespeare.txt"
    )
    assert (
        nearby_path(tmp_path / "copora" / "shakespeare.txt")
        == tmp_path / "corpora" / "shakespeare.txt"
    )
    assert (
        nearby_path(tmp_path / "copora" / "shakspeare.txt")
        == tmp_path / "corpora" / "shakespeare.txt"
    )
    assert nearby_path(tmp_path / "elsewhere" / "unrelated.bin") is None
