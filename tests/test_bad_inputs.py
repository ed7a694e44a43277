"""A table of bad inputs across every command: each is refused with exit status 2, one message that
names the problem, and no traceback.

Most cases run in-process through `tinylm.cli.main` (fast); `test_real_exit_path` runs a few as
`python -m tinylm.cli` subprocesses to prove the real process exit status and stderr. Train cases
carry small-model settings, so a case that were wrongly accepted would finish in seconds rather
than hang the suite. `{run}` is a trained two-step run, `{corpus}` a small text file, `{tmp}` an
empty directory, `{file}` a plain text file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SMALL, train_two_steps

from tinylm.cli import main

TRAIN = ["train", "tiny", *SMALL, "train.max_steps=1", "data.train={corpus}", "out_dir={tmp}"]


def T(*overrides: str) -> list[str]:
    """A `tinylm train` command with these overrides after the small-model ones."""
    return [*TRAIN, *overrides]


def TT(*args: str, input: str = "{corpus}") -> list[str]:
    """A `tinylm tokenizer train` command."""
    return ["tokenizer", "train", "--input", input, *args, "--out", "{tmp}/t.json"]


# A "billion laughs" YAML: nine levels of nine aliases (9^9 values) in ~300 bytes.
BOMB_FILE = "a: &a [l, l, l, l, l, l, l, l, l]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)
BOMB_FLOW = (
    "[&a [l, l, l, l, l, l, l, l, l], "
    + ", ".join(
        f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "]"
)

# (argv, fragment of the message that names the problem)
# fmt: off
CASES: list[tuple[list[str], str]] = [
    # ---- config values the issue lists as silently accepted
    (T("eval.samples=-1"), "eval.samples=-1"),
    (T("eval.sample_tokens=-1"), "eval.sample_tokens=-1"),
    (T("eval.temperature=-1"), "eval.temperature=-1"),
    (T("optim.decay_steps=-5"), "optim.decay_steps=-5"),
    (T("train.max_time_minutes=-1"), "train.max_time_minutes=-1"),
    (T("eval.batch_size=-1"), "eval.batch_size=-1"),
    # ---- config domains: zero, negative, NaN, infinity, huge
    (T("model.n_layer=1000000"), "model.n_layer=1000000"),
    (T("model.n_layer=0"), "model.n_layer=0"),
    (T("model.d_model=0"), "model.d_model=0"),
    (T("model.n_head=0"), "model.n_head=0"),
    (T("model.context_length=0"), "model.context_length=0"),
    (T("model.context_length=100000000"), "model.context_length"),
    (T("model.vocab_size=-1"), "model.vocab_size=-1"),
    (T("model.vocab_multiple=0"), "model.vocab_multiple=0"),
    (T("model.rope_theta=0"), "model.rope_theta=0"),
    (T("model.norm_eps=0"), "model.norm_eps=0"),
    (T("model.norm_eps=nan"), "model.norm_eps=nan"),
    (T("model.dropout=1"), "model.dropout=1"),
    (T("model.attn_dropout=-0.1"), "model.attn_dropout"),
    (T("model.init_std=0"), "model.init_std=0"),
    (T("model.sliding_window=0"), "model.sliding_window=0"),
    (T("model.d_ff=0"), "model.d_ff=0"),
    (T("model.n_kv_head=0"), "model.n_kv_head=0"),
    (T("optim.lr=nan"), "optim.lr=nan"),
    (T("optim.lr=.inf"), "optim.lr=inf"),
    (T("optim.lr=-1e-3"), "optim.lr=-0.001"),
    (T("optim.lr=0"), "optim.lr=0"),
    (T("optim.eps=0"), "optim.eps=0"),
    (T("optim.beta1=1"), "optim.beta1=1"),
    (T("optim.beta2=-0.5"), "optim.beta2"),
    (T("optim.weight_decay=-0.1"), "optim.weight_decay"),
    (T("optim.grad_clip=-1"), "optim.grad_clip=-1"),
    (T("optim.warmup_steps=-1"), "optim.warmup_steps=-1"),
    (T("optim.decay_steps=0"), "optim.decay_steps=0"),
    (T("train.batch_size=0"), "train.batch_size=0"),
    (T("train.batch_size=1e30"), "train.batch_size"),
    (T("train.grad_accum=0"), "train.grad_accum=0"),
    (T("train.max_steps=0"), "train.max_steps=0"),
    (T("train.max_steps=abc"), "train.max_steps: expected an integer"),
    (T("train.max_steps=1.5"), "train.max_steps: expected an integer"),
    (T("train.seed=-1"), "train.seed=-1"),
    (T("train.seed=5000000000"), "train.seed=5000000000"),
    (T("train.max_nonfinite_steps=0"), "train.max_nonfinite_steps=0"),
    (T("train.spike_factor=0.5"), "train.spike_factor=0.5"),
    (T("train.gap_warn_factor=nan"), "train.gap_warn_factor"),
    (T("train.early_stop_patience=-1"), "train.early_stop_patience=-1"),
    (T("train.early_stop_min_delta=-1"), "train.early_stop_min_delta"),
    (T("eval.max_batches=0"), "eval.max_batches=0"),
    (T("eval.interval=-1"), "eval.interval=-1"),
    (T("eval.top_k=-1"), "eval.top_k=-1"),
    (T("eval.sample_tokens=100000000"), "eval.sample_tokens"),
    (T("checkpoint.keep_last=0"), "checkpoint.keep_last=0"),
    (T("checkpoint.interval=-1"), "checkpoint.interval=-1"),
    (T("checkpoint.milestone_interval=-1"), "checkpoint.milestone_interval"),
    (T("log.interval=0"), "log.interval=0"),
    (T("data.val_fraction=1"), "data.val_fraction=1"),
    (T("data.val_count=-1"), "data.val_count=-1"),
    (T("data.num_workers=-1"), "data.num_workers=-1"),
    (T("data.prefetch=-1"), "data.prefetch=-1"),
    (T("data.split_seed=-3"), "data.split_seed=-3"),
    (T("data.mix=[{path: a.txt, weight: 0}]"), "data.mix[0].weight=0"),
    (T("data.mix=[{path: '', weight: 1}]"), "data.mix[0].path is empty"),
    # ---- relations, choices, types
    (T("model.n_kv_head=3", "model.n_head=4", "model.d_model=32"), "must divide model.n_head"),
    (T("model.n_head=3"), "must divide model.d_model"),
    (T("optim.min_lr=0.5", "optim.lr=0.1"), "optim.min_lr=0.5"),
    (T("model.norm=batchnorm"), "model.norm: must be one of"),
    (T("model.qk_norm=maybe"), "model.qk_norm: expected true or false"),
    (T("train.activation_checkpointing=maybe"), "train.activation_checkpointing"),
    (T("train.precision=fp8"), "train.precision=fp8 needs an NVIDIA GPU with FP8 matmuls"),
    (T("train.precision=fp9"), "train.precision: must be one of"),
    (T("train.device=xla"), "optim.name=muon is not supported on train.device=xla"),
    (T("train.device=xla", "optim.name=adamw", "train.compile=true"), "XLA compiles each step's graph"),
    (T("train.device=xla", "optim.name=adamw", "train.precision=fp16"), "fp16 is not supported on train.device=xla"),
    (T("train.device=xla", "optim.name=adamw", "train.distributed=fsdp"), "fsdp is not supported on train.device=xla"),
    (T("train.device=xla", "optim.name=adamw"), "train.device=xla needs PyTorch/XLA"),
    (["estimate", "tiny", "--device", "tpu-v9-8"], "argument --device"),
    (["estimate", "tiny", "--device", "tpu-v3-7"], "argument --device"),
    (T("train.device=gpu"), "train.device='gpu' is not a device"),
    (T("train.threads=0"), "train.threads=0"),
    (T("train.threads=many"), "train.threads: expected int | 'auto'"),
    (["train", "tiny.yaml", *SMALL], "Did you mean the preset 'tiny'"),
    (T("data.tokenizer=bpe:abc"), "bpe:abc"),
    # ---- names and keys
    (T("run_name=a/b"), "run_name='a/b' must be a single directory name"),
    (T("run_name=.."), "run_name='..'"),
    (T("max_steps=5"), "Did you mean 'train.max_steps'"),
    (T("train.lr=1e-3"), "Did you mean 'optim.lr'"),
    (T("model.n_layerz=2"), "Did you mean 'model.n_layer'"),
    (T("model.n_layer.x=3"), "'n_layer' is a value, not a section"),
    (T("train.max_steps"), "not of the form section.key=value"),
    (T("=3"), "has an empty key"),
    (["train", "tiyn"], "Did you mean 'tiny'"),
    (["train", "{tmp}/nope.yaml"], "not found"),
    (["train", "{tmp}"], "is a directory"),
    (["train"], "give a preset or config file"),
    (["train", "{badyaml}"], "not valid YAML"),
    (["train", "{listyaml}"], "expected a mapping of sections"),
    # ---- data sources and tokenizers named by the config
    (T("data.train={tmp}/missing.txt"), "missing.txt' not found"),
    (T("data.train={corpus_typo}"), "Did you mean"),
    (T("data.train=tinyshakspeare"), "Did you mean 'tinyshakespeare'"),
    (T("data.tokenizer={tmp}/no-tokenizer.json"), "no-tokenizer.json"),
    (T("data.train={tmp}"), "contains no files"),
    # ---- resume
    (["train", "--resume", "{tmp}/no-run"], "no config.yaml there"),
    (["train", "--resume", "{run}", "model.n_layer=3"], "train.init_from="),
    (["train", "--resume", "{run}", "model.d_model=48", "--force"], "not even with --force"),
    (["train", "--resume", "{run}", "model.bias=true", "--force"], "shape differs"),
    (
        ["train", "--resume", "{run}", "model.pos_emb=learned", "--force"],
        "pos_emb.weight: new in this config",
    ),
    (["train", "--resume", "{run}", "optim.lr=0.5"], "-> 0.5\nResume with the original"),
    # ---- memory preflight
    (T("model.n_layer=1000", "model.d_model=8192"), "--force to try anyway"),
    (T("train.batch_size=65536", "model.context_length=65536"), "train.batch_size="),
    # ---- generate
    (["generate", "{run}", "--temperature", "-1"], "argument --temperature"),
    (["generate", "{run}", "--temperature", "nan"], "argument --temperature"),
    (["generate", "{run}", "--temperature", "inf"], "argument --temperature"),
    (["generate", "{run}", "--top-p", "1.5"], "argument --top-p"),
    (["generate", "{run}", "--top-p", "0"], "argument --top-p"),
    (["generate", "{run}", "--top-k", "-1"], "argument --top-k"),
    (["generate", "{run}", "--max-new-tokens", "-5"], "argument --max-new-tokens"),
    (["generate", "{run}", "--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["generate", "{run}", "--max-new-tokens", "1000000000"], "argument --max-new-tokens"),
    (["generate", "{run}", "--max-new-tokens", "1e3"], "argument --max-new-tokens"),
    (["generate", "{run}", "--num-samples", "0"], "argument --num-samples"),
    (["generate", "{run}", "--seed", "-1"], "argument --seed"),
    (["generate", "{run}", "--checkpoint", "first"], "argument --checkpoint"),
    (["generate", "{run}", "--device", "gpu"], "argument --device"),
    (["generate", "{tmp}/no-run"], "neither a run directory nor a checkpoint"),
    (["generate", "{tmp}"], "no intact checkpoint"),
    (["generate", "{file}"], "neither a run directory nor a checkpoint"),
    # ---- eval
    (["eval", "{run}", "--stride", "-1"], "argument --stride"),
    (["eval", "{run}", "--full", "--stride", "100000"], "--stride 100000"),
    (["eval", "{run}", "--max-batches", "-1"], "argument --max-batches"),
    (["eval", "{run}", "--batch-size", "-1"], "argument --batch-size"),
    (["eval", "{run}", "--batch-size", "nan"], "argument --batch-size"),
    (["eval", "{run}", "--device", "tpu"], "argument --device"),
    (["eval", "{run}", "--data", "{tmp}/missing.txt"], "missing.txt' not found"),
    (["eval", "{tmp}/no-run"], "neither a run directory nor a checkpoint"),
    # ---- prepare
    (["prepare", "{corpus}", "--out", "{tmp}/p", "--workers", "-2"], "argument --workers"),
    (["prepare", "{corpus}", "--out", "{tmp}/p", "--chunk-mb", "-1"], "argument --chunk-mb"),
    (["prepare", "{corpus}", "--out", "{tmp}/p", "--chunk-mb", "0"], "argument --chunk-mb"),
    (["prepare", "{corpus}", "--out", "{tmp}/p", "--chunk-mb", "nan"], "argument --chunk-mb"),
    (["prepare", "{corpus}", "--out", "{tmp}/p", "--val-fraction", "1.5"], "--val-fraction"),
    (["prepare", "{corpus}", "--out", "{tmp}/p", "--val-fraction", "-0.1"], "--val-fraction"),
    (["prepare", "{corpus}", "--out", "{tmp}/p", "--val-count", "-1"], "argument --val-count"),
    (["prepare", "{corpus}", "--out", "{tmp}/p", "--seed", "-1"], "argument --seed"),
    (["prepare", "{tmp}/missing.txt", "--out", "{tmp}/p"], "missing.txt' not found"),
    (["prepare", "tinyshakspeare", "--out", "{tmp}/p"], "Did you mean 'tinyshakespeare'"),
    (["prepare", "{corpus}", "--out", "{tmp}/p", "--tokenizer", "bpe:abc"], "bpe:abc"),
    (["prepare", "{corpus}"], "the following arguments are required: --out"),
    # ---- tokenizer
    (TT("--vocab-size", "-1"), "--vocab-size"),
    (TT("--vocab-size", "abc"), "--vocab-size"),
    (TT("--vocab-size", "300", "--workers", "0"), "--workers"),
    (TT("--vocab-size", "10"), "too small"),
    (TT("--vocab-size", "300", input="{tmp}/missing.txt"), "missing.txt"),
    (["tokenizer", "encode", "--tokenizer", "{tmp}/missing.json", "--text", "hi"], "missing.json"),
    (["tokenizer", "encode", "--tokenizer", "{run}/tokenizer.json", "--input", "{tmp}/missing.txt"], "missing.txt"),
    (["tokenizer", "encode", "--tokenizer", "{run}/tokenizer.json", "--text", "a", "--input", "{corpus}"], "not allowed with argument"),
    (["tokenizer", "stats", "--tokenizer", "{run}/tokenizer.json", "{tmp}/missing.txt"], "missing.txt"),
    (["tokenizer", "import", "--out", "{tmp}/t.json"], "give exactly one of --hf"),
    (["tokenizer", "export", "--tokenizer", "{run}/tokenizer.json", "--to", "hf", "--out", "{tmp}/x.json"], "needs a BPE tokenizer"),
    (["tokenizer", "export", "--tokenizer", "{run}/tokenizer.json", "--to", "onnx", "--out", "{tmp}/x"], "argument --to"),
    (["tokenizer", "frobnicate"], "invalid choice: 'frobnicate'"),
    # ---- estimate
    (["estimate", "tiny", "--mfu", "0"], "argument --mfu"),
    (["estimate", "tiny", "--mfu", "2"], "argument --mfu"),
    (["estimate", "tiny", "--mfu", "nan"], "argument --mfu"),
    (["estimate", "tiny", "--tokens", "-1"], "argument --tokens"),
    (["estimate", "tiny", "--gpu-memory", "0"], "argument --gpu-memory"),
    (["estimate", "tiny", "--gpu-memory", "nan"], "argument --gpu-memory"),
    (["estimate", "tiny", "--tokens", "inf"], "argument --tokens"),
    (["estimate", "tiny", "--tokens-per-second", "0"], "argument --tokens-per-second"),
    (["estimate", "tiny", "--peak-tflops", "-1"], "argument --peak-tflops"),
    (["estimate", "tiny", "model.n_layer=-1"], "model.n_layer=-1"),
    (["estimate", "tiyn"], "Did you mean 'tiny'"),
    # ---- serve (argument checks come before the optional server dependencies are needed)
    (["serve", "{run}", "--port", "-1"], "argument --port"),
    (["serve", "{run}", "--port", "70000"], "argument --port"),
    (["serve", "{run}", "--max-batch", "0"], "argument --max-batch"),
    (["serve", "{run}", "--max-body-kb", "0"], "argument --max-body-kb"),
    (["serve", "{run}", "--device", "gpu"], "argument --device"),
    (["serve", "{run}", "--log-level", "loud"], "argument --log-level"),
    (["serve", "{tmp}/no-runs"], "no such run or runs directory"),
    (["serve", "{file}"], "is a file"),
    (["serve", "{run}", "--api-key", ""], "--api-key (or $TINYLM_API_KEY) is empty"),
    (["serve", "{run}", "--api-key", "a key"], "--api-key: use printable ASCII"),
    (["serve", "{run}", "--max-models", "0"], "argument --max-models"),
    (["generate", "{run}", "--stop", ""], "--stop: a stop string cannot be empty"),
    # ---- sweep, scaling, curricula (issue 20; issue 21: a NaN abandon factor was accepted)
    (["sweep", "tiny", "optim.lr=1e-3,2e-3", "--abandon-factor", "nan"], "argument --abandon-factor"),
    (["sweep", "tiny", "optim.lr=1e-3,2e-3", "--abandon-after", "2"], "argument --abandon-after"),
    (["sweep", "tiny", "optim.lr=1e-3,2e-3", "--trials", "0"], "argument --trials"),
    (["sweep", "tiny", "optim.lr=log:0..1", "--trials", "2"], "a log range needs a > 0"),
    (["sweep", "tiny", "optim.lr=log:1e-3..1e-2"], "needs --trials"),
    (["sweep", "tiny", "optim.lr=log:1e-3..1e-2", "--sampler", "grid"], "grid needs lists"),
    (["sweep", "tiny", "optim.lr=1e-3,2e-3", "--out", "{file}"], "is a file"),
    (["sweep", "tiny", "optim.lr=1e-3,2e-3", "--storage", "nosuch://x", "--out", "{tmp}/sw"],
     "cannot open the study"),
    (["scaling", "{tmp}/nothing"], "not a directory of runs"),
    (["scaling", "{tmp}"], "needs at least 3"),
    (T("data.phases=[{until: 1, weights: [1]}]"), "at least two in data.mix"),
    # ---- runs, plot, datasets, top level
    (["runs", "{tmp}/no-runs"], "no-runs"),
    (["plot", "{tmp}/no-run", "--out", "{tmp}/p.png"], "no-run"),
    (["plot", "{run}", "--out", "{tmp}/p.txt"], "--out"),
    (["datasets", "download", "nosuch"], "name a registered dataset"),
    (["datasets", "write", "tinyshakespeare"], "needs --out"),
    (["datasets", "explode"], "invalid choice: 'explode'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
    # ---- issue 21: bombs, links, wrong results with exit 0, internal errors on rare paths
    (["train", "{bomb}"], "expand it to more than 100,000 values"),
    (T(f"model.n_layer={BOMB_FLOW}"), "expand it to more than 100,000 values"),
    (["sweep", "tiny", f"model.n_layer={BOMB_FLOW},2", "--out", "{tmp}/s"], "expand it to more"),
    (["train", "--resume", "{run}", "--cooldown", "0"], "argument --cooldown"),
    (["generate", "{run}", "--prompt", "caf\udce9"], "not UTF-8"),
    (["tokenizer", "encode", "--tokenizer", "{run}/tokenizer.json", "--text", "\udcff"], "not UTF-8"),
    (["export", "{run}", "--out", "{run}/checkpoints/step_00000002", "--force"], "inside the run or checkpoint"),
    (["export", "{run}", "--out", "{run}", "--force"], "inside the run or checkpoint"),
    (["export", "{run}", "--out", "{file}/sub/hf"], "a part of the path is a file"),
    (["export", "{run}", "--out", "/sys/tinylm-export/hf"], "cannot create"),
    (T("train.init_from={hfbig}"), "model.n_layer=1000000000000"),
    (["eval", "{run}", "--tasks", "x", "--limit", "1e30"], "--limit 1e30"),
]
# fmt: on


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus) -> Path:
    """A two-step run of the small model (its own cache, like every test's)."""
    return train_two_steps(tmp_path_factory.mktemp("bad-inputs-run"), corpus)


def _fill(argv: list[str], trained_run: Path, corpus: Path, tmp: Path) -> list[str]:
    (tmp / "bad.yaml").write_text("train: {max_steps: [unclosed\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "plain.txt").write_text("just text\n")
    (tmp / "bomb.yaml").write_text(BOMB_FILE)
    (tmp / "hfbig").mkdir(exist_ok=True)
    (tmp / "hfbig" / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, '
        '"num_hidden_layers": 1000000000000, "vocab_size": 100, "intermediate_size": 128}'
    )
    typo = corpus.with_name(corpus.stem[:-1] + corpus.stem[-1] * 2 + corpus.suffix)
    values = {
        "run": trained_run, "corpus": corpus, "tmp": tmp / "empty", "file": tmp / "plain.txt",
        "badyaml": tmp / "bad.yaml", "listyaml": tmp / "list.yaml", "corpus_typo": typo,
        "bomb": tmp / "bomb.yaml", "hfbig": tmp / "hfbig",
    }  # fmt: skip
    out = []
    for arg in argv:
        for name, value in values.items():
            arg = arg.replace("{" + name + "}", str(value))
        out.append(arg)
    return out


def test_the_table_is_large_and_distinct():
    keys = [tuple(argv) for argv, _ in CASES]
    assert len(set(keys)) == len(keys) >= 100


@pytest.mark.parametrize(
    "argv, fragment",
    CASES,
    ids=[
        " ".join(a[len(TRAIN) :] if a[:2] == TRAIN[:2] and len(a) > len(TRAIN) else a) or "no-args"
        for a, _ in CASES
    ],
)
def test_bad_input_is_refused_clearly(argv, fragment, trained_run, corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    filled = _fill(argv, trained_run, corpus, tmp_path)
    fragment = _fill([fragment], trained_run, corpus, tmp_path)[0]
    code = main(filled)
    out, err = capsys.readouterr()
    assert code == 2, (filled, out, err)
    assert fragment in err, err
    assert "Traceback" not in err + out
    assert "internal error" not in err
    assert not (tmp_path / "empty" / "r").exists() or filled[0] != "train"


def test_memory_preflight_refuses_at_once():
    main(["train", "tiny", "model.n_layer=1000", "model.d_model=8192"])  # imports (2 s cold)
    t0 = time.perf_counter()
    assert main(["train", "tiny", "model.n_layer=1000", "model.d_model=8192"]) == 2
    assert main(["train", "tiny", "model.n_layer=1000000"]) == 2
    assert time.perf_counter() - t0 < 1.0


def test_refused_resume_leaves_the_run_as_it_was(trained_run, capsys):
    before = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    metrics = (trained_run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(trained_run), "model.n_layer=3", "--force"]) == 2
    assert "model.n_layer: 2 -> 3" in capsys.readouterr().err
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == before
    assert (trained_run / "metrics.jsonl").read_text() == metrics


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "tiny", "eval.samples=-1"], "eval.samples=-1"),
        (["train", "tiny", "train.resume=sometimes"], "train.resume: must be one of 'auto'"),
        (["train", "tiny", "model.n_layer=1000000"], "model.n_layer=1000000"),
        (["generate", "nowhere", "--top-p", "1.5"], "argument --top-p"),
        (["prepare", "x.txt", "--out", "o", "--workers", "-2"], "argument --workers"),
        (["eval", "nowhere"], "neither a run directory nor a checkpoint"),
        # bytes that are not UTF-8 in an argument: once a double traceback (issue 21)
        (["generate", "nowhere", "--prompt", "caf\udce9"], "not UTF-8"),
    ],
)
def test_real_exit_path(argv, fragment, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tinylm.cli", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1  # one message (argparse adds the usage above it)


def test_internal_error_is_one_line_and_a_report_file(tmp_path, monkeypatch, capsys):
    """A bug (any exception that is not a user error) exits 1 with a pointer to the traceback."""
    import tinylm.estimate

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(tinylm.estimate, "estimate", broken)
    assert main(["estimate", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error" in err and "KeyError" in err
    report = Path(err.split("traceback written to ")[1].split(";")[0])
    assert report.parent == tmp_path / "cache" / "crash-reports"
    text = report.read_text()
    assert "Traceback" in text and "in broken" in text and "tinylm estimate tiny" in text


def test_internal_error_report_goes_to_the_run_directory(trained_run, monkeypatch, capsys):
    import tinylm.train.checkpoint

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tinylm.train.checkpoint, "load_model", broken)
    assert main(["generate", str(trained_run)]) == 1
    err = capsys.readouterr().err
    report = Path(err.split("traceback written to ")[1].split(";")[0])
    assert report.parent == trained_run and "RuntimeError: boom" in report.read_text()
    report.unlink()


def test_internal_error_exit_status_of_the_real_process(tmp_path):
    code = (
        "import sys, tinylm.estimate as e\n"
        "e.estimate = lambda *a, **k: 1 / 0\n"
        "from tinylm.cli import main\n"
        "sys.exit(main(['estimate', 'tiny']))\n"
    )
    env = {**os.environ, "TINYLM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 1
    assert "internal error" in proc.stderr and "ZeroDivisionError" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "cache" / "crash-reports").iterdir())


def test_generate_past_the_context_says_so(trained_run, capsys):
    assert main(["generate", str(trained_run), "--max-new-tokens", "40", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert "past the model's context (32)" in err and out.strip()


# ---- pretokenized sources and `data check` (issue 23): files written by the fixture below
# fmt: off
PRETOKENIZED_CASES: list[tuple[list[str], str]] = [
    (T("data.train={p}/short.bin", "data.tokenizer=gpt2"), "truncated llm.c shard"),
    (T("data.train={p}/cut.bin", "data.tokenizer=gpt2"), "truncated or not an llm.c shard"),
    (T("data.train={p}/v9.bin", "data.tokenizer=gpt2"), "llm.c shard version 9"),
    (T("data.train={p}/model.bin", "data.tokenizer=gpt2"), "an llm.c model checkpoint"),
    (T("data.train={p}/odd.bin", "data.tokenizer=gpt2"), "not a whole number of uint16 ids"),
    (T("data.train={p}/big.bin", "data.tokenizer=gpt2"), "token id 60,000 is outside"),
    (T("data.train={p}/ok.bin"), "nothing says which tokenizer made them"),
    (T("data.train={p}/ok.bin", "data.tokenizer=bpe:300"), "nothing says which tokenizer"),
    (T("data.train={p}/u8.npy", "data.tokenizer=gpt2"), "uint8 ids cannot hold a vocabulary"),
    (T("data.train={p}/f.npy", "data.tokenizer=gpt2"), "token ids must be integers"),
    (T("data.train={p}/ok.bin", "data.tokenizer=gpt2", "data.token_dtype=int64"), "data.token_dtype"),
    (T("data.train={p}/declared/ok.bin", "data.tokenizer=gpt2"), "different tokenizers"),
    (T("data.train={p}/ok.bin", "data.val={corpus}", "data.tokenizer=gpt2"), "mix text and token ids"),
    (["data", "check", "{corpus}", "--fail-on", "ngrams=1"], "--fail-on 'ngrams=1'"),
    (["data", "check", "{corpus}", "--weights", "1,2"], "--weights: give 1 positive"),
    (["data", "check", "{p}/nope.txt"], "not found"),
]
# fmt: on


@pytest.fixture(scope="module")
def bad_token_files(tmp_path_factory) -> Path:
    import numpy as np

    from tinylm.data.pretokenized import LLMC_MAGIC
    from tinylm.tokenizer import CharTokenizer

    d = tmp_path_factory.mktemp("bad-tokens")

    def llmc(name: str, version: int, count: int, ids: int) -> None:
        header = np.zeros(256, "<i4")
        header[:3] = (LLMC_MAGIC, version, count)
        (d / name).write_bytes(header.tobytes() + np.arange(ids, dtype="<u2").tobytes())

    (d / "short.bin").write_bytes(np.array([LLMC_MAGIC, 1, 5], "<i4").tobytes())
    llmc("cut.bin", 1, 1000, 10)
    llmc("v9.bin", 9, 10, 10)
    (d / "model.bin").write_bytes(np.array([20240326, 3, 1024], "<i4").tobytes() * 100)
    (d / "odd.bin").write_bytes(b"\x01\x00\x02")
    np.array([1, 2, 60000, 3] * 100, "<u2").tofile(d / "big.bin")
    np.arange(1000, dtype="<u2").tofile(d / "ok.bin")
    np.save(d / "u8.npy", np.arange(200, dtype=np.uint8))
    np.save(d / "f.npy", np.ones(200, dtype=np.float32))
    (d / "declared").mkdir()
    np.arange(1000, dtype="<u2").tofile(d / "declared" / "ok.bin")
    CharTokenizer.fit(["abc"]).save(d / "declared" / "tokenizer.json")
    return d


@pytest.mark.parametrize(
    "argv, fragment", PRETOKENIZED_CASES, ids=[f for _, f in PRETOKENIZED_CASES]
)
def test_bad_token_source_is_refused_clearly(
    argv, fragment, bad_token_files, trained_run, corpus, tmp_path, capsys
):
    (tmp_path / "empty").mkdir()
    filled = [
        a.replace("{p}", str(bad_token_files)) for a in _fill(argv, trained_run, corpus, tmp_path)
    ]
    code = main(filled)
    out, err = capsys.readouterr()
    assert code == 2, (filled, out, err)
    assert fragment in err, err
    assert "Traceback" not in err + out and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"WORLD_SIZE": "2"}, "RANK=None in the environment: missing"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' in the environment: not a non-negative"),
        ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 is not a rank of WORLD_SIZE=2"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"LOCAL_WORLD_SIZE": "1.5"}, "LOCAL_WORLD_SIZE='1.5'"),  # read by the memory preflight
    ],
)
def test_distributed_environment_without_a_launcher(
    env, fragment, corpus, tmp_path, monkeypatch, capsys
):
    """`WORLD_SIZE=2 tinylm train ...` by hand, without torchrun: once a KeyError (issue 21)."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(_fill(T(), Path(), corpus, tmp_path)) == 2
    err = capsys.readouterr().err
    assert fragment in err and "torchrun" in err and "internal error" not in err


def test_crash_report_of_text_that_is_not_utf8(tmp_path, monkeypatch, capsys):
    """The crash reporter wrote surrogate escapes (bytes that are not UTF-8 in an argument or a
    message) with a strict encoder, and crashed itself: a second traceback (issue 21)."""
    import tinylm.estimate

    def broken(*args, **kwargs):
        raise RuntimeError("bad byte \udcff here")

    monkeypatch.setattr(tinylm.estimate, "estimate", broken)
    assert main(["estimate", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "bad byte \\udcff here" in err
    report = Path(err.split("traceback written to ")[1].split(";")[0])
    assert "bad byte \\udcff here" in report.read_text()
