"""fp16 on CPU with `torch.amp.GradScaler("cpu")`: overflowing steps skipped without touching
weights or optimizer state, scale back-off and growth, the non-finite guard, unscale before clip.
(Checkpointed scaler state and bit-identical resume: tests/test_precision.py.)"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from helpers import SMALL

from tinylm.config import load_config
from tinylm.train.trainer import Trainer


def build(tmp_path, corpus, *overrides):
    cfg = load_config("tiny", [f"data.train={corpus}", "train.precision=fp16", *SMALL, *overrides])
    return Trainer(cfg, tmp_path / "run")


def snapshot(trainer):
    return (
        [p.detach().clone() for p in trainer.params],
        copy.deepcopy(trainer.optimizer.state_dict()),
    )


def assert_untouched(trainer, before):
    """Weights equal; optimizer state equal, or (created by this step) zeros at step 0."""
    params, opt_state = before
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.params, strict=True))
    after = trainer.optimizer.state_dict()
    halves = ("adamw", "muon") if "adamw" in after else (None,)
    for half in halves:
        old = (opt_state[half] if half else opt_state)["state"]
        new = (after[half] if half else after)["state"]
        for i, state in new.items():
            for key, value in state.items():
                if i in old:
                    assert torch.equal(torch.as_tensor(old[i][key]), torch.as_tensor(value))
                elif key == "step":
                    assert float(value) == 0.0
                else:
                    assert not torch.as_tensor(value).any(), key


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_overflow_steps_are_skipped_then_the_scale_grows(tmp_path, corpus, optimizer):
    trainer = build(tmp_path, corpus, f"optim.name={optimizer}")
    # A scale far above what fp16 gradients hold: the first steps overflow and back off.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=2)
    scales, skipped = [], 0
    with trainer.loader:
        batches = iter(trainer.loader.iterate(0))
        before = snapshot(trainer)
        _, norm, nonfinite = trainer.train_step(batches)
        assert not torch.isfinite(norm)  # the unscaled norm saw the overflow
        assert not nonfinite  # the scaler's business, not the divergence guard's
        assert_untouched(trainer, before)
        scales.append(trainer.scaler.get_scale())
        for _ in range(30):
            _, norm, nonfinite = trainer.train_step(batches)
            assert not nonfinite
            scales.append(trainer.scaler.get_scale())
            skipped += not torch.isfinite(norm)
            if len(scales) > 3 and scales[-1] > scales[-2]:
                break
    assert scales[0] == 2.0**23  # halved by the skipped step
    first_clean = next(i for i in range(1, len(scales)) if scales[i] == scales[i - 1])
    assert all(b == a / 2 for a, b in itertools.pairwise(scales[:first_clean]))
    # growth_interval=2: two clean steps in a row double it
    assert scales[-1] == 2 * scales[-2] and skipped >= 1
    assert not all(torch.equal(a, b) for a, b in zip(before[0], trainer.params, strict=True))


def test_a_nan_loss_is_skipped_and_counted_by_the_guard(tmp_path, corpus):
    trainer = build(tmp_path, corpus, "optim.name=adamw")
    with trainer.loader:
        batches = iter(trainer.loader.iterate(0))
        trainer.train_step(batches)  # one clean step: optimizer state exists
        with torch.no_grad():
            trainer.raw_model.norm_f.weight[0] = float("nan")
        before = snapshot(trainer)
        scale = trainer.scaler.get_scale()
        loss, _, nonfinite = trainer.train_step(batches)
    assert not torch.isfinite(loss) and bool(nonfinite)  # counts towards max_nonfinite_steps
    assert trainer.scaler.get_scale() == scale / 2
    params, opt_state = before
    assert all(
        torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
        for a, b in zip(params, trainer.params, strict=True)
    )
    after = trainer.optimizer.state_dict()["state"]
    for i, state in opt_state["state"].items():
        assert all(
            torch.equal(torch.as_tensor(v), torch.as_tensor(after[i][k])) for k, v in state.items()
        )


def test_gradients_are_unscaled_before_clipping(tmp_path, corpus):
    """The clipped norm is the true gradient's (fp32 run's within fp16 error), not 65536x it."""
    norms = {}
    for prec in ("fp16", "fp32"):
        trainer = build(tmp_path / prec, corpus, f"train.precision={prec}", "optim.grad_clip=0.5")
        with trainer.loader:
            _, norm, _ = trainer.train_step(iter(trainer.loader.iterate(0)))
        norms[prec] = float(norm)
    assert abs(norms["fp16"] - norms["fp32"]) / norms["fp32"] < 0.02, norms
    assert norms["fp32"] > 0.5  # so clipping was active
