"""Memory preflight: a run that cannot fit is refused at once with figures and settings that fit."""

from __future__ import annotations

import re
import time

import pytest
import torch

from tinylm.cli import main
from tinylm.config import ConfigError, load_config
from tinylm.estimate import model_counts
from tinylm.model import GPT
from tinylm.preflight import HEADROOM, check_memory, measure

CPU = torch.device("cpu")


def _gib(n: float) -> int:
    return int(n * 1024**3)


def test_deep_model_counts_equal_the_built_model():
    """Counting from one and two layers is exact: compare with a real 5-layer build."""
    cfg = load_config("tiny", ["model.n_layer=5", "model.vocab_size=99", "model.n_kv_head=2"])
    with torch.device("meta"):
        model = GPT(cfg.model)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    expected = (model.num_params(), model.num_params(True), model.flops_per_token(), linear)
    assert model_counts(cfg.model) == expected


def test_refusal_names_the_figures_and_a_batch_that_fits(monkeypatch):
    cfg = load_config("tiny", ["model.vocab_size=256", "train.batch_size=64"])
    need = measure(cfg, CPU).need
    # Leave room for the weights and a quarter of the batch's activations.
    monkeypatch.setattr(
        "tinylm.preflight.available_memory", lambda d: (need // 3, "of RAM is available")
    )
    with pytest.raises(ConfigError) as info:
        check_memory(cfg, CPU)
    msg = str(info.value)
    assert "train.batch_size=64" in msg and "of RAM is available" in msg and "--force" in msg
    batch, accum = map(
        int, re.search(r"train.batch_size=(\d+) train.grad_accum=(\d+)", msg).groups()
    )
    assert batch * accum == 64 and batch < 64  # the same effective batch
    # ... and the suggested batch does fit:
    smaller = load_config("tiny", ["model.vocab_size=256", f"train.batch_size={batch}"])
    assert measure(smaller, CPU).need * HEADROOM <= need // 3


def test_model_too_large_for_any_batch_suggests_fewer_layers(monkeypatch):
    monkeypatch.setattr(
        "tinylm.preflight.available_memory", lambda d: (_gib(16), "of RAM is available")
    )
    cfg = load_config("tiny", ["model.n_layer=200", "model.d_model=2048", "model.n_head=16"])
    with pytest.raises(
        ConfigError, match=r"Try model.n_layer=(\d+) or a smaller model.d_model"
    ) as info:
        check_memory(cfg, CPU)
    layers = int(re.search(r"model.n_layer=(\d+) or", str(info.value)).group(1))
    fewer = load_config(
        "tiny", [f"model.n_layer={layers}", "model.d_model=2048", "model.n_head=16"]
    )
    assert check_memory(fewer, CPU).fits


def test_small_run_passes_and_unknown_device_memory_is_not_refused():
    assert check_memory(load_config("tiny"), CPU).fits
    check = measure(load_config("tiny"), torch.device("meta"))
    assert check.available is None and check.fits


def test_cli_refuses_in_under_a_second_and_force_skips_the_check(tmp_path, capsys, monkeypatch):
    huge = ["model.n_layer=1000", "model.d_model=8192", f"out_dir={tmp_path}"]
    main(["train", "tiny", *huge])  # the first meta-device op imports torch._dynamo (once)
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(["train", "tiny", *huge]) == 2
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err
    assert "TiB for training" in err and "Traceback" not in err
    assert not (tmp_path / "tiny").exists()  # refused before the run directory is made


def test_force_skips_the_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tinylm.preflight.available_memory", lambda d: (1, "of RAM is available"))
    args = ["train", "tiny", f"out_dir={tmp_path}"]
    assert main(args) == 2
    assert "for training" in capsys.readouterr().err  # refused by the preflight
    # With --force the check is skipped and the run goes on to its data, which fails cheaply
    # (a missing path is refused before the preflight, so only the forced call names one).
    assert main([*args, "data.train=/nonexistent/x.txt", "--force"]) == 2
    assert "x.txt' not found" in capsys.readouterr().err
