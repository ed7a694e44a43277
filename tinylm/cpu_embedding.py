"""The token embedding's backward on a CPU under torch.compile: ATen's row sums, not atomics.

inductor lowers an embedding's backward to a scatter-add in which the threads add each token's
gradient row into the table with atomic instructions. With a small vocabulary most tokens land
on the same few rows, and the threads contend: at nanoGPT's Shakespeare shape (65 characters,
16 x 256 tokens of width 384, 2 threads, bf16 compiled) the fused kernel holding it took 7.2 ms
a step, 2.7 ms without it, while ATen's `index_add_` sums the same rows in 0.12 ms. The atomics
also add in whatever order the threads reach a row: 50 of 50 repeats of the compiled backward
on the same inputs differed from the first in the last bits, where `index_add_` gives eager
`embedding_backward`'s sums bit for bit (notes/issue-18-precision.md, session 12).

`lookup(...)` takes this path under compile on a CPU while gradients are on (an operator
registered with `torch.library`, opaque to inductor); everywhere else it is the module's own
call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LIB = torch.library.Library("tinylm", "FRAGMENT")  # kept alive for the process's lifetime
_LIB.define("embedding_grad(Tensor grad, Tensor idx, int rows) -> Tensor")


def _embedding_grad(grad: Tensor, idx: Tensor, rows: int) -> Tensor:
    flat = grad.reshape(-1, grad.shape[-1])
    return flat.new_zeros(rows, flat.shape[-1]).index_add_(0, idx.reshape(-1), flat)


def _embedding_grad_fake(grad: Tensor, idx: Tensor, rows: int) -> Tensor:
    return grad.new_empty(rows, grad.shape[-1])


_LIB.impl("embedding_grad", _embedding_grad, "CPU")
torch.library.register_fake("tinylm::embedding_grad", _embedding_grad_fake, lib=_LIB)


class _EmbeddingSummedBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = weight.shape[0]
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (idx,) = ctx.saved_tensors
        return torch.ops.tinylm.embedding_grad.default(grad, idx, ctx.rows), None


def lookup(embedding: nn.Embedding, idx: Tensor) -> Tensor:
    """`embedding(idx)`, with the backward above where it applies (see the module docstring)."""
    plain = (
        embedding.padding_idx is None
        and embedding.max_norm is None
        and not embedding.scale_grad_by_freq
        and not embedding.sparse
    )
    if (
        plain
        and idx.device.type == "cpu"
        and torch.compiler.is_compiling()
        and torch.is_grad_enabled()
        and embedding.weight.requires_grad
    ):
        return _EmbeddingSummedBackward.apply(embedding.weight, idx)
    return embedding(idx)
