"""Muon + AdamW (`optim.name=muon`): which tensors go where, the combined step, the non-finite
skip, state round trips and an exactly resumed run."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from helpers import SMALL, read_metrics, run_cli

from tinylm.config import ModelConfig, OptimConfig
from tinylm.model import GPT
from tinylm.train.checkpoint import CheckpointError
from tinylm.train.muon import MuonAdamW, muon_parameters, muon_update, newton_schulz
from tinylm.train.optim import build_optimizer, set_lr

CPU = torch.device("cpu")
MUON = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1, muon_weight_decay=0.01)


def small_model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, n_layer=2, d_model=32, n_head=4, context_length=16, bias=True)
    return GPT(ModelConfig(**{**cfg, **kw}))


def names_of(model: GPT, params) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_split_hidden_matrices_to_muon_rest_to_adamw(tie):
    model = small_model(tie_embeddings=tie, pos_emb="learned")
    opt = build_optimizer(model, MUON, CPU)
    assert isinstance(opt, MuonAdamW)
    muon = names_of(model, (p for g in opt.muon.param_groups for p in g["params"]))
    adamw_decay, adamw_no_decay = (names_of(model, g["params"]) for g in opt.adamw.param_groups)
    per_block = {"attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"}
    assert muon == {f"blocks.{i}.{n}" for i in range(2) for n in per_block}
    assert muon == {n for n, _ in muon_parameters(model)}
    # Embeddings and the output head stay on AdamW (with decay); norms and biases without.
    want_decay = {"tok_emb.weight", "pos_emb.weight"} | (set() if tie else {"lm_head.weight"})
    assert adamw_decay == want_decay
    assert adamw_no_decay and all(n.endswith(("bias", "norm.weight", "norm_f.weight", "ln.weight"))
                                  or "norm" in n for n in adamw_no_decay)  # fmt: skip
    assert any(n.endswith("bias") for n in adamw_no_decay)
    # Every trainable tensor is in exactly one group.
    everything = [p for g in opt.param_groups for p in g["params"]]
    assert len(everything) == len({id(p) for p in everything}) == len(list(model.parameters()))


def test_each_group_is_scheduled_at_its_own_peak():
    opt = build_optimizer(small_model(), MUON, CPU)
    set_lr(opt, 5e-4)  # half of optim.lr
    assert [g["lr"] for g in opt.adamw.param_groups] == [5e-4, 5e-4]
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.01)  # half of muon_lr
    assert opt.param_groups[0]["lr"] == 5e-4  # the logged LR is AdamW's


def loss_of(model: GPT, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (4, 16), generator=g)
    return model(x, x)[1]


def test_one_step_is_torch_muon_plus_torch_adamw():
    """The composite's step equals stepping torch.optim.Muon and AdamW separately."""
    model = small_model()
    twin = copy.deepcopy(model)
    opt = build_optimizer(model, replace(MUON, muon_ns_dtype="bfloat16"), CPU)
    assert opt.ns_dtype == torch.bfloat16
    hidden = {id(p) for _, p in muon_parameters(twin)}
    ref_muon = torch.optim.Muon(
        [p for p in twin.parameters() if id(p) in hidden], lr=0.02, weight_decay=0.01
    )
    ref_adamw = torch.optim.AdamW(
        [
            {"params": [p for p in twin.parameters() if id(p) not in hidden and p.dim() >= 2]},
            {"params": [p for p in twin.parameters() if id(p) not in hidden and p.dim() < 2],
             "weight_decay": 0.0},
        ],
        lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True,
    )  # fmt: skip
    for seed in range(3):
        loss_of(model, seed).backward()
        opt.step()
        opt.zero_grad()
        loss_of(twin, seed).backward()
        ref_muon.step()
        ref_adamw.step()
        ref_muon.zero_grad()
        ref_adamw.zero_grad()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    initial = small_model().parameters()  # the same seed: the weights before the steps
    assert all(not torch.equal(a, b) for a, b in zip(twin.parameters(), initial, strict=True))


def test_nonfinite_flag_skips_both_halves():
    model = small_model()
    opt = build_optimizer(model, MUON, CPU)
    loss_of(model, 0).backward()
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not opt.muon.state  # no momentum was accumulated either
    opt.found_inf = torch.zeros(())
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n for n, _ in muon_parameters(model)} <= changed and "tok_emb.weight" in changed


def test_state_dict_round_trip_continues_identically():
    model = small_model()
    opt = build_optimizer(model, MUON, CPU)
    for seed in range(2):
        loss_of(model, seed).backward()
        opt.step()
        opt.zero_grad()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert set(saved_opt) == {"adamw", "muon"}
    loss_of(model, 2).backward()
    opt.step()

    other = small_model()
    other.load_state_dict(saved_model)
    opt2 = build_optimizer(other, MUON, CPU)
    opt2.load_state_dict(saved_opt)
    loss_of(other, 2).backward()
    opt2.step()
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    adamw_only = build_optimizer(small_model(), OptimConfig(), CPU).state_dict()
    with pytest.raises(CheckpointError, match=r"optim\.name"):
        opt2.load_state_dict(adamw_only)


def test_muon_run_resumes_bit_identically(tmp_path, corpus):
    """8 steps in one go == 4 steps, stop, resume, 4 more, with Muon (momentum buffers saved)."""
    common = [
        f"data.train={corpus}", f"out_dir={tmp_path}", "log.interval=1", "eval.interval=4",
        "optim.name=muon", "optim.warmup_steps=2", "optim.decay_steps=8",
        "model.dropout=0.1", *SMALL,
    ]  # fmt: skip
    assert run_cli("train", "tiny", "run_name=full", "train.max_steps=8", *common) == 0
    assert run_cli("train", "tiny", "run_name=split", "train.max_steps=4", *common) == 0
    assert run_cli("train", "--resume", tmp_path / "split", "train.max_steps=8") == 0
    full = [(r["step"], r["loss"], r["lr"]) for r in read_metrics(tmp_path / "full", "train")]
    split = [(r["step"], r["loss"], r["lr"]) for r in read_metrics(tmp_path / "split", "train")]
    assert len(full) == 8 and split == full  # exact float equality
    assert full[-1][1] < full[0][1]  # and it learns


def test_own_update_is_torchs_in_bfloat16_and_close_in_float32():
    """`muon_update` (the float32 path for CPUs, and FSDP's) is torch.optim.Muon's rule: bitwise
    equal with bfloat16 Newton-Schulz, and within bfloat16 rounding of it in float32."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(1))
    coeffs = (3.4445, -4.775, 2.0315)
    for shape_of in (g, g.T):  # tall and wide
        ours = newton_schulz(shape_of, coeffs, 5, 1e-7, torch.bfloat16)
        assert torch.equal(ours, _zeropower_via_newtonschulz(shape_of, coeffs, 5, 1e-7))
        fp32 = newton_schulz(shape_of, coeffs, 5, 1e-7, torch.float32)
        assert fp32.dtype == torch.float32
        assert ((fp32 - ours.float()).norm() / fp32.norm()).item() < 0.02

    ref = torch.nn.Parameter(torch.randn(48, 16, generator=torch.Generator().manual_seed(2)))
    mine = ref.detach().clone()
    torch_muon = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    group, buf = torch_muon.param_groups[0], torch.zeros_like(mine)
    for seed in range(3):
        grad = torch.randn(48, 16, generator=torch.Generator().manual_seed(10 + seed))
        ref.grad = grad.clone()
        torch_muon.step()
        muon_update(mine, grad, buf, group, torch.bfloat16)
        assert torch.equal(mine, ref.detach())
        assert torch.equal(buf, torch_muon.state[ref]["momentum_buffer"])


def test_auto_precision_is_float32_on_cpu():
    assert build_optimizer(small_model(), MUON, CPU).ns_dtype == torch.float32
