"""FP8 training (train.precision=fp8, torchao float8) on CPU through torchao's emulation mode.

Emulation has FP8's numerics (the same casts and scales) without FP8 matmuls, so these tests
check what can be checked without the hardware: which layers are converted, that training
tracks bf16, that the refusal without FP8 hardware is one line, and that checkpoints of an FP8
run are those of any run. Speed needs a GPU of compute capability 8.9+ (bench/device_suite.sh).
"""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL, read_metrics, run_cli

pytest.importorskip("torchao.float8", reason="torchao is not installed (pip install 'tinylm[fp8]')")

from tinylm.config import ModelConfig
from tinylm.model import GPT
from tinylm.train import fp8
from tinylm.train.checkpoint import find_latest

STEPS = 200


def test_filter_converts_block_projections_only(monkeypatch):
    """Attention and MLP projections become Float8Linear; the head, embeddings and a projection
    with a dim not divisible by 16 stay as they were; parameters are the same objects."""
    from torchao.float8.float8_linear import Float8Linear

    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    # d_ff=40: the MLP's fc (32 -> 40) and proj (40 -> 32) cannot be FP8 matmuls.
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, d_ff=40, tie_embeddings=False)
    model = GPT(cfg)
    params_before = [id(p) for p in model.parameters()]
    keys_before = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    note = fp8.convert_model(model)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert converted == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("proj", "qkv")]
    assert (
        type(model.lm_head) is torch.nn.Linear and type(model.blocks[0].mlp.fc) is torch.nn.Linear
    )
    assert "4 of 9 linear layers in float8" in note
    assert [id(p) for p in model.parameters()] == params_before  # the optimizer's parameters
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == keys_before


def test_refused_without_fp8_hardware(tmp_path, corpus, capsys, monkeypatch):
    """On a CPU (or a GPU below compute capability 8.9) a real FP8 run stops in one line,
    before any data is prepared or a run directory made."""
    monkeypatch.delenv(fp8.EMULATE_ENV, raising=False)
    code = run_cli(
        "train", "tiny", f"data.train={corpus}", f"out_dir={tmp_path}", "run_name=r",
        "train.precision=fp8", *SMALL,
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "fp8 needs an NVIDIA GPU with FP8 matmuls (compute capability 8.9+" in err
    assert "on cpu" in err and "train.precision=bf16" in err
    assert not (tmp_path / "r").exists()


def _train(tmp_path, corpus, name: str, precision: str, steps: int = STEPS, *extra: str) -> None:
    code = run_cli(
        "train", "tiny", f"data.train={corpus}", f"out_dir={tmp_path}", f"run_name={name}",
        f"train.max_steps={steps}", f"train.precision={precision}", "train.compile=false",
        "optim.warmup_steps=20", "optim.lr=3e-3", "log.interval=25", "eval.interval=0",
        "eval.samples=0", "checkpoint.interval=0", *SMALL, "model.n_layer=1", *extra,
    )  # fmt: skip
    assert code == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """A bf16 run and an emulated FP8 run of the same model, seed and data."""
    tmp = tmp_path_factory.mktemp("fp8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLM_CACHE", str(tmp / "cache"))
        _train(tmp, corpus, "bf16", "bf16")
        mp.setenv(fp8.EMULATE_ENV, "1")
        _train(tmp, corpus, "fp8", "fp8")
    return tmp


def test_emulated_fp8_loss_within_2_percent_of_bf16(runs):
    bf16 = [r["loss"] for r in read_metrics(runs / "bf16", "train")]
    f8 = [r["loss"] for r in read_metrics(runs / "fp8", "train")]
    assert len(bf16) == len(f8) == STEPS // 25
    assert bf16[-1] < 0.6 * bf16[0]  # both learned: the comparison is not between two flat lines
    assert abs(f8[-1] - bf16[-1]) <= 0.02 * bf16[-1], (f8, bf16)
    assert f8 != bf16  # the FP8 casts were in the path (without them fp8 is the bf16 run)
    start = next(r for r in read_metrics(runs / "fp8", "event") if r["event"] == "start")
    assert start["precision"] == "fp8"


def test_fp8_checkpoint_export_and_resume_unchanged(runs, tmp_path, capsys, monkeypatch):
    """Same keys, shapes and dtypes (fp32) as the bf16 run's checkpoint; export, generate and an
    emulated resume work on it as on any run."""
    from safetensors.torch import load_file

    tensors = {}
    for name in ("bf16", "fp8"):
        ckpt = find_latest(runs / name / "checkpoints")
        tensors[name] = load_file(ckpt / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in tensors["fp8"].items()} == {
        k: (v.shape, v.dtype) for k, v in tensors["bf16"].items()
    }
    assert all(v.dtype == torch.float32 for v in tensors["fp8"].values())

    assert run_cli("export", runs / "fp8", "--out", tmp_path / "hf") == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported and all(v.dtype == torch.float32 for v in exported.values())
    capsys.readouterr()
    assert run_cli("generate", runs / "fp8", "--prompt", "ANNA:", "--max-new-tokens", "8") == 0
    assert capsys.readouterr().out.startswith("ANNA:")

    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    assert run_cli("train", "--resume", runs / "fp8", f"train.max_steps={STEPS + 25}") == 0
    steps = [r["step"] for r in read_metrics(runs / "fp8", "train")]
    assert steps[-1] == STEPS + 25
