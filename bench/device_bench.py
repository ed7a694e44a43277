"""GPU measurements for bench/device_suite.sh: one JSON object per call on stdout.

    .venv/bin/python bench/device_bench.py throughput [--preset gpt2-124m] [--batch 16]
        [--steps 30] [--precision bf16] [--compile]
    .venv/bin/python bench/device_bench.py muon [--preset gpt2-124m] [--steps 10]

`throughput`: the training step of tinylm's model (forward under the precision's autocast,
backward, clipping, fused AdamW) on random tokens at the preset's context, `--steps` timed steps
after a warm-up (which compiles, with `--compile`); tokens/s, MFU against the peak table of
tinylm/train/runtime.py (`peak_flops`: per GPU model, dense bf16), and peak memory.
`muon`: the optimizer step alone, AdamW vs Muon + AdamW with bfloat16 Newton-Schulz (torch's own
`Muon.step`) on the preset's weights with random gradients.

Never run by the tests (it needs a CUDA device).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tinylm.config import load_config
from tinylm.model import GPT
from tinylm.train import precision as precisions
from tinylm.train import runtime
from tinylm.train.optim import build_optimizer


def _sync() -> None:
    torch.cuda.synchronize()


def throughput(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    cfg = load_config(
        args.preset,
        [f"train.batch_size={args.batch}", "model.vocab_size=50257", "optim.name=adamw"],
    )
    torch.manual_seed(0)
    raw = GPT(cfg.model).to(device)
    model = torch.compile(raw) if args.compile else raw
    prec = runtime.select_precision(args.precision, device)
    opt = build_optimizer(raw, cfg.optim, device)
    x = torch.randint(0, 50257, (args.batch, cfg.model.context_length), device=device)

    def step() -> None:
        with precisions.autocast_context(device, prec):
            _, loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up: compile, autotuning, allocator
        step()
    _sync()
    warmup_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync()
    per_step = (time.perf_counter() - t0) / args.steps
    tokens_per_s = args.batch * cfg.model.context_length / per_step
    peak, peak_note = runtime.peak_flops(device, prec)
    mfu = raw.flops_per_token() * tokens_per_s / peak if peak else None
    return {
        "what": "throughput",
        "gpu": torch.cuda.get_device_name(device),
        "preset": args.preset,
        "precision": prec.name,
        "compile": bool(args.compile),
        "batch": args.batch,
        "context": cfg.model.context_length,
        "ms_per_step": 1000 * per_step,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_flops_note": peak_note,
        "warmup_s": warmup_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }


def muon(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    out = {"what": "muon_step", "gpu": torch.cuda.get_device_name(device), "preset": args.preset}
    for name, overrides in (
        ("adamw", ["optim.name=adamw"]),
        ("muon_bf16", ["optim.name=muon", "optim.muon_ns_dtype=bfloat16"]),
        ("muon_fp32", ["optim.name=muon", "optim.muon_ns_dtype=float32"]),
    ):
        cfg = load_config(args.preset, ["model.vocab_size=50257", *overrides])
        torch.manual_seed(0)
        model = GPT(cfg.model).to(device)
        opt = build_optimizer(model, cfg.optim, device)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        for _ in range(2):
            opt.step()
        _sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            opt.step()
        _sync()
        out[f"{name}_ms"] = 1000 * (time.perf_counter() - t0) / args.steps
        del model, opt
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--preset", default="gpt2-124m")
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--precision", default="bf16")
    t.add_argument("--compile", action="store_true")
    m = sub.add_parser("muon")
    m.add_argument("--preset", default="gpt2-124m")
    m.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("device_bench.py needs a CUDA device")
    print(json.dumps(throughput(args) if args.what == "throughput" else muon(args)))


if __name__ == "__main__":
    main()
