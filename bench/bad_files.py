"""Try bad files, bad inputs and filesystem trouble on the real CLI; tabulate what each gives.

For the issue-12 closing note: every case must end either as it should (exit 0 where the input
is acceptable, e.g. a backup copy beside the checkpoints) or as one clear refusal: exit 2, a
message naming the file (or directory) at fault, and no traceback. Runs in-process through
`tinylm.cli.main`, in a temporary directory; takes about a minute on two cores.

    .venv/bin/python bench/bad_files.py            # prints a Markdown table and the totals
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SMALL = [
    "model.context_length=32", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
    "train.batch_size=4", "eval.max_batches=1", "eval.samples=0", "log.tensorboard=false",
    "log.progress=false", "data.num_workers=1", "train.max_steps=4", "checkpoint.interval=2",
]  # fmt: skip
EOT = "<|endoftext|>"


def cli(*args: object) -> tuple[int, str]:
    """(exit status, stderr+stdout); an escaping exception counts as a traceback."""
    from tinylm.cli import main

    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0)
        except BaseException:  # what the table is about
            traceback.print_exc(file=out)
            code = -1
    return code, out.getvalue()


def rehash(ckpt: Path) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    for name in meta["files"]:
        if (ckpt / name).is_file():
            data = (ckpt / name).read_bytes()
            meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="bad-files-"))
    os.environ["TINYLM_CACHE"] = str(base / "cache")
    corpus = base / "corpus.txt"
    corpus.write_text(
        f"\n{EOT}\n".join(f"Story {i}: the fox ran {i % 7} times." for i in range(400))
    )
    assert cli("prepare", corpus, "--out", base / "ds", "--workers", "1", "--no-progress")[0] == 0
    assert (
        cli("train", "tiny", f"data.train={corpus}", f"out_dir={base}", "run_name=run", *SMALL)[0]
        == 0
    )
    ds0, run0 = base / "ds", base / "run"
    rows: list[tuple[str, str, int, bool, bool]] = []

    def case(name: str, expect: int, setup: Callable[[Path], list[object]]) -> None:
        work = base / f"case{len(rows)}"
        work.mkdir()
        shutil.copytree(ds0, work / "ds")
        shutil.copytree(run0, work / "run")
        args = setup(work)
        code, text = cli(*args)
        first = next((line for line in text.splitlines() if "error" in line), text.strip()[-200:])
        named = str(work) in text
        clean = "Traceback" not in text
        ok = code == expect and clean and (expect == 0 or named)
        first = " ".join(first.split()).replace("|", "/")  # one table cell
        rows.append((name, first[:220], code, clean, ok))

    def ck(w: Path) -> Path:
        return w / "run" / "checkpoints" / "step_00000004"

    def gen(w: Path) -> list[object]:
        return ["generate", ck(w), "--max-new-tokens", "3"]

    def train_on(w: Path) -> list[object]:
        return ["train", "tiny", f"data.train={w / 'ds'}", f"out_dir={w}", "run_name=t", *SMALL]

    def shard0(w: Path) -> Path:
        meta = json.loads((w / "ds" / "meta.json").read_text())
        return w / "ds" / meta["splits"]["train"]["shards"][0]["file"]

    # -- prepared dataset
    case(
        "dataset meta.json not JSON",
        2,
        lambda w: ((w / "ds" / "meta.json").write_text("{oops"), train_on(w))[1],
    )
    case(
        "dataset meta.json is a list",
        2,
        lambda w: ((w / "ds" / "meta.json").write_text("[1]"), train_on(w))[1],
    )
    case(
        "dataset format of another tool",
        2,
        lambda w: (edit_json(w / "ds" / "meta.json", lambda m: m.update(format="x")), train_on(w))[
            1
        ],
    )
    case(
        "dataset dtype float32",
        2,
        lambda w: (
            edit_json(w / "ds" / "meta.json", lambda m: m.update(dtype="float32")),
            train_on(w),
        )[1],
    )
    case(
        "shard name ../secret.bin",
        2,
        lambda w: (
            edit_json(
                w / "ds" / "meta.json",
                lambda m: m["splits"]["train"]["shards"][0].update(file="../secret.bin"),
            ),
            train_on(w),
        )[1],
    )
    case(
        "shard name /etc/passwd",
        2,
        lambda w: (
            edit_json(
                w / "ds" / "meta.json",
                lambda m: m["splits"]["train"]["shards"][0].update(file="/etc/passwd"),
            ),
            train_on(w),
        )[1],
    )
    case(
        "shard tokens as a string",
        2,
        lambda w: (
            edit_json(
                w / "ds" / "meta.json",
                lambda m: m["splits"]["train"]["shards"][0].update(tokens="9"),
            ),
            train_on(w),
        )[1],
    )
    case(
        "shard negative start",
        2,
        lambda w: (
            edit_json(
                w / "ds" / "meta.json", lambda m: m["splits"]["train"]["shards"][0].update(start=-1)
            ),
            train_on(w),
        )[1],
    )
    case(
        "split total contradicts shards",
        2,
        lambda w: (
            edit_json(w / "ds" / "meta.json", lambda m: m["splits"]["train"].update(tokens=1)),
            train_on(w),
        )[1],
    )
    case(
        "vocab too large for uint16",
        2,
        lambda w: (
            edit_json(w / "ds" / "meta.json", lambda m: m["tokenizer"].update(vocab_size=10**6)),
            train_on(w),
        )[1],
    )
    case(
        "shard truncated",
        2,
        lambda w: (shard0(w).write_bytes(shard0(w).read_bytes()[:-2]), train_on(w))[1],
    )
    case(
        "shard longer than its metadata",
        2,
        lambda w: (shard0(w).write_bytes(shard0(w).read_bytes() + b"\0\0"), train_on(w))[1],
    )
    case("shard missing", 2, lambda w: (shard0(w).unlink(), train_on(w))[1])
    case(
        "dataset tokenizer.json swapped",
        2,
        lambda w: (
            shutil.copy(w / "run" / "tokenizer.json", w / "ds" / "tokenizer.json"),
            edit_json(w / "ds" / "tokenizer.json", lambda t: t.update(chars="xyz")),
            train_on(w),
        )[2],
    )
    case(
        "dataset tokenizer.json not JSON",
        2,
        lambda w: ((w / "ds" / "tokenizer.json").write_text("nope"), train_on(w))[1],
    )
    case(
        "unfinished dataset (no meta.json)",
        2,
        lambda w: (
            (w / "ds" / "meta.json").unlink(),
            (w / "ds" / ".progress").mkdir(),
            train_on(w),
        )[2],
    )

    # -- checkpoints
    case(
        "checkpoint meta.json not JSON",
        2,
        lambda w: ((ck(w) / "meta.json").write_text("{"), gen(w))[1],
    )
    case(
        "checkpoint step is a string",
        2,
        lambda w: (edit_json(ck(w) / "meta.json", lambda m: m.update(step="4")), gen(w))[1],
    )
    case(
        "checkpoint step contradicts its name",
        2,
        lambda w: (edit_json(ck(w) / "meta.json", lambda m: m.update(step=9)), gen(w))[1],
    )
    case(
        "checkpoint file name ../../x",
        2,
        lambda w: (
            edit_json(
                ck(w) / "meta.json",
                lambda m: m["files"].update({"../../x": {"bytes": 1, "sha256": "0" * 64}}),
            ),
            gen(w),
        )[1],
    )
    case(
        "checkpoint lists no model file",
        2,
        lambda w: (
            edit_json(ck(w) / "meta.json", lambda m: m["files"].pop("model.safetensors")),
            gen(w),
        )[1],
    )
    case(
        "checkpoint sha256 malformed",
        2,
        lambda w: (
            edit_json(
                ck(w) / "meta.json", lambda m: m["files"]["model.safetensors"].update(sha256="z")
            ),
            gen(w),
        )[1],
    )
    case(
        "weights truncated",
        2,
        lambda w: (
            (ck(w) / "model.safetensors").write_bytes(
                (ck(w) / "model.safetensors").read_bytes()[:100]
            ),
            gen(w),
        )[1],
    )
    case(
        "weights not safetensors (rehashed)",
        2,
        lambda w: (
            (ck(w) / "model.safetensors").write_bytes(b"garbage" * 10),
            rehash(ck(w)),
            gen(w),
        )[2],
    )
    case(
        "weights vs config: d_model changed",
        2,
        lambda w: (
            edit_json(ck(w) / "meta.json", lambda m: m["config"]["model"].update(d_model=64)),
            gen(w),
        )[1],
    )
    case(
        "checkpoint config invalid (n_head=0)",
        2,
        lambda w: (
            edit_json(ck(w) / "meta.json", lambda m: m["config"]["model"].update(n_head=0)),
            gen(w),
        )[1],
    )
    case(
        "checkpoint config unknown key",
        2,
        lambda w: (edit_json(ck(w) / "meta.json", lambda m: m["config"].update(bogus=1)), gen(w))[
            1
        ],
    )
    case(
        "tokenizer larger than the model",
        2,
        lambda w: (
            edit_json(
                ck(w) / "tokenizer.json",
                lambda t: (
                    t.update(chars="".join(chr(c) for c in range(40, 200))),
                    t.pop("special_tokens"),
                ),
            ),
            rehash(ck(w)),
            gen(w),
        )[2],
    )
    case(
        "train_state tampered pickle",
        2,
        lambda w: (
            torch.save({"loop": {"step": 4}, "x": Payload()}, ck(w) / "train_state.pt"),
            rehash(ck(w)),
            ["train", "--resume", w / "run"],
        )[2],
    )
    case(
        "train_state is a list",
        2,
        lambda w: (
            torch.save([1], ck(w) / "train_state.pt"),
            rehash(ck(w)),
            ["train", "--resume", w / "run"],
        )[2],
    )
    case(
        "train_state at another step",
        2,
        lambda w: (
            torch.save(
                {"optimizer": {"state": {}, "param_groups": []}, "rng": [{}], "loop": {"step": 1}},
                ck(w) / "train_state.pt",
            ),
            rehash(ck(w)),
            ["train", "--resume", w / "run"],
        )[2],
    )
    case(
        "train_state without optimizer",
        2,
        lambda w: (
            torch.save({"rng": [{}], "loop": {"step": 4}}, ck(w) / "train_state.pt"),
            rehash(ck(w)),
            ["train", "--resume", w / "run"],
        )[2],
    )
    case(
        "backup copy step_00000060.bak: generate",
        0,
        lambda w: (
            shutil.copytree(ck(w), ck(w).parent / "step_00000060.bak"),
            ["generate", w / "run", "--max-new-tokens", "3"],
        )[1],
    )
    case(
        "backup copy step_00000060.bak: eval",
        0,
        lambda w: (
            shutil.copytree(ck(w), ck(w).parent / "step_00000060.bak"),
            ["eval", w / "run", "--max-batches", "1"],
        )[1],
    )
    case(
        "backup copy step_00000060.bak: runs",
        0,
        lambda w: (shutil.copytree(ck(w), ck(w).parent / "step_00000060.bak"), ["runs", w])[1],
    )
    case(
        "backup copy step_00000060.bak: resume",
        0,
        lambda w: (
            shutil.copytree(ck(w), ck(w).parent / "step_00000060.bak"),
            ["train", "--resume", w / "run", "train.max_steps=5"],
        )[1],
    )
    case(
        "a file named step_notes.txt",
        0,
        lambda w: (
            (ck(w).parent / "step_notes.txt").write_text("x"),
            ["generate", w / "run", "--max-new-tokens", "3"],
        )[1],
    )

    # -- tokenizer files
    def tok_case(name: str, fields: dict) -> None:
        def setup(w: Path) -> list[object]:
            (w / "tok.json").write_text(
                json.dumps({"format": "tinylm-tokenizer", "version": 1, **fields})
            )
            return ["tokenizer", "encode", "--tokenizer", w / "tok.json", "--text", "hello"]

        case(name, 2, setup)

    tok_case("char tokenizer: chars is a list", {"type": "char", "chars": ["a"], "unknown": "unk"})
    tok_case("char tokenizer: unknown is a number", {"type": "char", "chars": "ab", "unknown": 1})
    tok_case(
        "char tokenizer: specials contradict",
        {"type": "char", "chars": "ab", "unknown": "unk", "special_tokens": {EOT: 9}},
    )
    tok_case(
        "bpe tokenizer: vocab is a string",
        {"type": "bpe", "vocab": "ab", "merges": [], "special_tokens": {}, "pattern": "x"},
    )
    tok_case(
        "bpe tokenizer: special id is true",
        {"type": "bpe", "vocab": [], "merges": [], "special_tokens": {EOT: True}, "pattern": "x"},
    )
    tok_case(
        "bpe tokenizer: merge is a number",
        {"type": "bpe", "vocab": [], "merges": [1], "special_tokens": {}, "pattern": "x"},
    )
    tok_case("tokenizer of an unknown type", {"type": "wordpiece"})

    # -- input text
    def text_case(name: str, data: bytes, expect: int = 2) -> None:
        def setup(w: Path) -> list[object]:
            (w / "input.txt").write_bytes(data)
            return ["prepare", w / "input.txt", "--out", w / "out", "--no-progress"]

        case(name, expect, setup)

    rng = np.random.default_rng(0)
    text_case("ELF executable as text", b"\x7fELF\x02\x01\x01\x00" + rng.bytes(5000))
    text_case("PNG image as text", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + rng.bytes(5000))
    text_case("random high bytes (no NUL)", rng.integers(128, 256, 5000, dtype=np.uint8).tobytes())
    text_case("UTF-16 text", "Hello, world. ".encode("utf-16") * 100)
    text_case(
        "Latin-1 text (kept, with a note)", "Le café était très bon. ".encode("latin-1") * 100, 0
    )
    case(
        "directory holding an image",
        2,
        lambda w: (
            (w / "docs").mkdir(),
            (w / "docs" / "a.txt").write_text("hello " * 50),
            (w / "docs" / "b.png").write_bytes(b"\x89PNG\x00" * 99),
            ["prepare", w / "docs", "--out", w / "out"],
        )[-1],
    )

    # -- filesystem
    case(
        "prepare --out is a file",
        2,
        lambda w: ((w / "f").write_text("x"), ["prepare", corpus, "--out", w / "f"])[1],
    )
    case(
        "train out_dir is a file",
        2,
        lambda w: (
            (w / "f").write_text("x"),
            ["train", "tiny", f"data.train={corpus}", f"out_dir={w / 'f'}", *SMALL],
        )[1],
    )
    case(
        "prepare into a dir with someone's tokenizer.json",
        2,
        lambda w: (
            (w / "o").mkdir(),
            (w / "o" / "tokenizer.json").write_text("{}"),
            ["prepare", corpus, "--out", w / "o"],
        )[2],
    )
    case(
        "prepare into a dir with someone's meta.json",
        2,
        lambda w: (
            (w / "o").mkdir(),
            (w / "o" / "meta.json").write_text('{"a": 1}'),
            ["prepare", corpus, "--out", w / "o"],
        )[2],
    )
    case(
        "new run over someone's config.yaml",
        2,
        lambda w: (
            (w / "t").mkdir(),
            (w / "t" / "config.yaml").write_text("mine: 1\n"),
            train_on(w),
        )[2],
    )
    case(
        "tokenizer train --out is a directory",
        2,
        lambda w: (
            (w / "d").mkdir(),
            ["tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--out", w / "d"],
        )[1],
    )
    case(
        "--resume with config.yaml that is not YAML",
        2,
        lambda w: (
            (w / "run" / "config.yaml").write_text("a: [1,\n"),
            ["train", "--resume", w / "run"],
        )[1],
    )

    print("| case | result | exit | traceback-free | as required |\n|---|---|---:|:-:|:-:|")
    for name, first, code, clean, ok in rows:
        print(
            f"| {name} | {first.replace(str(base), '$TMP')} | {code} | {'yes' if clean else 'NO'} | {'yes' if ok else 'NO'} |"
        )
    bad = [r[0] for r in rows if not r[4]]
    print(
        f"\n{len(rows)} cases, {len(rows) - len(bad)} as required; not as required: {bad or 'none'}"
    )
    shutil.rmtree(base, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
