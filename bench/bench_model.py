"""Training-step speed of the model on this machine: eager vs torch.compile, fp32 vs bf16 autocast.

    .venv/bin/python bench/bench_model.py [--shapes tiny,10m] [--steps 3] [--rounds 2] [--profile]

For each shape, the four variants (eager/compiled x fp32/bf16) are timed side by side in one
process: every round times `--steps` steps of each variant in turn, and the median over rounds
is reported, so a change in machine load hits all variants alike. A training step is forward +
backward (`fwd+bwd`, timed) then a fused AdamW update (timed separately); tokens/s and GFLOP/s
(model FLOPs: 6N + attention) are for the whole step. Also reports the
compile time, the graphs/graph breaks torch._dynamo finds on the training path, and the load
average (other processes on a 2-core machine change the figures a lot). `--profile` adds the
op breakdown of one eager fp32 step.

Shapes: `tiny` is tinylm/configs/tiny.yaml's model (char vocabulary, here 65 ids, batch 32);
`10m` is nanoGPT's Shakespeare-char shape (6 layers, 6 heads, d_model 384, context 256,
10.7M parameters) at batch 16.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from tinylm.config import load_config
from tinylm.model import GPT

SHAPES = {
    "tiny": ("tiny", ["model.vocab_size=65"]),
    "10m": (
        "tiny",
        [
            "model.vocab_size=65",
            "model.n_layer=6",
            "model.n_head=6",
            "model.d_model=384",
            "model.context_length=256",
            "train.batch_size=16",
        ],
    ),
}


def build(shape: str, compiled: bool) -> tuple[torch.nn.Module, GPT, object, int, int]:
    """(callable model, raw model, optimizer, batch, context) for a shape."""
    preset, overrides = SHAPES[shape]
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    raw = GPT(cfg.model)
    raw.train()
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4, fused=True)
    model = torch.compile(raw) if compiled else raw
    return model, raw, opt, cfg.train.batch_size, cfg.model.context_length


def graph_report(raw: GPT, x: torch.Tensor, y: torch.Tensor) -> str:
    """Graphs and breaks torch._dynamo sees on the training forward."""
    explanation = torch._dynamo.explain(raw)(x, y)
    reasons = {b.reason for b in explanation.break_reasons}
    return f"{explanation.graph_count} graph(s), {explanation.graph_break_count} break(s)" + (
        f": {sorted(reasons)}" if reasons else ""
    )


def profile_step(step, rows: int = 12) -> str:
    """The ops that take the time in one training step (CPU self time)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,10m")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precisions", default="fp32,bf16", help="bf16 is slow on CPUs without it")
    parser.add_argument("--profile", action="store_true", help="op breakdown of an eager fp32 step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )

    for shape in args.shapes.split(","):
        variants = {}
        for compiled in (False, True):
            model, raw, opt, batch, ctx = build(shape, compiled)
            gen = torch.Generator().manual_seed(0)
            x = torch.randint(0, 65, (batch, ctx), generator=gen)
            y = torch.randint(0, 65, (batch, ctx), generator=gen)
            for bf16 in [p == "bf16" for p in args.precisions.split(",")]:
                name = f"{'compiled' if compiled else 'eager'} {'bf16' if bf16 else 'fp32'}"
                amp = (
                    torch.autocast("cpu", dtype=torch.bfloat16)
                    if bf16
                    else contextlib.nullcontext()
                )

                def step(model=model, amp=amp, opt=opt, x=x, y=y) -> tuple[float, float]:
                    """One training step; returns (fwd+bwd seconds, optimizer seconds)."""
                    t0 = time.perf_counter()
                    with amp:
                        _, loss = model(x, y)
                    loss.backward()
                    t1 = time.perf_counter()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return t1 - t0, time.perf_counter() - t1

                t0 = time.perf_counter()
                step()  # compiles on the first call (once per autocast mode)
                step()
                variants[name] = {"step": step, "warm": time.perf_counter() - t0}
            if not compiled:
                print(
                    f"\n== {shape}: {raw.num_params() / 1e6:.2f}M parameters, batch {batch} x "
                    f"{ctx} tokens, {raw.flops_per_token() / 1e6:.1f} MFLOP/token; "
                    f"dynamo: {graph_report(raw, x, y)}"
                )
        if args.profile:
            print(profile_step(variants["eager fp32"]["step"]))
        times: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for name, v in variants.items():
                times.setdefault(name, []).extend(v["step"]() for _ in range(args.steps))
        tokens = batch * ctx
        print(
            f"{'variant':<14} {'warm-up s':>9} {'fwd+bwd ms':>11} {'AdamW ms':>9} "
            f"{'tokens/s':>9} {'GFLOP/s':>8}"
        )
        for name, v in variants.items():
            fb = statistics.median(t[0] for t in times[name])
            opt_s = statistics.median(t[1] for t in times[name])
            st = fb + opt_s
            print(
                f"{name:<14} {v['warm']:>9.1f} {fb * 1e3:>11.1f} {opt_s * 1e3:>9.1f} "
                f"{tokens / st:>9.0f} {tokens * raw.flops_per_token() / st / 1e9:>8.1f}"
            )
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
