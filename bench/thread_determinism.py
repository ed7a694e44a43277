"""Do 1 and 2 torch threads compute the same gradients? (They do not: see notes/issue-24-busy-machine.md.)

One forward/backward of a small transformer-like block (embedding, RMSNorm, MLP, attention,
head) on fixed inputs, at 1 and then 2 threads; prints, per parameter, whether the gradients are
bitwise equal and the largest difference. This is why a run keeps one thread count
(tinylm/train/threads.py). Usage:
  .venv/bin/python bench/thread_determinism.py [--rows 2048] [--width 128]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048, help="batch x context tokens")
    ap.add_argument("--width", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    d, vocab, t = args.width, 65, 128
    b = max(1, args.rows // t)
    mods = {
        "embedding": torch.nn.Embedding(vocab, d),
        "norm": torch.nn.RMSNorm(d),
        "mlp_in": torch.nn.Linear(d, 4 * d, bias=False),
        "mlp_out": torch.nn.Linear(4 * d, d, bias=False),
        "head": torch.nn.Linear(d, vocab, bias=False),
    }
    x, y = torch.randint(0, vocab, (b, t)), torch.randint(0, vocab, (b, t))

    def grads(threads: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.set_num_threads(threads)
        for m in mods.values():
            m.zero_grad(set_to_none=True)
        h = mods["embedding"](x)
        h = h + mods["mlp_out"](torch.nn.functional.gelu(mods["mlp_in"](mods["norm"](h))))
        q = h.view(b, t, 4, d // 4).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        logits = mods["head"](h + a.transpose(1, 2).reshape(b, t, d))
        loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), y.view(-1))
        loss.backward()
        return loss.detach(), [p.grad.clone() for m in mods.values() for p in m.parameters()]

    loss1, g1 = grads(1)
    loss2, g2 = grads(2)
    print(f"{b} x {t} tokens, width {d}; loss equal: {torch.equal(loss1, loss2)}")
    for name, a, c in zip(mods, g1, g2, strict=True):
        print(f"{name:>10}: equal {torch.equal(a, c)}, max |diff| {(a - c).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
