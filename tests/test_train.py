"""End to end: the CLI trains, checkpoints, resumes exactly, evaluates and samples, on tiny data."""

from __future__ import annotations

import pytest
from helpers import SMALL, full_and_split_losses, read_metrics, run_cli


def test_train_eval_generate_end_to_end(tmp_path, corpus, capsys):
    code = run_cli(
        "train", "tiny", f"data.train={corpus}", f"out_dir={tmp_path}", "run_name=r", "train.max_steps=12",
        "eval.interval=6", "checkpoint.interval=6", "log.interval=3", *SMALL,
    )  # fmt: skip
    assert code == 0
    run = tmp_path / "r"
    out = capsys.readouterr().out
    assert "val loss" in out and "--- sample 0 at step 12 ---" in out
    assert "compile: auto: off" in out  # train.compile=auto: a 12-step run is not worth compiling
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "step_00000012" / "model.safetensors").is_file()
    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    assert all(r["tokens_per_second"] > 0 and r["lr"] > 0 for r in train)
    evals = read_metrics(run, "eval")
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["val/loss"] < 4.0 and evals[-1]["val/bits_per_byte"] > 0
    assert read_metrics(run, "sample")

    assert run_cli("eval", run) == 0
    assert "perplexity" in capsys.readouterr().out
    assert (
        run_cli("generate", run, "--prompt", "ANNA:", "--max-new-tokens", "20", "--seed", "1") == 0
    )
    first = capsys.readouterr().out
    assert first.startswith("ANNA:")
    run_cli("generate", run, "--prompt", "ANNA:", "--max-new-tokens", "20", "--seed", "1")
    assert capsys.readouterr().out == first  # seeded sampling is reproducible


def test_resume_continues_the_step_count(tmp_path, corpus):
    common = [
        f"data.train={corpus}",
        f"out_dir={tmp_path}",
        "run_name=r",
        "eval.interval=0",
        "log.interval=2",
        *SMALL,
    ]
    assert run_cli("train", "tiny", "train.max_steps=6", *common) == 0
    assert run_cli("train", "tiny", "train.max_steps=10", *common, "--resume") == 0
    steps = [r["step"] for r in read_metrics(tmp_path / "r", "train")]
    assert steps == [2, 4, 6, 8, 10]
    # the same command without --resume refuses to overwrite the run
    assert run_cli("train", "tiny", "train.max_steps=10", *common) == 2


def test_resume_is_bit_identical(tmp_path, corpus):
    """2N steps in one go == N steps, stop, resume, N more (dropout on, so RNG state matters)."""
    common = [
        f"data.train={corpus}", f"out_dir={tmp_path}", "log.interval=1", "eval.interval=4", "eval.samples=1",
        "model.dropout=0.1", "optim.decay_steps=8", "optim.warmup_steps=2", *SMALL,
    ]  # fmt: skip
    full, split = full_and_split_losses(tmp_path, common, 8)
    assert len(full) == 8
    assert split == full  # exact float equality, not approximate


def test_resume_refuses_a_changed_config(tmp_path, corpus, capsys):
    common = [
        f"data.train={corpus}",
        f"out_dir={tmp_path}",
        "run_name=r",
        "eval.interval=0",
        *SMALL,
    ]
    assert run_cli("train", "tiny", "train.max_steps=2", *common) == 0
    capsys.readouterr()
    assert run_cli("train", "tiny", "train.max_steps=4", "optim.lr=0.1", *common, "--resume") == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.002 -> 0.1" in err and "--force" in err
    assert (
        run_cli(
            "train", "tiny", "train.max_steps=4", "optim.lr=0.1", *common, "--resume", "--force"
        )
        == 0
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["model.n_layers=3"], "unknown config key 'model.n_layers'"),
        (["data.train=/no/such/file.txt"], "/no/such/file.txt"),
        (["model.n_head=3"], "must divide"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, args, fragment, capsys):
    code = run_cli("train", "tiny", f"out_dir={tmp_path}", *SMALL, *args)
    assert code == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err


def test_empty_and_too_short_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert run_cli("train", "tiny", f"data.train={empty}", f"out_dir={tmp_path}", *SMALL) == 2
    assert "empty" in capsys.readouterr().err.lower()
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert run_cli("train", "tiny", f"data.train={short}", f"out_dir={tmp_path}", *SMALL) == 2
    assert "context_length" in capsys.readouterr().err
