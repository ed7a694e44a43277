"""The model: causality, sliding window, KV cache, parameter counts, initialisation, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinylm.config import ModelConfig
from tinylm.model import GPT, padded_vocab_size

SMALL = dict(vocab_size=50, vocab_multiple=16, context_length=24, n_layer=2, n_head=4, d_model=32)

# Every option appears in at least one variant; the names show up in test ids.
VARIANTS = {
    "gpt2": {},
    "llama": dict(
        norm="rmsnorm", pos_emb="rope", mlp="swiglu", qk_norm=True, n_kv_head=2, bias=False,
        tie_embeddings=False, init="trunc_normal",
    ),
    "mqa-rope-layernorm": dict(pos_emb="rope", n_kv_head=1, bias=False),
    "window-rope": dict(pos_emb="rope", sliding_window=5, norm="rmsnorm", n_kv_head=2),
    "window-learned": dict(sliding_window=3, mlp="swiglu"),
    "relu2-rope": dict(mlp="relu2", pos_emb="rope", norm="rmsnorm", bias=False),
}  # fmt: skip


def make(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**SMALL, **overrides})).eval()


def tokens(batch: int, length: int, seed: int = 1, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VARIANTS)
def test_future_tokens_never_change_earlier_logits(name):
    model = make(**VARIANTS[name])
    idx = tokens(2, 24)
    base, _ = model(idx)
    for t in (0, 7, 23):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(logits[:, t], base[:, t])  # the changed position itself moves


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The same network written independently and naively: explicit softmax attention with a
    hand-built mask, RoPE as complex rotation, GELU by its tanh formula, norms by definition."""
    cfg, (B, T) = model.cfg, idx.shape
    H, KV, D = cfg.n_head, cfg.kv_heads, cfg.head_dim

    def norm(x, mod, eps=cfg.norm_eps):
        if mod.kind == "rmsnorm":
            return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * mod.weight
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * mod.weight + (0 if mod.bias is None else mod.bias)

    def rotate(x):  # [B, T, heads, D]: pairs (i, i + D/2) as complex numbers
        freqs = cfg.rope_theta ** (-torch.arange(0, D, 2).double() / D)
        phase = torch.polar(
            torch.ones(T, D // 2, dtype=torch.double), torch.outer(torch.arange(T).double(), freqs)
        )
        z = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double()) * phase[:, None]
        return torch.cat([z.real, z.imag], dim=-1).float()

    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < cfg.sliding_window) if cfg.sliding_window else True)
    x = model.tok_emb.weight[idx] + (model.pos_emb.weight[:T] if model.pos_emb is not None else 0)
    for blk in model.blocks:
        a = blk.attn
        q, k, v = F.linear(norm(x, blk.norm1), a.qkv.weight, a.qkv.bias).split(
            [H * D, KV * D, KV * D], -1
        )
        q, k, v = q.view(B, T, H, D), k.view(B, T, KV, D), v.view(B, T, KV, D)
        if cfg.qk_norm:
            q, k = norm(q, a.q_norm), norm(k, a.k_norm)
        if cfg.pos_emb == "rope":
            q, k = rotate(q), rotate(k)
        k, v = k.repeat_interleave(H // KV, dim=2), v.repeat_interleave(H // KV, dim=2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / D**0.5
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = torch.einsum("bhij,bjhd->bihd", att, v).reshape(B, T, H * D)
        x = x + F.linear(y, a.proj.weight, a.proj.bias)
        h = F.linear(norm(x, blk.norm2), blk.mlp.fc.weight, blk.mlp.fc.bias)
        if cfg.mlp == "swiglu":
            gate, up = h.chunk(2, -1)
            h = gate * torch.sigmoid(gate) * up
        elif cfg.mlp == "relu2":
            h = torch.where(h > 0, h * h, torch.zeros_like(h))
        else:
            h = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
        x = x + F.linear(h, blk.mlp.proj.weight, blk.mlp.proj.bias)
    return (norm(x, model.norm_f) @ model.lm_head.weight.T)[..., : cfg.vocab_size]


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_a_naive_reference_implementation(name):
    # A larger init so that every component visibly shapes the output.
    model = make(init_std=0.2, **VARIANTS[name])
    with torch.no_grad():
        for p in model.parameters():  # norm gains and biases away from their 1 / 0 init
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        idx = tokens(2, 24)
        torch.testing.assert_close(
            model(idx)[0], reference_logits(model, idx), rtol=1e-4, atol=1e-4
        )


def test_sliding_window_restricts_attention():
    # Window W: a query sees itself and W-1 earlier positions, so after L layers position p
    # depends on positions p - L*(W-1) .. p. Token 0 must reach exactly up to position L*(W-1).
    W, L = 4, 2
    model = make(sliding_window=W, n_layer=L, pos_emb="rope")
    idx = tokens(1, 24)
    changed = idx.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    reach = L * (W - 1)
    assert not torch.allclose(a[:, reach], b[:, reach])
    torch.testing.assert_close(a[:, reach + 1 :], b[:, reach + 1 :], rtol=0, atol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_matches_full_forward(name):
    model = make(**VARIANTS[name])
    idx = tokens(2, 24)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.make_kv_cache(batch=2)
        # A prefill of 9, a chunk of 6 (a masked chunk that starts mid-cache), then single tokens.
        pieces = [model(idx[:, :9], kv_cache=cache)[0], model(idx[:, 9:15], kv_cache=cache)[0]]
        assert cache.pos == 15
        pieces += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(15, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_stores_kv_heads_only_and_refuses_overflow():
    model = make(n_kv_head=2, pos_emb="rope")
    cache = model.make_kv_cache(batch=3, max_len=10)
    assert cache.k[0].shape == (3, 2, 10, 8)
    with pytest.raises(ValueError, match="KV cache holds 10"):
        model(tokens(3, 11), kv_cache=cache)
    with pytest.raises(ValueError, match="context length"):
        model(tokens(1, 25))


def test_last_only_and_padded_vocab():
    model = make()
    idx = tokens(2, 10)
    full, _ = model(idx)
    last, _ = model(idx, last_only=True)
    assert full.shape == (2, 10, 50) and last.shape == (2, 1, 50)
    torch.testing.assert_close(last, full[:, -1:])
    assert model.tok_emb.weight.shape[0] == padded_vocab_size(model.cfg) == 64
    assert model.tok_emb.weight[50:].abs().sum() == 0


def test_loss_is_mean_cross_entropy_ignoring_minus_one():
    model = make()
    idx, targets = tokens(2, 12, seed=1), tokens(2, 12, seed=2)
    targets[0, :5] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep].float(), targets[keep])
    torch.testing.assert_close(loss, expected)
    assert loss.dtype == torch.float32


def gpt2_small_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=50257, vocab_multiple=1, context_length=1024, n_layer=12, n_head=12,
        d_model=768, norm="layernorm", pos_emb="learned", mlp="gelu", bias=True,
        tie_embeddings=True,
    )  # fmt: skip


def test_gpt2_124m_parameter_count_and_flops():
    with torch.device("meta"):
        model = GPT(gpt2_small_config())
    assert model.num_params() == 124_439_808
    # Minus the token embedding (50257 x 768) and the position table (1024 x 768).
    assert model.num_params(non_embedding=True) == 124_439_808 - 38_597_376 - 786_432
    head = 50257 * 768  # tied, but the output projection is real compute
    attn = 12 * 12 * 768 * 1024
    assert model.flops_per_token() == 6 * (85_056_000 + head) + attn


def test_untied_head_counts_as_non_embedding():
    tied, untied = make(), make(tie_embeddings=False)
    head = 64 * 32
    assert untied.num_params() == tied.num_params() + head
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True) + head
    assert untied.flops_per_token() == tied.flops_per_token()


def test_only_matmul_weights_and_embeddings_are_2d():
    model = make(**VARIANTS["llama"])
    for name, p in model.named_parameters():
        is_2d = name.endswith("weight") and ("norm" not in name)
        assert (p.dim() >= 2) == is_2d, name


@pytest.mark.parametrize("init", ["normal", "trunc_normal"])
def test_init_std_and_scaled_residual_projections(init):
    std, layers = 0.02, 4
    model = make(init=init, init_std=std, d_model=256, n_layer=layers, n_head=4)
    resid = std / math.sqrt(2 * layers)
    for block in model.blocks:
        for w, s in (
            (block.attn.qkv.weight, std),
            (block.mlp.fc.weight, std),
            (block.attn.proj.weight, resid),
            (block.mlp.proj.weight, resid),
        ):
            # A normal truncated at 2 std has std 0.88 * s.
            expected = s * (0.88 if init == "trunc_normal" else 1.0)
            assert abs(w.std().item() - expected) < 0.05 * expected
            if init == "trunc_normal":
                assert w.abs().max() <= 2 * s
        assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.norm1.weight == 1)


def test_zero_init_residual_starts_every_block_as_the_identity():
    model = make(zero_init_residual=True, **VARIANTS["llama"])
    for block in model.blocks:
        assert torch.all(block.attn.proj.weight == 0) and torch.all(block.mlp.proj.weight == 0)
        assert block.attn.qkv.weight.std() > 0.01 and block.mlp.fc.weight.std() > 0.01
    idx = tokens(2, 24)
    with torch.no_grad():  # blocks add nothing: the logits are the embedding, normed, projected
        direct = (model.norm_f(model.tok_emb(idx)) @ model.lm_head.weight.T)[..., :50]
        torch.testing.assert_close(model(idx)[0], direct)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # the first step moves the projections, the second the layers behind them
        opt.zero_grad(set_to_none=True)
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        opt.step()
    assert all(b.mlp.proj.weight.abs().sum() > 0 for b in model.blocks)
    assert all(b.attn.qkv.weight.grad.abs().sum() > 0 for b in model.blocks)


def test_overfits_one_batch():
    model = make(context_length=16).train()
    idx = tokens(4, 17, seed=3)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_dropout_only_in_training():
    model = make(dropout=0.2, attn_dropout=0.2)
    idx = tokens(2, 16)
    torch.testing.assert_close(model(idx)[0], model(idx)[0], rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    model = make(**VARIANTS["llama"])
    idx, targets = tokens(2, 16, seed=1), tokens(2, 16, seed=2)
    _, loss32 = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss16 = model(idx, targets)
        cache = model.make_kv_cache(2, dtype=torch.bfloat16)
        model(idx, kv_cache=cache)
    assert logits.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.05


def test_meta_device_build_then_materialise_matches_init():
    cfg = ModelConfig(**SMALL, pos_emb="rope")
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    ref = GPT(cfg)
    torch.testing.assert_close(model.rope_cos, ref.rope_cos)
    assert model.tok_emb.weight[50:].abs().sum() == 0
    assert "rope_cos" not in model.state_dict()


def test_gelu_tanh_compiled_form_is_the_same_function():
    """The sigmoid form `gelu_tanh` uses under torch.compile is GPT-2's tanh GELU: equal to
    float64 rounding eagerly, and compiled (fwd and bwd) within fp32 rounding of the eager one."""
    from tinylm import model as model_mod

    x = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    sigmoid_form = model_mod._gelu_sigmoid_form(x)
    assert torch.allclose(sigmoid_form, F.gelu(x, approximate="tanh"), rtol=0, atol=1e-12)

    def grad_of(fn, x):
        x = x.detach().float().requires_grad_()
        y = fn(x)
        y.sum().backward()
        return y.detach(), x.grad

    traced: list[str] = []

    def record(gm, example_inputs):  # a dynamo backend: what the compiler is given
        traced.append("".join(m.code for m in gm.modules() if hasattr(m, "code")))
        return gm.forward

    torch.compile(model_mod.gelu_tanh, backend=record)(x.float())
    assert "sigmoid" in traced[0] and "gelu" not in traced[0]
    compiled = torch.compile(model_mod.gelu_tanh, fullgraph=True)
    y, g = grad_of(compiled, x)
    y_ref, g_ref = grad_of(lambda t: F.gelu(t, approximate="tanh"), x)
    assert torch.allclose(y, y_ref, rtol=0, atol=2e-6) and torch.allclose(g, g_ref, atol=1e-5)


def test_compiled_gelu_keeps_its_sigmoid_for_the_backward():
    """Under compile the MLP's GELU saves its sigmoid: the forward graph hands it to the
    backward, whose graph (inductor's partitioner) recomputes no sigmoid or exp, the costly part
    of the kernel; the gradients stay those of F.gelu."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from tinylm import model as model_mod

    graphs: dict[str, torch.fx.GraphModule] = {}

    def keep(name):
        def compiler(gm, _inputs):
            graphs[name] = gm
            return make_boxed_func(gm)

        return compiler

    backend = aot_autograd(
        fw_compiler=keep("forward"),
        bw_compiler=keep("backward"),
        partition_fn=min_cut_rematerialization_partition,
    )

    def mlp(x, fc, proj):
        return model_mod.gelu_tanh(x @ fc) @ proj

    gen = torch.Generator().manual_seed(0)
    leaves = [
        torch.randn(*s, generator=gen, requires_grad=True) for s in ((64, 32), (32, 128), (128, 32))
    ]
    torch._dynamo.reset()
    out = torch.compile(mlp, backend=backend, fullgraph=True)(*leaves)
    out.sum().backward()
    saved = next(n for n in graphs["forward"].graph.nodes if n.op == "output").args[0][1:]
    assert any("sigmoid" in str(n) for n in saved)
    recomputed = {n.target for n in graphs["backward"].graph.nodes} & {
        torch.ops.aten.sigmoid.default,
        torch.ops.aten.exp.default,
    }
    assert not recomputed
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    (F.gelu(ref[0] @ ref[1], approximate="tanh") @ ref[2]).sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=2e-4)


def test_cpu_attention_has_sdpas_values_and_gradients():
    """tinylm/cpu_attention.py: SDPA's flash forward (the same values, bit for bit) and its own
    chunked backward, whose bf16 gradients are within bf16's rounding of fp32 (relative RMS
    error 0.35-0.5%, SDPA's bf16 kernel 0.25-0.35%). 25 (batch, head) pairs at context 256: one
    full chunk of 24 and a remainder of 1."""
    from tinylm import cpu_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(5, 5, 256, 32, generator=gen).bfloat16() for _ in range(4))

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad.to(dtype))
        return out.detach(), [t.grad for t in leaves]

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True)

    out, grads = run(cpu_attention.causal_attention, torch.bfloat16)
    sdpa_out, sdpa_grads = run(sdpa, torch.bfloat16)
    _, exact = run(sdpa, torch.float32)
    assert torch.equal(out, sdpa_out)
    # the same T x T working set at every context: fewer pairs a chunk for a longer one
    assert [cpu_attention.pairs_per_chunk(t) for t in (64, 256, 512, 4096)] == [384, 24, 6, 1]
    for mine, theirs, truth in zip(grads, sdpa_grads, exact, strict=True):
        error, sdpa_error = ((g.float() - truth).norm() / truth.norm() for g in (mine, theirs))
        assert error < 0.01 and error < 2.5 * sdpa_error, (error, sdpa_error)


def test_cpu_attention_is_used_only_where_it_pays(monkeypatch):
    from tinylm import cpu_attention

    q = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    ok = {"causal": True, "dropout_p": 0.0, "grouped": False}
    assert not cpu_attention.use_for(q, **ok)  # eager: SDPA's backward is the faster one there
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert cpu_attention.use_for(q, **ok)
    assert not cpu_attention.use_for(q.float(), **ok)
    assert not cpu_attention.use_for(q, **{**ok, "causal": False})  # a mask: SDPA
    assert not cpu_attention.use_for(q, **{**ok, "dropout_p": 0.1})
    assert not cpu_attention.use_for(q, **{**ok, "grouped": True})


def test_under_bf32_attention_keeps_full_fp32_matmuls():
    """train.precision=bf32 sets oneDNN's fp32 matmuls to bf16 inputs, which SDPA's fp32 flash
    kernel obeys (~10x slower at nanoGPT's CPU shape); `fp32_causal_attention` runs the kernel
    with full fp32 matmuls: SDPA's fp32 values and gradients bit for bit, eager and compiled
    (one graph: an opaque operator), and the bf32 mode around it is left as it was."""
    from tinylm import cpu_attention

    gen = torch.Generator().manual_seed(0)
    # q, k, v as the model makes them: views of one [B, T, 3, H, D] projection
    qkv = torch.randn(2, 16, 3, 3, 8, generator=gen)
    grad = torch.randn(2, 3, 16, 8, generator=gen)

    def run(fn):
        leaf = qkv.clone().requires_grad_()
        q, k, v = (leaf[:, :, i].transpose(1, 2) for i in range(3))
        out = fn(q, k, v)
        out.backward(grad)
        return out.detach(), leaf.grad

    ok = {"causal": True, "dropout_p": 0.0, "grouped": False}
    q = qkv[:, :, 0].transpose(1, 2)
    with cpu_attention.full_fp32_matmuls():
        want = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True))
        assert not cpu_attention.use_fp32_kernel_for(q, **ok)
    with cpu_attention.Fp32MatmulMode("bf16"):
        assert cpu_attention.use_fp32_kernel_for(q, **ok)
        assert not cpu_attention.use_fp32_kernel_for(q.bfloat16(), **ok)
        assert not cpu_attention.use_fp32_kernel_for(q, **{**ok, "causal": False})
        assert not cpu_attention.use_fp32_kernel_for(q, **{**ok, "grouped": True})
        eager = run(cpu_attention.fp32_causal_attention)
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        torch._dynamo.reset()
        compiled = run(torch.compile(cpu_attention.fp32_causal_attention, fullgraph=True))
    for got in (eager, compiled):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.library.opcheck(torch.ops.tinylm.fp32_causal_attention.default, (q, q, q))


def test_compiled_embedding_backward_sums_rows_in_order():
    """cpu_embedding: under compile on a CPU the table's gradient is eager's, bit for bit, every
    time (inductor's own atomic scatter-add varies in the last bits from run to run)."""
    from tinylm import cpu_embedding

    gen = torch.Generator().manual_seed(0)
    table = torch.nn.Embedding(128, 48)
    idx = torch.randint(0, 65, (8, 64), generator=gen)  # few rows, many tokens: contention
    upstream = torch.randn(8, 64, 48, generator=gen)

    def grad_of(fn):
        table.weight.grad = None
        (fn(table, idx) * upstream).sum().backward()
        return table.weight.grad.clone()

    want = grad_of(lambda emb, i: emb(i))
    torch._dynamo.reset()
    compiled = torch.compile(cpu_embedding.lookup, fullgraph=True)
    for _ in range(5):
        assert torch.equal(grad_of(compiled), want)
    assert torch.equal(compiled(table, idx), table(idx))
    with torch.no_grad():
        assert torch.equal(cpu_embedding.lookup(table, idx), table(idx))
    flat = upstream.reshape(-1, 48)
    torch.library.opcheck(torch.ops.tinylm.embedding_grad.default, (flat, idx.reshape(-1), 128))
