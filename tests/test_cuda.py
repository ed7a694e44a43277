"""CUDA-only checks of the precision paths (skipped without a CUDA device; bench/device_suite.sh
runs them on a lent GPU): bf16/fp16 autocast steps, the fp16 grad scaler, activation
checkpointing's gradients, and the auto choices on a GPU."""

from __future__ import annotations

import pytest
import torch

from tinylm.config import load_config
from tinylm.model import GPT
from tinylm.train import runtime
from tinylm.train.precision import autocast_context, make_grad_scaler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda") if torch.cuda.is_available() else None
SHAPE = ["model.vocab_size=128", "model.context_length=64", "model.n_layer=2", "model.d_model=64"]


def test_auto_precision_on_a_gpu_needs_no_probe():
    p = runtime.select_precision("auto", CUDA, load_config("tiny", SHAPE))
    assert p.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_a_half_precision_step_learns(prec):
    if prec == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    torch.manual_seed(0)
    model = GPT(load_config("tiny", SHAPE).model).to(CUDA)
    p = runtime.select_precision(prec, CUDA)
    scaler = make_grad_scaler(CUDA, p)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    x = torch.randint(0, 128, (8, 64), device=CUDA)
    losses = []
    for _ in range(20):
        with autocast_context(CUDA, p):
            _, loss = model(x, x)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_activation_checkpointing_gradients_on_cuda():
    cfg = load_config("tiny", SHAPE).model
    x = torch.randint(0, 128, (4, 64), device=CUDA)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg).to(CUDA)
        model.activation_checkpointing = checkpointing
        _, loss = model(x, x)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
