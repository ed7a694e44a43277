"""Files tinylm reads and writes: schema checks, names confined to their directory, look-alike
directories, tampered pickles, binary input, files that are not ours, and disk-full writes.

Every refusal is checked for the message (naming the file and the problem) and, through the CLI,
for exit status 2 without a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMALL, read_metrics, run_cli

from tinylm.config import load_config
from tinylm.data import prepare as prep
from tinylm.data.errors import DataError
from tinylm.data.prepare import SplitSettings, fit_char_tokenizer, prepare
from tinylm.data.shards import PreparedDataset
from tinylm.fileio import make_dir, os_error_message
from tinylm.tokenizer import CharTokenizer, TokenizerError, tokenizer_from_file
from tinylm.train import checkpoint as ck
from tinylm.train.trainer import Trainer

EOT = "<|endoftext|>"


def _corpus(tmp_path: Path) -> Path:
    docs = [f"Document {i}: " + "abcdefgh"[i % 8] * (5 + i % 13) for i in range(120)]
    path = tmp_path / "corpus.txt"
    path.write_text(f"\n{EOT}\n".join(docs))
    return path


def _prepare(src: Path, out: Path, tok=None, **kwargs):
    tok = tok or fit_char_tokenizer([str(src)])
    return prepare(
        [str(src)],
        out,
        tok,
        settings=SplitSettings(chunk_chars=400),
        workers=1,
        log=kwargs.pop("log", lambda _: None),
        **kwargs,
    )


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _cli_error(capsys, *args: object) -> str:
    """Run the CLI expecting a clear refusal: exit 2, one message, no traceback."""
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    return err


# ------------------------------------------------------------------ data that is not ours


def test_prepare_never_deletes_or_overwrites_files_it_did_not_write(tmp_path, capsys):
    src = _corpus(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    # Names the old clean-up globs (train_*.bin, *.tmp) matched, and unrelated files.
    for name, data in {
        "notes.txt": b"my notes",
        "train_data.bin": b"\x01\x02",
        "draft.tmp": b"draft",
        "val_old.bin": b"x",
    }.items():
        (out / name).write_bytes(data)
    before = _snapshot(out)
    empty = tmp_path / "empty.txt"
    empty.write_text(f"\n{EOT}\n")
    with pytest.raises(DataError, match="is empty"):
        _prepare(empty, out, CharTokenizer(list("ab")))
    assert _snapshot(out) == before  # a bad input removed only what it wrote

    ds = _prepare(src, out)  # a good one works beside the user's files
    assert ds.num_tokens("train") > 0
    after = _snapshot(out)
    assert all(after[name] == data for name, data in before.items())

    # A file with a name prepare writes, not written by prepare: refused before anything is written.
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text('{"mine": true}')
    (other / "train_000000.bin").write_bytes(b"precious")
    before = _snapshot(other)
    err = _cli_error(capsys, "prepare", src, "--out", other, "--workers", "1", "--no-progress")
    assert "would overwrite but did not write" in err and "tokenizer.json" in err
    assert _snapshot(other) == before


def test_prepare_keeps_the_users_own_tokenizer_file_after_a_bad_input(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    tok = CharTokenizer(list("ab"))
    tok.save(out / "tokenizer.json")  # the user's file, given as --tokenizer out/tokenizer.json
    before = _snapshot(out)
    empty = tmp_path / "empty.txt"
    empty.write_text(" ")
    with pytest.raises(DataError, match="is empty"):
        _prepare(empty, out, tokenizer_from_file(out / "tokenizer.json"))
    assert _snapshot(out) == before


def test_new_run_refuses_to_overwrite_files_no_run_wrote(tmp_path, capsys):
    src = _corpus(tmp_path)
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("my: own file\n")
    err = _cli_error(
        capsys, "train", "tiny", f"data.train={src}", f"out_dir={tmp_path}", "run_name=r", *SMALL
    )
    assert "no tinylm run wrote" in err and "config.yaml" in err
    assert (run / "config.yaml").read_text() == "my: own file\n"


# ------------------------------------------------------------------ prepared-dataset schema


def _edit_meta(ds_dir: Path, edit) -> None:
    meta = json.loads((ds_dir / "meta.json").read_text())
    edit(meta)
    (ds_dir / "meta.json").write_text(json.dumps(meta))


BAD_META_EDITS = {
    "shard name with ..": (
        lambda m: m["splits"]["train"]["shards"][0].update(file="../secret.bin"),
        "not a plain file name",
    ),
    "absolute shard name": (
        lambda m: m["splits"]["train"]["shards"][0].update(file="/etc/passwd"),
        "not a plain file name",
    ),
    "tokens as a string": (
        lambda m: m["splits"]["train"]["shards"][0].update(tokens="12"),
        "shard range",
    ),
    "negative start": (lambda m: m["splits"]["train"]["shards"][0].update(start=-4), "shard range"),
    "split total contradicts ranges": (
        lambda m: m["splits"]["train"].update(tokens=m["splits"]["train"]["tokens"] + 1),
        "its shards hold",
    ),
    "unknown dtype": (lambda m: m.update(dtype="float32"), "dtype"),
    "vocab too large for dtype": (
        lambda m: m["tokenizer"].update(vocab_size=70000),
        "does not fit uint16",
    ),
    "tokenizer not an object": (lambda m: m.update(tokenizer="char"), "'tokenizer' must hold"),
    "no splits": (lambda m: m.pop("splits"), "'splits'"),
    "meta is a list": (lambda m: m.clear() or m.update(x=1), "format"),
}


@pytest.mark.parametrize("case", sorted(BAD_META_EDITS))
def test_prepared_meta_schema_is_checked_before_use(tmp_path, case, monkeypatch):
    src = _corpus(tmp_path)
    ds = _prepare(src, tmp_path / "out")
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 4096)
    edit, expected = BAD_META_EDITS[case]
    _edit_meta(ds.directory, edit)
    mapped = []
    monkeypatch.setattr(np, "memmap", lambda *a, **k: mapped.append(a) or None)
    with pytest.raises(DataError, match=r"meta\.json") as info:
        PreparedDataset.open(ds.directory)
    assert expected in str(info.value)
    assert mapped == []  # refused before anything was mapped


def test_shard_sizes_are_checked_against_the_metadata(tmp_path, capsys):
    src = _corpus(tmp_path)
    ds = _prepare(src, tmp_path / "out")
    shard = ds.directory / ds.meta["splits"]["train"]["shards"][0]["file"]
    with open(shard, "ab") as f:
        f.write(b"\x00\x00")  # longer than the metadata says: not the file it describes
    err = _cli_error(
        capsys, "train", "tiny", f"data.train={ds.directory}", f"out_dir={tmp_path}", *SMALL
    )
    assert str(shard) in err and "expected" in err


def test_dataset_with_another_tokenizer_file_is_refused(tmp_path):
    src = _corpus(tmp_path)
    ds = _prepare(src, tmp_path / "out")
    CharTokenizer(list("xyz")).save(ds.directory / "tokenizer.json")
    with pytest.raises(DataError, match="is not the tokenizer"):
        PreparedDataset.open(ds.directory).tokenizer()


# ------------------------------------------------------------------ tokenizer files


BAD_TOKENIZER_FIELDS = [
    ({"type": "char", "chars": ["a", "b"], "unknown": "unk"}, "'chars' is list"),
    ({"type": "char", "chars": "ab", "unknown": 3}, "'unknown' is int"),
    ({"type": "char", "chars": "ab"}, "lacks the field 'unknown'"),
    (
        {"type": "char", "chars": "ab", "unknown": "unk", "special_tokens": {EOT: 7}},
        "contradict",
    ),
    ({"type": "char", "chars": "ab", "unknown": "unk", "special_tokens": {EOT: "2"}}, "not a non-negative"),
    ({"type": "bpe", "vocab": "abc", "merges": [], "special_tokens": {}, "pattern": "x"}, "'vocab' is str"),
    ({"type": "bpe", "vocab": [1, 2], "merges": [], "special_tokens": {}, "pattern": "x"}, "vocab entry 0"),
    ({"type": "bpe", "vocab": [], "merges": [3], "special_tokens": {}, "pattern": "x"}, "merge 0"),
    ({"type": "bpe", "vocab": [], "merges": [], "special_tokens": [], "pattern": "x"}, "'special_tokens' is list"),
    ({"type": "bpe", "vocab": [], "merges": [], "special_tokens": {}, "pattern": 5}, "'pattern' is int"),
    ({"type": "bpe", "vocab": [], "merges": [], "special_tokens": {EOT: True}, "pattern": "x"}, "not a non-negative"),
]  # fmt: skip


@pytest.mark.parametrize("fields,expected", BAD_TOKENIZER_FIELDS)
def test_tokenizer_file_field_types_are_checked(tmp_path, fields, expected):
    path = tmp_path / "tok.json"
    path.write_text(json.dumps({"format": "tinylm-tokenizer", "version": 1, **fields}))
    with pytest.raises(TokenizerError) as info:
        tokenizer_from_file(path)
    assert str(info.value).startswith(str(path)) and expected in str(info.value)


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run with checkpoints at steps 3 and 6 (copied per test)."""
    base = tmp_path_factory.mktemp("trained")
    src = _corpus(base)
    args = [f"data.train={src}", f"out_dir={base}", "run_name=r", *SMALL]
    cfg = load_config("tiny", [*args, "train.max_steps=6", "checkpoint.interval=3"])
    cfg.eval.interval = 0
    Trainer(cfg, base / "r").fit()
    return base / "r"


@pytest.fixture()
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _rehash(ckpt: Path) -> None:
    """Make meta.json's sizes and checksums match the (edited) files again: a consistent forgery."""
    meta = json.loads((ckpt / "meta.json").read_text())
    for name in meta["files"]:
        data = (ckpt / name).read_bytes()
        meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


class _Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_tampered_pickle_is_not_a_tinylm_checkpoint(run, capsys):
    ckpt = run / "checkpoints" / "step_00000006"
    torch.save({"loop": {"step": 6}, "evil": _Payload()}, ckpt / "train_state.pt")
    _rehash(ckpt)
    err = _cli_error(capsys, "train", "--resume", run, "train.max_steps=12")
    assert "is not a tinylm checkpoint's training state" in err
    assert "weights_only" not in err and "this would have run" not in err


@pytest.mark.parametrize(
    "state,expected",
    [
        ([1, 2], "holds a list"),
        ({"loop": {"step": 6}, "rng": [{}]}, "no optimizer state"),
        ({"optimizer": {"state": {}, "param_groups": []}, "loop": {"step": 6}}, "no RNG states"),
        ({"optimizer": {"state": {}, "param_groups": []}, "rng": [{}], "loop": {"step": 4}}, "at step 4"),
        ({"optimizer": {"state": {}, "param_groups": []}, "rng": [{}], "loop": {"step": 6, "x": 1}}, "unknown loop-state"),
    ],
)  # fmt: skip
def test_train_state_schema(run, capsys, state, expected):
    ckpt = run / "checkpoints" / "step_00000006"
    torch.save(state, ckpt / "train_state.pt")
    _rehash(ckpt)
    err = _cli_error(capsys, "train", "--resume", run, "train.max_steps=12")
    assert "train_state.pt" in err and expected in err


def test_checkpoint_meta_names_are_confined(run, monkeypatch):
    ckpt = run / "checkpoints" / "step_00000006"
    (run / "outside.bin").write_bytes(b"secret")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["../../outside.bin"] = {"bytes": 6, "sha256": "0" * 64}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    hashed = []
    real = ck._sha256
    monkeypatch.setattr(ck, "_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    assert "not a plain file name" in ck.check_checkpoint(ckpt)
    with pytest.warns(UserWarning, match="not a plain file name"):
        assert ck.find_latest(run / "checkpoints").name == "step_00000003"
    assert "outside.bin" not in hashed


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda m: m.update(step="6"), "not a step number"),
        (lambda m: m.update(step=9), "the directory name says 6"),
        (lambda m: m["files"].pop("model.safetensors"), "must list"),
        (lambda m: m["files"]["model.safetensors"].update(sha256="xyz"), "hex 'sha256'"),
        (lambda m: m.update(val_loss="low"), "'val_loss'"),
        (lambda m: m.update(aliases=["a"]), "'aliases'"),
        (lambda m: m.pop("config"), "'config'"),
    ],
)
def test_checkpoint_meta_schema(run, capsys, edit, expected):
    ckpt = run / "checkpoints" / "step_00000006"
    meta = json.loads((ckpt / "meta.json").read_text())
    edit(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert expected in ck.check_checkpoint(ckpt)
    err = _cli_error(capsys, "generate", ckpt, "--max-new-tokens", "2")
    assert expected in err and str(ckpt) in err


def test_weights_that_contradict_the_config_name_the_file(run, capsys):
    ckpt = run / "checkpoints" / "step_00000006"
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["model"]["d_model"] = 64  # well-formed, but not what the weights are
    meta["config"]["model"]["n_head"] = 2
    (ckpt / "meta.json").write_text(json.dumps(meta))
    err = _cli_error(capsys, "generate", ckpt, "--max-new-tokens", "2")
    assert "model.safetensors" in err and "do not fit the model" in err


def test_tokenizer_larger_than_the_model_is_refused(run, capsys):
    ckpt = run / "checkpoints" / "step_00000006"
    CharTokenizer([chr(c) for c in range(65, 65 + 120)]).save(ckpt / "tokenizer.json")
    _rehash(ckpt)
    err = _cli_error(capsys, "generate", ckpt, "--max-new-tokens", "2")
    assert "tokenizer.json" in err and "more than the model's" in err


def test_look_alike_checkpoint_directories_are_ignored_with_a_note(run, capsys):
    root = run / "checkpoints"
    shutil.copytree(root / "step_00000006", root / "step_00000060.bak")
    (root / "step_notes.txt").write_text("mine")
    capsys.readouterr()
    assert [p.name for p in ck.list_checkpoints(root)] == ["step_00000003", "step_00000006"]
    assert "ignoring" in capsys.readouterr().err
    assert run_cli("generate", run, "--max-new-tokens", "3", "--seed", "1") == 0
    assert run_cli("runs", run.parent) == 0
    assert run_cli("eval", run, "--max-batches", "1") == 0
    assert run_cli("train", "--resume", run, "train.max_steps=7", "checkpoint.keep_last=1") == 0
    assert (root / "step_00000060.bak").is_dir() and (root / "step_notes.txt").is_file()
    assert [p.name for p in ck.list_checkpoints(root)] == ["step_00000007"]


# ------------------------------------------------------------------ binary and invalid text


def test_binary_files_are_refused_as_not_text(tmp_path, capsys):
    elf = tmp_path / "program"
    elf.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 40)
    noise = tmp_path / "noise.txt"
    noise.write_bytes(np.random.default_rng(0).integers(128, 256, 20000, dtype=np.uint8).tobytes())
    for path in (elf, noise):
        err = _cli_error(capsys, "prepare", path, "--out", tmp_path / "o", "--no-progress")
        assert f"{path}: not a text file" in err
        assert not (tmp_path / "o").exists()


def test_invalid_utf8_is_kept_and_said_every_time_the_dataset_is_used(tmp_path):
    src = tmp_path / "latin1.txt"
    text = "Le café était très bon. " * 40
    src.write_bytes(text.encode("latin-1"))  # é, è are invalid UTF-8 here: text, not binary
    notes: list[str] = []
    for _ in range(2):  # made, then reused from the cache
        ds = _prepare(src, tmp_path / "out", log=notes.append)
    said = [n for n in notes if "invalid UTF-8" in n]
    assert len(said) == 2 and all("120 invalid UTF-8 sequence(s)" in n for n in said)
    assert ds.meta["stats"]["invalid_utf8"] == 120
    assert "\ufffd" in ds.tokenizer().decode(ds.split("train")[0:50].tolist())


# ------------------------------------------------------------------ filesystem errors


def test_outputs_that_exist_as_files_are_clear_errors(tmp_path, capsys):
    src = _corpus(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    err = _cli_error(capsys, "prepare", src, "--out", blocker, "--no-progress")
    assert f"'{blocker}' exists and is a file, not a dataset directory" in err
    err = _cli_error(capsys, "train", "tiny", f"data.train={src}", f"out_dir={blocker}", *SMALL)
    assert str(blocker) in err and "file" in err
    assert blocker.read_text() == "a file"
    args = ["tokenizer", "train", "--input", src, "--vocab-size", "262", "--workers", "1"]
    err = _cli_error(capsys, *args, "--out", blocker)
    assert f"'{blocker}' exists and is not a tinylm tokenizer file" in err
    assert blocker.read_text() == "a file"
    assert run_cli(*args, "--out", tmp_path / "tok.json") == 0
    assert run_cli(*args, "--out", tmp_path / "tok.json") == 0  # our own file: replaced


@pytest.mark.parametrize(
    "code,words",
    [
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only"),
        (errno.ENOSPC, "no space left"),
    ],
)
def test_directory_errors_name_the_path(tmp_path, monkeypatch, code, words):
    target = tmp_path / "a" / "b"

    def fail(self, *args, **kwargs):
        raise OSError(code, "boom", str(self))

    monkeypatch.setattr(Path, "mkdir", fail)
    with pytest.raises(DataError) as info:
        make_dir(target, DataError)
    assert str(target) in str(info.value) and words in str(info.value)
    assert words in os_error_message(OSError(code, "x"), target, "write")


# ------------------------------------------------------------------ disk full


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_during_a_shard_write_keeps_finished_chunks_and_resumes(tmp_path, monkeypatch):
    src = _corpus(tmp_path)
    reference = _prepare(src, tmp_path / "ref")
    real = prep.write_shard
    calls = {"n": 0}

    def full_at_third(path, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(str(path) + ".1-1.tmp", "wb") as f:  # half a shard, as a real failure leaves
                f.write(b"\x00" * 3)
            raise _enospc(path)
        real(path, ids)

    monkeypatch.setattr(prep, "write_shard", full_at_third)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        _prepare(src, out)
    message = str(info.value)
    assert "no space left" in message and str(out) in message and "kept" in message
    assert not (out / "meta.json").exists() and (out / ".progress").is_dir()
    done = sorted(p.name for p in (out / ".progress").glob("0*.json"))
    assert len(done) >= 1
    monkeypatch.setattr(prep, "write_shard", real)  # space freed
    resumed = _prepare(src, out)
    assert resumed.meta["splits"] == reference.meta["splits"]
    for r in reference.meta["splits"]["train"]["shards"]:
        assert (out / r["file"]).read_bytes() == (reference.directory / r["file"]).read_bytes()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resumes(tmp_path, monkeypatch):
    src = _corpus(tmp_path)
    args = [f"data.train={src}", f"out_dir={tmp_path}", *SMALL, "train.max_steps=9"]
    args += ["checkpoint.interval=3", "eval.interval=0", "log.interval=1"]
    assert run_cli("train", "tiny", *args, "run_name=ref") == 0
    reference = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref", "train")]

    real = ck.torch.save
    calls = {"n": 0}

    def full_at_second(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _enospc(path)
        real(obj, path, *a, **k)

    monkeypatch.setattr(ck.torch, "save", full_at_second)
    with pytest.raises(ck.CheckpointError) as info:
        Trainer(load_config("tiny", [*args, "run_name=r"]), tmp_path / "r").fit()
    message = str(info.value)
    assert "no space left" in message and "step_00000003" in message and "intact" in message
    root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]  # nothing half-written
    events = read_metrics(tmp_path / "r", "event")
    assert events[-1]["event"] == "failed"
    monkeypatch.setattr(ck.torch, "save", real)  # space freed
    assert run_cli("train", "--resume", tmp_path / "r") == 0
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "r", "train")] == reference
