"""Learning-rate schedule values (cosine, linear, constant, WSD), resume rules for schedule
changes, and which parameters get weight decay."""

import itertools
import math

import pytest
import torch

from tinylm.config import ModelConfig, OptimConfig
from tinylm.model import GPT
from tinylm.train.optim import build_optimizer, lr_at, param_groups, stable_until


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


def test_wsd_warmup_stable_and_each_decay_shape():
    base = dict(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    max_steps = 100  # decay over the last 20 steps: 80..99
    for shape, mid in (("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - 0.5**0.5)):
        cfg = OptimConfig(**base, decay_shape=shape)
        assert lr_at(0, cfg, max_steps) == pytest.approx(0.1)
        assert lr_at(9, cfg, max_steps) == pytest.approx(1.0)
        assert all(lr_at(s, cfg, max_steps) == 1.0 for s in range(10, 81))  # stable, incl. 80
        assert lr_at(90, cfg, max_steps) == pytest.approx(0.1 + 0.9 * mid)  # half-way
        assert lr_at(100, cfg, max_steps) == pytest.approx(0.1)
        decay = [lr_at(s, cfg, max_steps) for s in range(80, 101)]
        assert all(a > b for a, b in itertools.pairwise(decay))
    # 1-sqrt drops fastest at first, linear in between, cosine slowest
    at = {
        s: lr_at(83, OptimConfig(**base, decay_shape=s), 100)
        for s in ("linear", "cosine", "1-sqrt")
    }
    assert at["1-sqrt"] < at["linear"] < at["cosine"]
    # An explicit decay_steps overrides the fraction: the decay is the last 5 steps.
    cfg = OptimConfig(**base, decay_shape="linear", decay_steps=5)
    assert lr_at(94, cfg, 100) == 1.0 and lr_at(95, cfg, 100) == 1.0
    assert lr_at(97, cfg, 100) == pytest.approx(0.1 + 0.9 * 0.6)
    assert (
        stable_until(cfg, 100) == 95
        and stable_until(OptimConfig(schedule="constant"), 9) == math.inf
    )


def test_wsd_extension_keeps_the_past_and_moves_the_decay():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.25)
    short = [lr_at(s, cfg, 100) for s in range(100)]  # decay 75..99
    long = [lr_at(s, cfg, 400) for s in range(400)]  # decay 300..399
    assert short[:75] == long[:75]  # every step before the old decay is unchanged
    assert long[75:300] == [1.0] * 225 and long[399] < 0.1


def test_resume_rules_for_schedule_changes(tmp_path):
    """Schedule keys may change while the checkpoint is in the stable phase of both schedules."""
    from tinylm.config import load_config
    from tinylm.train.resume import schedule_change_note, unsafe_changes

    wsd = load_config(
        "tiny", ["optim.schedule=wsd", "train.max_steps=100", "optim.warmup_steps=10"]
    )
    cool = load_config("tiny", ["optim.schedule=wsd", "train.max_steps=60", "optim.decay_steps=20",
                                "optim.warmup_steps=10"])  # fmt: skip
    assert unsafe_changes(wsd, cool, step=40) == []  # cool-down from step 40: stable in both
    assert "optim.decay_steps" in " ".join(unsafe_changes(wsd, cool, step=50))  # would jump
    cosine = load_config("tiny", ["train.max_steps=100", "optim.warmup_steps=10"])
    assert "optim.schedule" in " ".join(unsafe_changes(cosine, cool, step=40))  # decaying already
    longer = load_config(
        "tiny", ["optim.schedule=wsd", "train.max_steps=200", "optim.warmup_steps=10"]
    )
    assert "decay now starts at step 160" in schedule_change_note(wsd, longer, step=50)
    assert "jumps" in schedule_change_note(wsd, longer, step=90)


def test_cooldown_from_a_checkpoint_end_to_end(tmp_path, corpus, capsys):
    from helpers import SMALL, read_metrics, run_cli

    run = tmp_path / "r"
    common = [f"data.train={corpus}", f"out_dir={tmp_path}", "run_name=r", "eval.interval=0",
              "log.interval=1", "optim.warmup_steps=2", *SMALL]  # fmt: skip
    assert run_cli("train", "tiny", "optim.schedule=constant", "train.max_steps=6", *common) == 0
    capsys.readouterr()
    assert run_cli("train", "--resume", run, "--cooldown", "4") == 0
    assert "cool-down: LR decays from step 6 to 10" in capsys.readouterr().out
    lrs = [r["lr"] for r in read_metrics(run, "train")]
    assert len(lrs) == 10 and lrs[1:7] == [2e-3] * 6  # the peak until the decay starts
    assert all(a > b for a, b in itertools.pairwise(lrs[6:])) and lrs[-1] < 1e-3
    # A second cool-down from the end of the first is refused with the way out.
    assert run_cli("train", "--resume", run, "--cooldown", "4") == 2
    assert "resume without --cooldown" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.name=sgd", "optim.name"),
        ("optim.schedule=step", "optim.schedule"),
        ("optim.decay_fraction=0", "optim.decay_fraction"),
        ("optim.decay_fraction=1.5", "optim.decay_fraction"),
        ("optim.decay_shape=exp", "optim.decay_shape"),
        ("optim.decay_steps=-1", "optim.decay_steps"),
        ("optim.muon_lr=0", "optim.muon_lr"),
        ("optim.muon_momentum=1.0", "optim.muon_momentum"),
        ("optim.muon_ns_steps=0", "optim.muon_ns_steps"),
        ("optim.muon_weight_decay=-0.1", "optim.muon_weight_decay"),
        ("optim.muon_lr_adjust=auto", "optim.muon_lr_adjust"),
        ("optim.muon_ns_dtype=float16", "optim.muon_ns_dtype"),
    ],
)
def test_new_optim_fields_are_validated_by_name(override, key):
    from tinylm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", [override])
