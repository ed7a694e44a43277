"""Learning-rate schedule values and which parameters get weight decay."""

import itertools
import math

import pytest
import torch

from tinylm.config import ModelConfig, OptimConfig
from tinylm.model import GPT
from tinylm.train.optim import build_optimizer, lr_at, param_groups


def test_schedule_warmup_peak_and_floor():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
    max_steps = 110
    assert lr_at(0, cfg, max_steps) == pytest.approx(1e-4)  # 1/10 of the way up
    assert lr_at(4, cfg, max_steps) == pytest.approx(5e-4)
    assert lr_at(9, cfg, max_steps) == pytest.approx(1e-3)  # peak at the end of warmup
    assert lr_at(10, cfg, max_steps) == pytest.approx(1e-3)
    midpoint = lr_at(60, cfg, max_steps)  # half-way through the decay: (lr + min_lr) / 2
    assert midpoint == pytest.approx(5.5e-4)
    assert lr_at(110, cfg, max_steps) == pytest.approx(1e-4)  # the floor
    assert lr_at(10_000, cfg, max_steps) == pytest.approx(1e-4)
    values = [lr_at(s, cfg, max_steps) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone decay


def test_linear_and_constant_schedules():
    lin = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert lr_at(25, lin, 100) == pytest.approx(0.75)
    const = OptimConfig(lr=0.5, min_lr=0.0, warmup_steps=2, schedule="constant")
    assert lr_at(0, const, 100) == pytest.approx(0.25)
    assert lr_at(99, const, 100) == pytest.approx(0.5)


def test_explicit_decay_steps():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=10)
    assert lr_at(5, cfg, 1000) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10, cfg, 1000) == pytest.approx(0.0)


def test_weight_decay_only_on_matrices():
    model = GPT(
        ModelConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, context_length=16, bias=True)
    )
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and no_decay["params"]
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert any("bias" in n for n in no_decay_names)
    assert any("norm" in n or "ln" in n for n in no_decay_names)
    # every trainable parameter is in exactly one group
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_fused_adamw_on_cpu():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert opt.defaults["fused"] is True
