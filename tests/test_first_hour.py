"""The first hour (issue 11): looking before training, numbers that do not mislead, and plots.

One module-scoped pair of tiny runs (a run resumed past its end, and a run with one logged point)
feeds the tests of `tinylm runs`, `tinylm plot`, `tinylm eval --data`, `tinylm generate` and the
eval-time samples; the rest are unit tests and quick CLI calls.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import SMALL, read_metrics, run_cli

from tinylm.config import DataConfig, config_from_dict, list_presets, load_config
from tinylm.data import resolve_data
from tinylm.data.registry import resolve_named
from tinylm.estimate import estimate
from tinylm.runs import format_table, make_figure, summarize
from tinylm.train.monitor import format_eta, slow_cpu_message
from tinylm.train.threads import threads_to_use
from tinylm.train.validation import prompt_line


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """`resumed`: 6 steps, then resumed to 12 (log every 4); `one`: 2 steps, one log line;
    `stopped`: stopped by its time limit after step 1, before any log line."""
    root = tmp_path_factory.mktemp("first-hour")
    common = [f"data.train={corpus}", f"out_dir={root}", *SMALL, "eval.samples=1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLM_CACHE", str(root / "cache"))
        resumed = [*common, "run_name=resumed", "log.interval=4", "eval.interval=2"]
        assert run_cli("train", "tiny", *resumed, "train.max_steps=6") == 0
        assert run_cli("train", "--resume", root / "resumed", "train.max_steps=12") == 0
        assert run_cli("train", "tiny", *common, "run_name=one", "train.max_steps=2") == 0
        stopped = [*common, "run_name=stopped", "log.interval=4", "train.max_time_minutes=1e-9"]
        assert run_cli("train", "tiny", *stopped, "train.max_steps=50") == 0
    return root


def test_runs_reads_progress_from_the_checkpoint_state(runs, capsys):
    tokens_per_step = 8 * 32  # SMALL: batch 8 x context 32
    resumed = summarize(runs / "resumed")
    assert (resumed.status, resumed.step, resumed.tokens) == ("finished", 12, 12 * tokens_per_step)
    # Stopped after step 1 with no log line: only the checkpoint knows how far it got.
    assert not read_metrics(runs / "stopped", "train")
    stopped = summarize(runs / "stopped")
    assert (stopped.status, stopped.step, stopped.tokens) == ("stopped", 1, tokens_per_step)
    assert "stopped   1/50   256" in format_table([resumed, stopped])


def test_log_lines_over_a_partial_window_say_so(runs, capsys):
    train = {r["step"]: r for r in read_metrics(runs / "resumed", "train")}
    assert sorted(train) == [4, 6, 8, 12]
    # Step 6 ends the first session (2 steps), step 8 is the first after the resume (2 steps).
    assert [train[s].get("window_steps") for s in (4, 6, 8, 12)] == [None, 2, 2, None]
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLM_CACHE", str(runs / "cache"))
        assert run_cli("train", "--resume", runs / "resumed", "train.max_steps=15") == 0
    out = capsys.readouterr().out
    assert re.search(r"step +15 \| loss [0-9.]+ \(mean of 3 steps\)", out)


def test_eval_time_samples_start_at_varied_lines_of_the_val_text(runs, corpus):
    lines = set(corpus.read_text().splitlines())
    samples = [r["text"] for r in read_metrics(runs / "resumed", "sample")]
    assert len(samples) >= 3
    firsts = [text.split("\n")[0] for text in samples]
    assert all(first in lines for first in firsts)  # each prompt is a whole line of the corpus
    assert len(set(firsts)) >= 2  # and they differ across evaluations
    assert prompt_line("ll cut\nROMEO.\nBut soft\npartial") == "ROMEO.\n"
    assert prompt_line("no line break here at all") == "line break here at all"


def test_plot_draws_markers_bits_per_byte_labels_and_a_title(runs):
    import matplotlib.pyplot as plt

    fig = make_figure([runs / "resumed", runs / "one"])
    try:
        titles = {ax.get_title(): ax for ax in fig.axes}
        assert "compared" in fig._suptitle.get_text()
        bpb_ax = titles["validation bits per byte (compares across tokenizers)"]
        evals = read_metrics(runs / "resumed", "eval")
        resumed_line, _ = bpb_ax.get_lines()
        assert list(resumed_line.get_xdata()) == [r["step"] for r in evals]
        assert list(resumed_line.get_ydata()) == pytest.approx(
            [r["val/bits_per_byte"] for r in evals]
        )
        step_ax = titles["loss vs steps"]
        by_label = {line.get_label(): line for line in step_ax.get_lines()}
        one_train = by_label["one (play.txt, char) train"]  # labeled with data and tokenizer
        assert len(one_train.get_xdata()) == 1 and one_train.get_marker() == "o"
        assert by_label["resumed (play.txt, char) train"].get_marker() in ("None", "", None)
    finally:
        plt.close(fig)


def test_eval_data_is_labeled_and_unknown_characters_are_counted(runs, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("ANNA: the red bird sang. é ☃\n" * 40)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLM_CACHE", str(runs / "cache"))
        capsys.readouterr()
        assert run_cli("eval", runs / "resumed", "--data", other, "--max-batches", "1") == 0
        out = capsys.readouterr().out
        assert "other: eval data 1,160 tokens" in out and "other: train" not in out
        # 1,160 tokens: the file's 1,159 characters before its final newline, then end-of-text.
        note = "other: eval data: 80 of 1,159 characters (6.9%) were never seen"
        assert out.count(note) == 1
        assert run_cli("generate", runs / "one", "--prompt", "ANNA é", "--max-new-tokens", "3") == 0
        err = capsys.readouterr().err
        assert err.count("prompt: 1 of 6 characters (16.7%) were never seen") == 1


def test_unknown_report_is_silent_when_nothing_was_replaced(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("abc cab bca\n" * 50)
    val.write_text("cab abc\n" * 20)
    messages: list[str] = []
    resolve_data(DataConfig(train=str(train), val=str(val)), None, 8, log=messages.append)
    assert messages and not any("never seen" in m for m in messages)


def test_train_list_shows_description_parameters_and_hardware(capsys):
    assert run_cli("train", "--list") == 0
    lines = capsys.readouterr().out.splitlines()
    for name in list_presets():
        (i,) = [k for k, line in enumerate(lines) if line.startswith(name + " ")]
        assert re.search(r"[0-9.]+M params  \S", lines[i]), lines[i]
        assert "hardware: " in lines[i + 1]
        if name in ("tiny", "tinystories-15m", "gpt2-124m", "llama-75m"):  # each says what it needs
            assert "hardware: -" not in lines[i + 1], f"{name}.yaml has no '# hardware:' line"
    tiny = next(line for line in lines if line.startswith("tiny "))
    assert "~0.8M params  a character-level model" in tiny
    assert "124.4M params" in next(line for line in lines if line.startswith("gpt2-124m"))


def test_print_config_prints_the_resolved_yaml_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ("train", "tiny", "--print-config", "train.max_steps=7", "run_name=x")
    assert run_cli(*args) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["train"]["max_steps"] == 7 and tree["data"]["train"] == "shakespeare"
    assert config_from_dict(tree).to_dict() == tree  # a complete, loadable config
    assert tree["run_name"] == "x" and not (tmp_path / "runs").exists()


def test_dry_run_builds_everything_times_steps_and_writes_no_run(tmp_path, corpus, capsys):
    out_dir = tmp_path / "runs"
    args = ("train", "tiny", f"data.train={corpus}", *SMALL, f"out_dir={out_dir}", "--dry-run")
    assert run_cli(*args) == 0
    out = capsys.readouterr().out
    m = re.search(r"tokenizer: char, (\d+) tokens", out)
    cfg = load_config("tiny", [*SMALL, f"model.vocab_size={int(m.group(1))}"])
    assert f"model: {estimate(cfg).params / 1e6:.2f}M parameters" in out
    assert re.search(r"tokenizer: char, \d+ tokens; data: [\d,]+ train tokens", out)
    assert re.search(r"memory estimate for training: [\d.]+ (KiB|MiB)", out)
    ms = float(re.search(r"time per step: (\d+) ms \(([\d,]+) tokens/s", out).group(1))
    assert ms >= 0 and "1,000 steps: about" in out
    assert not out_dir.exists()


def test_slow_cpu_message_names_the_share_and_drops_threads():
    message = slow_cpu_message(
        50,
        cpu_seconds=2.0,
        wall_seconds=10.0,
        threads=2,
        tokens_per_second=500,
        flops_per_token=1e6,
        fewer=1,
    )
    assert "got 10% of the CPU time its 2 thread(s)" in message
    assert "about 10.0x faster" in message and "Using 1 thread(s) from now on" in message
    busy_alone = dict(wall_seconds=10.0, threads=2, tokens_per_second=500, flops_per_token=1e6)
    assert slow_cpu_message(50, cpu_seconds=15.0, **busy_alone) is None
    assert [threads_to_use(2, 0.3), threads_to_use(16, 0.4), threads_to_use(4, 0.9)] == [1, 6, 3]
    assert [format_eta(45), format_eta(65), format_eta(3725)] == ["45s", "1m05s", "1h02m"]


def test_tokenizer_train_accepts_directories_and_globs(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("the cat sat on the mat. " * 200)
    (corpus / "sub" / "b.txt").write_text("a dog and a cat met. " * 200)
    outs = {}
    for name, inputs in {
        "files": [corpus / "a.txt", corpus / "sub" / "b.txt"],
        "dir": [corpus],
        "glob": [f"{corpus}/**/*.txt"],
    }.items():
        outs[name] = tmp_path / f"{name}.json"
        args = ("--vocab-size", 300, "--out", outs[name], "--workers", 1)
        assert run_cli("tokenizer", "train", "--input", *inputs, *args) == 0
    merges = {name: json.loads(path.read_text())["merges"] for name, path in outs.items()}
    assert len(merges["files"]) > 10 and merges["dir"] == merges["files"] == merges["glob"]
    capsys.readouterr()
    assert (
        run_cli(
            "tokenizer",
            "train",
            "--input",
            tmp_path / "nope",
            "--vocab-size",
            300,
            "--out",
            tmp_path / "x.json",
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err


def test_estimate_divides_time_and_shards_state_over_devices(capsys):
    cfg = load_config("gpt2-124m")
    one = estimate(cfg, tokens=10**9, peak_tflops=100)
    eight = estimate(cfg, tokens=10**9, peak_tflops=100, devices=8)
    assert eight.seconds_at_peak == pytest.approx(one.seconds_at_peak / 8)
    assert eight.fsdp_memory == (one.weights + one.gradients + one.optimizer) // 8 + (
        one.activations + one.weight_copies
    )
    assert estimate(cfg, devices=8).tokens == 8 * estimate(cfg).tokens  # per-device batches
    assert run_cli("estimate", "tiny", "--devices", "0") == 2
    assert "argument --devices: must be an integer in [1," in capsys.readouterr().err


def test_the_shipped_corpus_is_a_named_offline_dataset(tmp_path):
    train, val = resolve_named("shakespeare", tmp_path)
    docs = gzip.decompress(Path(train[0]).read_bytes()).decode().split("<|endoftext|>")
    assert len(docs) == 8 and docs[0].lstrip().startswith("HAMLET")
    tempest = gzip.decompress(Path(val[0]).read_bytes()).decode()
    assert tempest.startswith("THE TEMPEST") and "<|endoftext|>" not in tempest
    assert not (tmp_path / "downloads").exists()  # nothing fetched, nothing cached
