"""The CPU kernels behind issue 18's choices, timed side by side (notes/issue-18-precision.md).

    .venv/bin/python bench/bench_cpu_kernels.py [--parts gate,gelu,attention,bf32] [--rounds 7]
        [--threads 2]

- `gate`: the precision probe's gate, a 256^3 matmul in fp32 and bf16 (and 4096x1024 @
  1024x1024 for scale): where bf16 is not faster, the model is never timed in bf16.
- `gelu`: GPT-2's tanh GELU, fwd+bwd over 4096 x 1536 (nano6's MLP activations), eager and
  compiled, as `F.gelu(approximate="tanh")` and as the same function written with a sigmoid
  (what `model.gelu_tanh` compiles), fp32 and bf16, with their largest difference from float64.
- `attention`: causal attention fwd+bwd per layer at nano6 (B16 H6 T256 D64, bf16): SDPA's
  flash kernel, SDPA in fp32, SDPA's math backend, a hand-written attention eager and compiled,
  and tinylm/cpu_attention.py (SDPA's forward, a chunked backward), compiled as in the model.
- `bf32`: at nano4 (nanoGPT's CPU recipe: 768 tokens, d_model 128), the linear layers' three
  matmuls (forward, input grad, weight grad) in fp32 and in bf32 (oneDNN's bf16-input mode), and
  causal attention fwd+bwd (B12 H4 T64 D32): SDPA in fp32, SDPA under bf32, and
  `cpu_attention.fp32_causal_attention` under bf32 (what `train.precision=bf32` runs).

Variants are called in turn, the order reversed every round; the median is reported. Compiled
variants compile during the warm-up. Write the CPU's flags (`lscpu`) and the load beside any
figure: on a host without bf16 matrix units bf16 is many times slower than fp32.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tinylm import cpu_attention
from tinylm.model import GELU_SIGMOID_SCALE, gelu_tanh


def timed(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each variant, alternating, after two warm-up calls each."""
    for fn in variants.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in list(variants) if r % 2 == 0 else reversed(list(variants)):
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def gate(rounds: int) -> None:
    for m, k, n in ((256, 256, 256), (4096, 1024, 1024)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a16, b16 = a.bfloat16(), b.bfloat16()
        t = timed(
            {"fp32": lambda a=a, b=b: a @ b, "bf16": lambda a16=a16, b16=b16: a16 @ b16}, rounds
        )
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        print(
            f"matmul {tuple(a.shape)} @ {tuple(b.shape)}: fp32 {flops / t['fp32'] / 1e9:.0f} "
            f"GFLOP/s, bf16 {flops / t['bf16'] / 1e9:.0f} GFLOP/s, bf16 {t['fp32'] / t['bf16']:.2f}x"
        )


def gelu(rounds: int) -> None:
    def tanh_form(x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")

    def sigmoid_form(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(GELU_SIGMOID_SCALE * (x + 0.044715 * x * x * x))

    forms = {
        "tanh eager": tanh_form,
        "sigmoid eager": sigmoid_form,
        "tanh compiled": torch.compile(tanh_form),
        "sigmoid compiled": torch.compile(gelu_tanh),  # the model's: its sigmoid form compiled
    }
    for dtype in (torch.float32, torch.bfloat16):
        x0 = torch.randn(16 * 256, 1536, generator=torch.Generator().manual_seed(0)).to(dtype)
        grad = torch.randn_like(x0)
        reference = F.gelu(x0.double(), approximate="tanh")

        def step(fn: Callable, x0: torch.Tensor = x0, grad: torch.Tensor = grad) -> torch.Tensor:
            x = x0.detach().requires_grad_()
            y = fn(x)
            y.backward(grad)
            return y

        t = timed({name: (lambda fn=fn: step(fn)) for name, fn in forms.items()}, rounds)
        for name, fn in forms.items():
            error = (step(fn).double() - reference).abs().max().item()
            print(
                f"gelu {name:17s} {str(dtype)[6:]:8s} fwd+bwd {t[name] * 1e3:6.1f} ms, max error {error:.1e}"
            )


def attention(rounds: int) -> None:
    B, H, T, D = 16, 6, 256, 64
    scale = D**-0.5
    masked = torch.ones(T, T, dtype=torch.bool).triu(1)
    gen = torch.Generator().manual_seed(0)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def math_backend(q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return sdpa(q, k, v)

    def by_hand(q, k, v):
        att = ((q @ k.transpose(-2, -1)) * scale).masked_fill(masked, float("-inf"))
        return torch.softmax(att.float(), dim=-1).to(q.dtype) @ v

    variants = {
        "sdpa flash bf16": (sdpa, torch.bfloat16),
        "sdpa flash fp32": (sdpa, torch.float32),
        "sdpa math bf16": (math_backend, torch.bfloat16),
        "by hand bf16": (by_hand, torch.bfloat16),
        "by hand compiled bf16": (torch.compile(by_hand), torch.bfloat16),
        # tinylm/cpu_attention.py, compiled as inside the model
        "chunked backward bf16": (torch.compile(cpu_attention.causal_attention), torch.bfloat16),
    }
    bf16 = [torch.randn(B, H, T, D, generator=gen).bfloat16() for _ in range(4)]  # q, k, v, grad
    inputs = {torch.bfloat16: bf16, torch.float32: [t.float() for t in bf16]}  # the same values

    def step(fn: Callable, dtype: torch.dtype) -> tuple:
        *qkv, grad = inputs[dtype]
        leaves = [t.detach().requires_grad_() for t in qkv]
        fn(*leaves).backward(grad)
        return tuple(t.grad for t in leaves)

    t = timed(
        {name: (lambda fn=fn, dt=dt: step(fn, dt)) for name, (fn, dt) in variants.items()}, rounds
    )
    exact = step(sdpa, torch.float32)  # fp32 gradients of the same values
    for name, (fn, dtype) in variants.items():
        error = max(
            (g.float() - e).abs().max().item() for g, e in zip(step(fn, dtype), exact, strict=True)
        )
        print(
            f"attention {name:22s} fwd+bwd {t[name] * 1e3:6.1f} ms per layer, max grad error {error:.3f}"
        )


def bf32(rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x, w, grad = (
        torch.randn(*shape, generator=gen) for shape in ((768, 128), (384, 128), (768, 384))
    )
    gemms = {
        "forward x @ W^T": lambda: F.linear(x, w),
        "input grad g @ W": lambda: grad @ w,
        "weight grad g^T @ x": lambda: grad.t() @ x,
    }

    def in_mode(fn: Callable, mode: str) -> Callable[[], None]:
        def call() -> None:
            with cpu_attention.Fp32MatmulMode(mode):  # ~2.5 us a switch, against 70-250 us
                fn()

        return call

    # fp32 and bf32 alternate call by call (`timed`), so load hits both alike
    variants = {
        f"{name} {mode}": in_mode(fn, mode)
        for name, fn in gemms.items()
        for mode in ("ieee", "bf16")
    }
    for name, seconds in timed(variants, rounds * 20).items():
        print(f"bf32 gemm {name:25s} {seconds * 1e6:7.1f} us")
    B, T, H, D = 12, 64, 4, 32
    qkv = torch.randn(B, T, 3, H, D, generator=gen)  # q, k, v as the model slices them
    out_grad = torch.randn(B, H, T, D, generator=gen)

    def attention_step(fn: Callable) -> None:
        leaf = qkv.clone().requires_grad_()
        fn(*(leaf[:, :, i].transpose(1, 2) for i in range(3))).backward(out_grad)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    ours = cpu_attention.fp32_causal_attention
    variants = {
        "sdpa fp32": in_mode(lambda: attention_step(sdpa), "ieee"),
        "sdpa under bf32": in_mode(lambda: attention_step(sdpa), "bf16"),
        "fp32_causal_attention under bf32": in_mode(lambda: attention_step(ours), "bf16"),
    }
    for name, seconds in timed(variants, rounds * 5).items():
        print(f"bf32 attention {name:33s} fwd+bwd {seconds * 1e6:7.0f} us per layer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="gate,gelu,attention")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    parts = {"gate": gate, "gelu": gelu, "attention": attention, "bf32": bf32}
    if unknown := [p for p in args.parts.split(",") if p not in parts]:
        parser.error(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(parts)})")
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"
    )
    for part in args.parts.split(","):
        parts[part](args.rounds)
    print(f"load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
