"""`train.activation_checkpointing`: equal gradients, the memory estimate, `auto` from the
preflight, and `tinylm estimate --gpu-memory`."""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL, run_cli

from tinylm import preflight
from tinylm.config import load_config
from tinylm.estimate import estimate
from tinylm.model import GPT

CPU = torch.device("cpu")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_equal_the_plain_run(dropout):
    cfg = load_config(
        "tiny",
        ["model.vocab_size=64", "model.context_length=16", "model.n_layer=2", "model.d_model=32",
         "model.n_head=2", f"model.dropout={dropout}"],
    ).model  # fmt: skip
    x = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg)
        model.activation_checkpointing = checkpointing
        torch.manual_seed(1)  # the same dropout masks (checkpoint replays the RNG state)
        _, loss = model(x, x)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=0, atol=1e-6), name


def test_the_estimate_counts_one_block_of_activations():
    cfg = load_config("gpt2-124m")
    plain, recompute = estimate(cfg), estimate(cfg, activation_checkpointing=True)
    assert recompute.activations < plain.activations / 2
    assert recompute.weights == plain.weights
    on = load_config("gpt2-124m", ["train.activation_checkpointing=true"])
    assert estimate(on).activations == recompute.activations


def test_auto_turns_it_on_only_when_the_run_would_not_fit(monkeypatch):
    cfg = load_config("gpt2-124m", ["train.batch_size=4"])
    need_plain = preflight.measure(cfg, CPU, checkpointing=False).need
    need_ckpt = preflight.measure(cfg, CPU, checkpointing=True).need
    budget = int((need_ckpt + need_plain) / 2 * preflight.HEADROOM)  # fits only with it
    monkeypatch.setattr(preflight, "available_memory", lambda d: (budget, "is free (test)"))
    on, reason = preflight.decide_activation_checkpointing(cfg, CPU)
    assert on and reason.startswith("auto: on (without it the run would not fit")
    assert preflight.check_memory(cfg, CPU).fits  # the preflight lets it through
    off = load_config("gpt2-124m", ["train.batch_size=4", "train.activation_checkpointing=false"])
    with pytest.raises(preflight.ConfigError, match="this run needs about"):
        preflight.check_memory(off, CPU)
    monkeypatch.setattr(preflight, "available_memory", lambda d: (10 * need_plain, "is free"))
    assert preflight.decide_activation_checkpointing(cfg, CPU)[0] is False


def test_estimate_proposes_settings_for_a_6_gib_card(capsys):
    cfg = load_config("gpt2-124m")
    plan = preflight.plan_for_memory(cfg, 6 * 2**30)
    assert plan.batch_size * plan.grad_accum == cfg.train.batch_size * cfg.train.grad_accum
    assert plan.need * preflight.HEADROOM <= 6 * 2**30
    bigger = load_config("gpt2-124m", [f"train.batch_size={plan.batch_size * 2}"])
    assert preflight.plan_for_memory(bigger, 6 * 2**30).batch_size == plan.batch_size
    assert run_cli("estimate", "gpt2-124m", "--gpu-memory", "6") == 0
    out = capsys.readouterr().out
    assert f"proposed: {plan.overrides()}" in out
    assert "train.activation_checkpointing=true" in out  # the recomputing alternative
    assert run_cli("estimate", "gpt2-124m", "--gpu-memory", "0.5") == 0
    assert "does not fit even at micro-batch 1" in capsys.readouterr().out


def test_a_run_with_checkpointing_trains(tmp_path, corpus, capsys):
    args = [f"data.train={corpus}", f"out_dir={tmp_path}", "run_name=r", "train.max_steps=2",
            "eval.interval=0", "eval.samples=0", "train.activation_checkpointing=true", *SMALL]  # fmt: skip
    assert run_cli("train", "tiny", *args) == 0
    assert (
        "activation checkpointing: train.activation_checkpointing=true" in capsys.readouterr().out
    )
