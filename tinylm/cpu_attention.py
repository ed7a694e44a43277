"""Causal self-attention paths for training on a CPU, where SDPA's own kernel is slow.

1. Compiled bf16: SDPA's forward, a faster backward (`causal_attention`).

torch 2.13's CPU flash-attention kernel runs its forward fast and its backward slowly: at
nanoGPT's Shakespeare shape (batch 16, 6 heads, context 256, head 64, bf16, 2 threads on an AMX
host) 4.4 ms forward but ~26 ms backward per layer. This module keeps the kernel's forward, which
also returns each row's log-sum-exp, and computes the backward itself on batched matrix
multiplies: P = exp(S * scale - lse) rebuilt from the saved log-sum-exp, then dV = P^T dO,
dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K * scale, dK = dS^T Q * scale, over chunks of
(batch, head) pairs (`pairs_per_chunk`) so that the T x T tensors of one chunk stay in cache,
and built transposed (`_chunk_backward`: 2.5x faster a chunk, the same sums).
Compiled by inductor inside the model's graph, a layer's forward + backward took 17.5 ms against
SDPA's 26.6 ms, and the whole nano6 fwd+bwd 400-414 against 515 ms a step
(`bench/bench_cpu_kernels.py --parts attention`, notes/issue-18-precision.md). Its gradients
are within bf16's rounding of fp32: relative RMS error 0.35-0.5% where SDPA's bf16 kernel has
0.25-0.35% (S is rounded to bf16 before the exp: CPU matmuls of bf16 inputs have no fp32 output
in torch 2.13; bf16's own rounding step is 0.4%).

`use_for(...)` says when the model takes this path: under torch.compile, on a CPU, in bf16,
causal with no mask, no attention dropout, and as many key/value heads as query heads. Eager,
the same backward is slower than SDPA's (five separate kernels per chunk), so eager runs, and
every other case, stay on `F.scaled_dot_product_attention`.

2. `train.precision=bf32` (fp32 tensors, matrix multiplies with bf16 inputs on oneDNN:
`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`, the CPU's counterpart of TF32): SDPA's
fp32 flash kernel obeys that setting too and becomes ~10x slower (nanoGPT's CPU-recipe shape,
batch 12, 4 heads, context 64, head 32, 2 threads on an AMX host: 8.0 ms against 0.85 ms a layer
forward + backward), while the linear layers' matmuls become 2-3x faster. `fp32_causal_attention`
runs the same kernel, forward and backward, with full fp32 matmuls: one opaque operator to
torch.compile (registered with `torch.library`), so it sets the process-wide flag inside its own
body without breaking the compiled graph. `use_fp32_kernel_for(...)` says when the model takes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (batch, head) pairs per chunk of the backward at context 256: 24 of nano6's 96 ran 21.4 ms a
# layer, 8 ran 23.1 ms, all 96 at once 74.7 ms (their T x T tensors no longer fit in cache).
# Other contexts keep the same T x T working set (6 MiB per fp32 tensor): fewer pairs for a
# longer context, so a chunk never holds gigabytes.
PAIRS_PER_CHUNK = 24
CHUNK_CONTEXT = 256


def pairs_per_chunk(context: int) -> int:
    """How many (batch, head) pairs one chunk of the backward holds at this context length."""
    return max(1, PAIRS_PER_CHUNK * CHUNK_CONTEXT * CHUNK_CONTEXT // (context * context))


def _plain_causal_on_cpu(q: Tensor, causal: bool, dropout_p: float, grouped: bool) -> bool:
    """What both paths need: causal with no mask, no attention dropout, no GQA, on a CPU."""
    return causal and dropout_p == 0.0 and not grouped and q.device.type == "cpu"


def use_for(q: Tensor, *, causal: bool, dropout_p: float, grouped: bool) -> bool:
    """Whether the model's attention takes this path (see the module docstring)."""
    return (
        _plain_causal_on_cpu(q, causal, dropout_p, grouped)
        and q.dtype == torch.bfloat16
        and torch.compiler.is_compiling()
    )


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d), causal) v for [B, H, T, D] tensors: SDPA's values, our backward."""
    return _FlashForwardChunkedBackward.apply(q, k, v)


def _chunk_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    grad_out: Tensor,
    lse: Tensor,
    scale: float,
    hidden_t: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v for one chunk of [n, T, D] tensors (lse: [n, T], fp32; `hidden_t`:
    [T, T], True where a key may not be seen by a query: the causal mask transposed).

    Everything T x T is built transposed, keys along the rows: S^T = K Q^T, P^T, dP^T = V dO^T,
    dS^T. Two of the three products that read it, dV = P^T dO and dK = dS^T Q, then take it as
    it lies in memory; oneDNN copies a transposed left operand before multiplying (a [24, 256,
    256] @ [24, 256, 64] bf16 bmm: 0.35 ms transposed against 0.21 ms as laid out). Compiled, a
    chunk of nano6's backward took 3.0 ms against 7.6 ms for the same sums in the query-major
    layout, with bit-identical gradients (notes/issue-18-precision.md, session 12).
    """
    scores_t = torch.bmm(k, q.transpose(1, 2)).float() * scale
    probs_t = torch.exp(scores_t - lse.unsqueeze(1)).masked_fill(hidden_t, 0.0)
    grad_probs_t = torch.bmm(v, grad_out.transpose(1, 2)).float()
    row_dot = (grad_out.float() * out.float()).sum(-1).unsqueeze(1)
    grad_scores_t = (probs_t * (grad_probs_t - row_dot)).to(q.dtype)
    grad_v = torch.bmm(probs_t.to(q.dtype), grad_out)
    grad_k = torch.bmm(grad_scores_t, q) * scale
    grad_q = torch.bmm(grad_scores_t.transpose(1, 2), k) * scale
    return grad_q, grad_k, grad_v


class _FlashForwardChunkedBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        flat = [t.reshape(B * H, T, D) for t in (q, k, v, out, grad_out.contiguous())]
        lse = lse.reshape(B * H, T)
        n = pairs_per_chunk(T)
        hidden_t = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1)
        parts = [
            _chunk_backward(*(t[i : i + n] for t in flat), lse[i : i + n], D**-0.5, hidden_t)
            for i in range(0, B * H, n)
        ]
        return tuple(torch.cat([p[j] for p in parts]).reshape(B, H, T, D) for j in range(3))


# ------------------------------------------------------------------ 2. fp32 kernels under bf32


# The mode `Fp32MatmulMode` last set, as a plain Python value: torch.compile reads (and guards
# on) a module global, while reading torch.backends' flag inside the model breaks the graph at
# every attention call (measured: 17 compiled graphs a step at nano4 instead of one).
_current_mode = ["none"]


def bf32_matmuls() -> bool:
    """Whether fp32 matrix multiplies run on bf16 inputs now (`train.precision=bf32`)."""
    return _current_mode[-1] == "bf16"


class Fp32MatmulMode:
    """A block in which oneDNN's fp32 matrix multiplies take `mode`: "bf16" (bf16 inputs, fp32
    accumulation: `train.precision=bf32`) or "ieee" (full fp32). The flag is process-wide;
    leaving the block restores it. Reusable and reentrant (the trainer keeps one per run)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._before: list[str] = []

    def __enter__(self) -> None:
        self._before.append(torch.backends.mkldnn.matmul.fp32_precision)
        torch.backends.mkldnn.matmul.fp32_precision = self.mode
        _current_mode.append(self.mode)

    def __exit__(self, *exc: object) -> None:
        torch.backends.mkldnn.matmul.fp32_precision = self._before.pop()
        _current_mode.pop()


def full_fp32_matmuls() -> Fp32MatmulMode:
    """fp32 matrix multiplies in full fp32 inside the block."""
    return Fp32MatmulMode("ieee")


def use_fp32_kernel_for(q: Tensor, *, causal: bool, dropout_p: float, grouped: bool) -> bool:
    """Whether the model's attention takes `fp32_causal_attention` (see the module docstring)."""
    return (
        _plain_causal_on_cpu(q, causal, dropout_p, grouped)
        and q.dtype == torch.float32
        and bf32_matmuls()
    )


def fp32_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA's causal flash attention over [B, H, T, D] fp32 tensors, with full fp32 matmuls."""
    return torch.ops.tinylm.fp32_causal_attention.default(q, k, v)[0]


def _bthd(t: Tensor) -> Tensor:
    """`t` [B, H, T, D] laid out as [B, T, H, D] in memory (the kernel's own output layout, and
    the one the model's `transpose(1, 2).view(B, T, C)` reads without a copy)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _bthd_like(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)


# Two operators, defined and implemented through `torch.library.Library` itself rather than the
# `torch.library.custom_op` decorator, whose Python wrapper around each call (a dynamo-disabled
# frame, checks of the outputs) cost 20-70 us a call: 8 calls a step, ~2% of nano4's compiled
# bf32 step (notes/issue-18-precision.md, session 11). Kept alive for the process's lifetime.
_LIB = torch.library.Library("tinylm", "FRAGMENT")
_LIB.define("fp32_causal_attention(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)")
_LIB.define(
    "fp32_causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
    "Tensor lse) -> (Tensor, Tensor, Tensor)"
)


def _fp32_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    with full_fp32_matmuls():
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return _bthd(out), lse.contiguous()


def _fp32_attention_fake(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return _bthd_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _fp32_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    with full_fp32_matmuls():
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, True
        )
    grad_q, grad_k, grad_v = (_bthd(g) for g in grads)
    return grad_q, grad_k, grad_v


def _fp32_attention_backward_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return _bthd_like(q), _bthd_like(k), _bthd_like(v)


def _save_for_backward(ctx, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
    ctx.save_for_backward(*inputs, *output)


def _attention_backward(ctx, grad_out: Tensor, _grad_lse: Tensor) -> tuple[Tensor, ...]:
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out.stride(-1) != 1:  # the kernel reads rows of D; any other layout it takes as is
        grad_out = grad_out.contiguous()  # (the model's own, [B, T, H, D] in memory, is no copy)
    return torch.ops.tinylm.fp32_causal_attention_backward.default(grad_out, q, k, v, out, lse)


_LIB.impl("fp32_causal_attention", _fp32_attention, "CPU")
_LIB.impl("fp32_causal_attention_backward", _fp32_attention_backward, "CPU")
torch.library.register_fake("tinylm::fp32_causal_attention", _fp32_attention_fake, lib=_LIB)
torch.library.register_fake(
    "tinylm::fp32_causal_attention_backward", _fp32_attention_backward_fake, lib=_LIB
)
torch.library.register_autograd(
    "tinylm::fp32_causal_attention",
    _attention_backward,
    setup_context=_save_for_backward,
    lib=_LIB,
)
