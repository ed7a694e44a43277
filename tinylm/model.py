"""The decoder-only transformer: one file, top to bottom.

Every architecture choice, and the `ModelConfig` field that selects it:

- Token embedding of `padded_vocab_size(cfg)` rows: `vocab_size` rounded up to `vocab_multiple`
  so the embedding and output matmuls have tensor-core-friendly shapes. The padded rows are
  inert: no token id ever looks them up, `forward` slices the logits back to `vocab_size` (so the
  loss never targets them, their softmax mass is zero, and they get no gradient from the loss),
  generation never samples them, and `init_weights` sets them to zero. (Compiled training on a
  CPU sums the table's gradient rows with ATen's `index_add_` rather than inductor's contended
  atomics: `tinylm/cpu_embedding.py`.)
- Positions (`pos_emb`): a learned table added to the token embedding (GPT-2), or rotary
  embeddings (RoPE, `rope_theta`) applied to queries and keys in every layer, in the "split
  halves" layout of GPT-NeoX/LLaMA-HF. The cos/sin tables are precomputed non-persistent buffers
  (recomputed by `init_weights`, so a model built on the meta device gets real values).
- Pre-norm blocks: `x + attn(norm(x))`, `x + mlp(norm(x))`, and a final norm before the output
  head. `norm` is LayerNorm (with a bias when `bias`) or RMSNorm, both through the fused
  `torch.nn.functional` kernels; `norm_eps` is their epsilon.
- Attention: one fused QKV projection, `n_head` query heads and `n_kv_head` key/value heads
  (fewer = grouped-query attention; SDPA's `enable_gqa` shares each K/V head across its group
  without materialising copies), optional QK-norm (`qk_norm`: RMSNorm with a learned gain over
  the head dimension of q and k, applied before RoPE), then
  `F.scaled_dot_product_attention`. Training without a sliding window uses `is_causal=True` and
  no mask, which keeps SDPA on its fused (flash) kernel. (Compiled bf16 training on a CPU keeps
  that kernel's forward and takes its backward from `tinylm/cpu_attention.py`: same values,
  ~1.5x faster there; under `train.precision=bf32` it runs that kernel with full fp32 matmuls,
  ~10x faster than SDPA rounding them to bf16.) A sliding window (`sliding_window` = W:
  a query sees itself and the W-1 positions before it) or decoding with a KV cache builds the
  boolean mask that says exactly which keys each query may see.
- MLP (`mlp`): GELU (tanh approximation, as GPT-2) with hidden width `ff_dim`, SwiGLU
  (`silu(x W_gate) * (x W_up)`, gate and up fused into one matmul) with hidden width `ff_dim`,
  or ReLU² (`relu(x W)^2`, ungated, as in Primer and modded-nanogpt).
- `bias`: biases on every linear layer and on LayerNorm, or none.
- `dropout` on the embedding output, after the attention and MLP projections; `attn_dropout`
  on the attention probabilities (training only).
- `tie_embeddings`: the output head shares the token embedding matrix, or has its own.
- Initialisation (`init_weights`, called once from the constructor): see its docstring.

`forward(idx, targets)` returns `(logits, loss)`; the loss is the mean cross-entropy computed in
fp32 with `ignore_index=-1`. `make_kv_cache` builds the cache that generation passes back in with
`start_pos` so each new token costs one position of compute instead of the whole prefix.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from tinylm import cpu_attention, cpu_embedding
from tinylm.config import ModelConfig

Tensor = torch.Tensor
Rope = tuple[Tensor, Tensor]  # the cos and sin tables for the positions being processed

# SDPA gained `enable_gqa` in torch 2.5. Where it exists it is measurably faster than repeating
# K/V heads (fwd+bwd, B=32 T=256 4 q-heads 2 kv-heads on 2 CPU cores: 46 vs 55 ms).
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


def padded_vocab_size(cfg: ModelConfig) -> int:
    """`cfg.vocab_size` rounded up to a multiple of `cfg.vocab_multiple`."""
    if cfg.vocab_size <= 0:
        raise ValueError(
            "model.vocab_size is 0: set it from the tokenizer (tokenizer.vocab_size) before "
            "building the model"
        )
    m = cfg.vocab_multiple
    return m * math.ceil(cfg.vocab_size / m)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class Norm(nn.Module):
    """LayerNorm (optionally with a bias) or RMSNorm over the last dimension."""

    def __init__(self, dim: int, kind: str, eps: float, bias: bool) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if (bias and kind == "layernorm") else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "rmsnorm":
            # Under autocast q/k arrive in bf16 and rms_norm (unlike layer_norm) is not upcast by
            # autocast; a gain in another dtype would push it off the fused kernel.
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, each [length, head_dim // 2], for rotary position embeddings (fp32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) of x [B, H, T, D] by the angles in cos/sin [T, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def attention_mask(
    q_start: int, q_len: int, k_len: int, window: int | None, device: torch.device
) -> Tensor:
    """Boolean [q_len, k_len] mask, True where query (at position q_start + i) may see key j.

    Keys are positions 0..k_len-1. Causal: j <= query position; with a sliding window W also
    query position - j < W (the query itself and the W-1 positions before it).
    """
    q_pos = torch.arange(q_start, q_start + q_len, device=device).unsqueeze(1)
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (q_pos - k_pos < window)
    return mask


class KVCache:
    """Keys and values of every layer for positions already processed, preallocated.

    `k[layer]`, `v[layer]`: [batch, n_kv_head, max_len, head_dim]. The cache stores the K/V heads
    themselves (not repeated across a GQA group), so it is n_head/n_kv_head times smaller.
    `pos` is the number of positions filled; `GPT.forward` advances it.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0

    def update(
        self, layer: int, start: int | Tensor, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Write k, v [B, n_kv_head, T, D] at positions start..start+T-1; return all keys/values
        for positions 0..start+T-1.

        `start` may be an int64 [B, T] tensor of per-row positions (rows of different lengths
        decoding together, see `GPT.forward(positions=...)`); then keys/values up to the
        furthest row's position are returned and the caller masks each row's unused slots.
        """
        end = int(start.max()) + 1 if isinstance(start, Tensor) else start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to fill up to {end}")
        if isinstance(start, Tensor):
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            # Advanced indices on dims 0 and 2 put [B, T] first: values are [B, T, KV, D].
            self.k[layer][rows, :, start] = k.transpose(1, 2)
            self.v[layer][rows, :, start] = v.transpose(1, 2)
        else:
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention through SDPA."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # which slot of a KV cache is ours
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.window = cfg.sliding_window
        self.attn_dropout = cfg.attn_dropout
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_projection = True  # init_weights scales it down (GPT-2)
        self.q_norm = Norm(self.head_dim, "rmsnorm", cfg.norm_eps, False) if cfg.qk_norm else None
        self.k_norm = Norm(self.head_dim, "rmsnorm", cfg.norm_eps, False) if cfg.qk_norm else None
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, rope: Rope | None, cache: KVCache | None, start_pos: int | Tensor
    ) -> Tensor:
        B, T, C = x.shape
        per_row = isinstance(start_pos, Tensor)  # [B, T] positions (see GPT.forward)
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([C, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        if cache is not None:
            k, v = cache.update(self.layer, start_pos, k, v)
            if T == 1 and self.window is not None and not per_row:
                # One new token sees only the last `window` keys: slice instead of masking.
                k, v = k[:, :, -self.window :], v[:, :, -self.window :]
            # A cache kept in another dtype than the activations (fp32 cache under autocast).
            k, v = k.to(q.dtype), v.to(q.dtype)
        k_len = k.shape[2]

        mask, is_causal = None, False
        if per_row:
            # Each row sees its own keys 0..its position (and within the window); slots past a
            # row's position hold another row's (or an old request's) keys and stay hidden.
            q_pos = start_pos[:, None, :, None]  # [B, 1, T, 1]
            k_pos = torch.arange(k_len, device=x.device)
            mask = k_pos <= q_pos
            if self.window is not None:
                mask = mask & (q_pos - k_pos < self.window)
        elif T == 1:
            pass  # one new token may see every key it is given (see the slice above)
        elif k_len == T and self.window is None:
            is_causal = True  # the training path: fused kernel, no mask
        else:
            mask = attention_mask(k_len - T, T, k_len, self.window, x.device)

        dropout_p = self.attn_dropout if self.training else 0.0
        grouped = self.n_kv_head != self.n_head
        if cpu_attention.use_for(q, causal=is_causal, dropout_p=dropout_p, grouped=grouped):
            y = cpu_attention.causal_attention(q, k, v)  # compiled bf16 on a CPU: a faster backward
        elif cpu_attention.use_fp32_kernel_for(
            q, causal=is_causal, dropout_p=dropout_p, grouped=grouped
        ):
            y = cpu_attention.fp32_causal_attention(q, k, v)  # bf32: SDPA would round to bf16
        else:
            if _SDPA_HAS_GQA:
                gqa = {"enable_gqa": grouped}
            else:
                rep = self.n_head // self.n_kv_head
                k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), {}
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, **gqa
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


GELU_SIGMOID_SCALE = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.

    Eager, `F.gelu(approximate="tanh")`. Under torch.compile the same function written with a
    sigmoid, `0.5 (1 + tanh(z)) = sigmoid(2z)`: inductor's CPU code for the tanh form ran fwd+bwd
    at 16.2 ms, the sigmoid form at 8.4 ms (fp32; bf16 13.8 vs 6.7 ms; 4096 x 1536, 2 threads,
    AMX host, notes/issue-18-precision.md), equal within one rounding step. Eager, the sigmoid
    form is five separate kernels and 5x slower, so eager keeps the fused one.

    Compiled, the sigmoid is also kept for the backward (`_keep_sigmoid`): left to itself the
    partitioner saved the input and the output and recomputed the sigmoid (an exp and a division,
    most of the kernel's time) in the backward; now it saves the input and the sigmoid, as many
    tensors, and rebuilds the output with one multiply. nano4's compiled bf32 step 3.5-4.5% faster,
    nano6's bf16 one 6-9% (notes/issue-18-precision.md, session 11).
    """
    if torch.compiler.is_compiling():
        return checkpoint(_gelu_sigmoid_form, x, use_reentrant=False, context_fn=_keep_sigmoid)
    return F.gelu(x, approximate="tanh")


def _gelu_sigmoid_form(x: Tensor) -> Tensor:
    return x * torch.sigmoid(GELU_SIGMOID_SCALE * (x + 0.044715 * x * x * x))


def _sigmoid_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op is torch.ops.aten.sigmoid.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_keep_sigmoid = functools.partial(create_selective_checkpoint_contexts, _sigmoid_policy)


def _is_sac_notice(record: logging.LogRecord) -> bool:
    # torch logs once that a checkpointed region given a `context_fn` under compile must hold no
    # in-place ops; the GELU's holds none, and the notice would only puzzle a run's reader.
    return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


logging.getLogger("torch._higher_order_ops.wrap").addFilter(_is_sac_notice)


class MLP(nn.Module):
    """GELU or ReLU² MLP (d_model -> ff_dim -> d_model), or SwiGLU (gate and up fused in `fc`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.ff_dim
        width = 2 * hidden if self.kind == "swiglu" else hidden
        self.fc = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = gelu_tanh(h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg, layer)
        self.norm2 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, rope: Rope | None, cache: KVCache | None, start_pos: int | Tensor
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, cache, start_pos)
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class GPT(nn.Module):
    """Decoder-only transformer language model configured by a `ModelConfig`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.padded_vocab = padded_vocab_size(cfg)
        self.tok_emb = nn.Embedding(self.padded_vocab, cfg.d_model)
        self.pos_emb = (
            nn.Embedding(cfg.context_length, cfg.d_model) if cfg.pos_emb == "learned" else None
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        # Per-block activation checkpointing (train.activation_checkpointing): a training forward
        # keeps only each block's input and recomputes the block in the backward pass.
        self.activation_checkpointing = False
        self.norm_f = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, self.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_emb == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta)
            # Non-persistent: derived from the config, so not in checkpoints.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (and the RoPE tables); called once by the constructor.

        - Linear weights and embeddings (token, position, untied head): normal (or normal
          truncated at +-2 std, `init="trunc_normal"`) with std `init_std` (GPT-2: 0.02).
        - The two residual projections of each block (`attn.proj`, `mlp.proj`): std
          `init_std / sqrt(2 * n_layer)` — each block adds two contributions to the residual
          stream, so this keeps its variance at initialisation independent of depth (GPT-2).
          With `zero_init_residual` they start at zero instead, so every block starts as the
          identity (modded-nanogpt).
        - Biases zero; norm gains one (LayerNorm bias zero).
        - Padded vocabulary rows zero (they are never used; see the module docstring).
        - RoPE cos/sin recomputed, so a model built on the meta device and moved with
          `to_empty(device=...)` is complete after calling this.
        """
        if self.tok_emb.weight.is_meta:
            return  # shapes only (counting, sharding plans): nothing to fill; call after to_empty
        cfg = self.cfg
        std = cfg.init_std

        def fill(t: Tensor, s: float) -> None:
            if cfg.init == "trunc_normal":
                nn.init.trunc_normal_(t, mean=0.0, std=s, a=-2 * s, b=2 * s)
            else:
                nn.init.normal_(t, mean=0.0, std=s)

        for module in self.modules():
            if isinstance(module, nn.Linear):
                scaled = getattr(module, "is_residual_projection", False)
                if scaled and cfg.zero_init_residual:
                    nn.init.zeros_(module.weight)
                else:
                    fill(module.weight, std / math.sqrt(2 * cfg.n_layer) if scaled else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                fill(module.weight, std)
            elif isinstance(module, Norm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # (A tied head is the embedding matrix; filling it twice with the same std is harmless.)
        self.tok_emb.weight[self.vocab_size :].zero_()
        if not cfg.tie_embeddings:
            self.lm_head.weight[self.vocab_size :].zero_()
        if cfg.pos_emb == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int | None = None,
        last_only: bool = False,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits [B, T, vocab_size] (or [B, 1, vocab_size] with `last_only`) and the loss.

        idx: int64 [B, T] token ids at positions start_pos..start_pos+T-1.
        targets: int64 [B, T] or None; -1 marks positions that do not count in the loss.
        kv_cache: from `make_kv_cache`; keys/values of these positions are written into it and
            attention reads all earlier positions from it; its `pos` advances to start_pos+T.
        start_pos: position of idx[:, 0]; defaults to `kv_cache.pos` (0 without a cache).
        last_only: compute logits for the last position only (skips the full vocabulary
            projection over the prompt during prefill); not allowed with targets.
        positions: int64 [B], the position of idx[b, 0] for each row (instead of `start_pos`):
            rows of different lengths decode together from one cache, each writing and seeing
            only its own positions (the serving engine's batched decode).
        """
        T = idx.shape[1]
        if positions is not None:
            return self._forward_rows(idx, positions, kv_cache, last_only)
        if start_pos is None:
            start_pos = kv_cache.pos if kv_cache is not None else 0
        if start_pos + T > self.cfg.context_length:
            raise ValueError(
                f"positions {start_pos}..{start_pos + T - 1} exceed the context length "
                f"{self.cfg.context_length}"
            )
        x = cpu_embedding.lookup(self.tok_emb, idx)  # compiled on a CPU: a faster backward
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start_pos, start_pos + T, device=idx.device))
        x = self.dropout(x)
        rope = None
        if self.cfg.pos_emb == "rope":
            rope = (
                self.rope_cos[start_pos : start_pos + T],
                self.rope_sin[start_pos : start_pos + T],
            )
        recompute = self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # non-reentrant: works with autocast, torch.compile and kwargs-free calls
                x = checkpoint(block, x, rope, None, start_pos, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache, start_pos)
        if kv_cache is not None:
            kv_cache.pos = start_pos + T
        x = self.norm_f(x)

        if last_only:
            if targets is not None:
                raise ValueError("last_only=True computes no loss; pass targets=None")
            x = x[:, -1:]
        # Slicing away the padded rows is a view; the matmul itself keeps the padded shape.
        logits = self.lm_head(x)[..., : self.vocab_size]
        loss = None
        if targets is not None:
            # fp32 loss: log-softmax over a large vocabulary in bf16 loses the small probabilities.
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def _forward_rows(
        self, idx: Tensor, positions: Tensor, kv_cache: KVCache | None, last_only: bool
    ) -> tuple[Tensor, None]:
        """`forward` with per-row start positions (see its `positions` argument)."""
        pos = positions[:, None] + torch.arange(idx.shape[1], device=idx.device)  # [B, T]
        if int(pos.max()) >= self.cfg.context_length:
            raise ValueError(f"positions exceed the context length {self.cfg.context_length}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        x = self.dropout(x)
        rope = None
        if self.cfg.pos_emb == "rope":  # [B, 1, T, D/2]: broadcasts over the heads
            rope = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))
        for block in self.blocks:
            x = block(x, rope, kv_cache, pos)
        if kv_cache is not None:
            kv_cache.pos = int(pos.max()) + 1
        x = self.norm_f(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)[..., : self.vocab_size], None

    def make_kv_cache(
        self,
        batch: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` (default: context) positions.

        dtype defaults to the parameters' dtype; under autocast pass the autocast dtype so the
        cache matches the activations.
        """
        p = self.tok_emb.weight
        return KVCache(
            self.cfg.n_layer,
            batch,
            self.cfg.kv_heads,
            min(max_len or self.cfg.context_length, self.cfg.context_length),
            self.cfg.head_dim,
            device if device is not None else p.device,
            dtype if dtype is not None else p.dtype,
        )

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters; a tied matrix counts once.

        non_embedding=True leaves out the token embedding and the learned position table (the
        lookups); an untied output head is a matmul and stays counted.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), for MFU and estimates.

        6 * N, where N is every parameter that takes part in a matmul per token: the
        non-embedding parameters plus the output head d_model x padded_vocab (counted even when
        tied — the lookup is free, the projection is not; norm gains and biases are included,
        as in nanoGPT, and are negligible). Plus the attention scores and weighted sum,
        12 * n_layer * d_model * context_length (PaLM appendix B / nanoGPT convention: full
        T x T attention, no discount for the causal mask or a sliding window).
        """
        cfg = self.cfg
        n = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.context_length
