"""`tinylm estimate`: counts agree with the model, memory with what autograd keeps, time arithmetic."""

from __future__ import annotations

import pytest
import torch

from tinylm.cli import main
from tinylm.config import load_config
from tinylm.estimate import estimate
from tinylm.model import GPT

GPT2 = [
    "model.vocab_size=50257", "model.vocab_multiple=1", "model.context_length=1024",
    "model.n_layer=12", "model.n_head=12", "model.d_model=768", "model.norm=layernorm",
    "model.pos_emb=learned", "model.mlp=gelu", "model.bias=true", "model.tie_embeddings=true",
    "train.batch_size=8", "train.precision=bf16", "train.max_steps=1000",
]  # fmt: skip


def test_gpt2_124m_numbers():
    e = estimate(load_config(None, GPT2), tokens_per_second=50_000, peak_tflops=312, mfu=0.5)
    assert e.params == 124_439_808 and e.params_non_embedding == 85_056_000
    assert e.flops_per_token == 6 * (85_056_000 + 50257 * 768) + 12 * 12 * 768 * 1024
    assert (e.weights, e.gradients, e.optimizer) == (4 * e.params, 4 * e.params, 8 * e.params)
    assert e.weight_copies == 2 * (12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 50257 * 768)
    assert e.tokens == 1000 * 8 * 1024  # the run's budget by default
    assert e.seconds_at_throughput == pytest.approx(e.tokens / 50_000)
    assert e.seconds_at_peak == pytest.approx(e.tokens * e.flops_per_token / (312e12 * 0.5))


def saved_tensor_bytes(model: GPT, idx: torch.Tensor, bf16: bool) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
    ):
        model(idx, idx)
    return sum(kept.values())


SHAPE = ["model.vocab_size=300", "model.context_length=64", "model.n_layer=2", "model.d_model=64"]
VARIANTS = {
    "gpt2-like": ["model.norm=layernorm", "model.pos_emb=learned"],
    "llama-like": ["model.norm=rmsnorm", "model.pos_emb=rope", "model.mlp=swiglu", "model.bias=false"],
    "qknorm-gqa-dropout": ["model.qk_norm=true", "model.n_kv_head=2", "model.dropout=0.1", "model.pos_emb=rope"],
}  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", VARIANTS)
def test_activation_memory_matches_what_autograd_keeps(name, precision):
    cfg = load_config(
        None, [*SHAPE, *VARIANTS[name], "train.batch_size=2", f"train.precision={precision}"]
    )
    torch.manual_seed(0)
    model = GPT(cfg.model).train()
    idx = torch.randint(0, 300, (2, 64))
    measured = saved_tensor_bytes(model, idx, bf16=precision == "bf16")
    e = estimate(cfg)
    assert e.activations + e.weight_copies == pytest.approx(measured, rel=0.05)


def test_cli_prints_the_estimate(capsys):
    code = main(["estimate", "tiny", "model.vocab_size=65", "--tokens", "1e6",
                 "--tokens-per-second", "1000", "--peak-tflops", "1", "--mfu", "0.5"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "without embeddings" in out and "AdamW state" in out
    assert "at 1,000 tokens/s: 16.7 min" in out


def test_cli_assumes_a_char_vocab_and_rejects_bad_mfu(capsys):
    assert main(["estimate", "tiny", "model.vocab_size=0", "data.tokenizer=char"]) == 0
    assert "assumed 256" in capsys.readouterr().out
    assert main(["estimate", "tiny", "--mfu", "2"]) == 2
    assert "--mfu" in capsys.readouterr().err
