"""tinylm's training step side by side with nanoGPT's, on the same machine, alternating.

    .venv/bin/python bench/bench_vs_nanogpt.py --nanogpt PATH [--shapes nano4,nano6,tiny]
        [--rounds 5] [--steps 5] [--profile] [--compile] [--auto] [--own]

PATH is a checkout of karpathy/nanoGPT (its `model.py` is imported from there; nothing of it is
kept in this repository). For each shape the variants are timed in turn, `--steps` steps each,
for `--rounds` rounds (the order rotates every round), so load from other processes on a shared
machine hits every variant alike; the report gives the median tokens/s per variant and the
median over rounds of the per-round ratio tinylm / nanoGPT.

Each variant runs in a process of its own, built once and stepped on command, as each program
runs for its users: what one sets for its whole process does not reach the other. (Until
session 12 they shared one process; tinylm's CPU runs now raise glibc's malloc thresholds,
`tinylm/train/heap.py`, which nanoGPT's own `train.py` process would not have: in the shared
process nanoGPT's step went from 1,280-1,321 to 1,170-1,210 ms at nano6 with them.)

- tinylm runs its real training path: a `Trainer` built from the preset (Tiny Shakespeare as
  data, char tokenizer), then `Trainer.train_step` (loader with prefetch, LR, forward, backward,
  clipping, the non-finite guard, fused AdamW) plus the per-step monitor bookkeeping.
- nanoGPT runs the step of its `train.py` on CPU as its README's CPU recipe does (no autocast,
  `compile=False`): LR set per group, forward, the next `get_batch` (memmap re-opened, random
  windows stacked), backward, `clip_grad_norm_(1.0)`, the optimizer from its own
  `configure_optimizers` (unfused AdamW on CPU), `zero_grad(set_to_none=True)`.

Shapes (vocabulary: the 65 characters of Tiny Shakespeare):
- `nano4`: nanoGPT's README CPU recipe, 4 layers, 4 heads, d_model 128, context 64, batch 12.
- `nano6`: its Shakespeare-char config, 6 layers, 6 heads, d_model 384, context 256, batch 16.
  At both, tinylm builds the same network as nanoGPT: LayerNorm, learned positions, GELU, no
  biases (nanoGPT's `bias=False` default), tied embeddings.
- `tiny`: tinylm's `tiny` preset as it is, against nanoGPT at the preset's dimensions (nanoGPT
  has no RoPE/RMSNorm/SwiGLU, so there the networks differ in those details).

`--compile` adds tinylm with `train.compile=true` (compile time reported separately);
`--auto` adds tinylm with its defaults, `train.precision=auto train.compile=auto` (the
precision probe and the compile decision of a long run; issue 18's acceptance comparison);
`--own` adds tinylm with its defaults AND its own architecture and optimizer at the shape's size
(RMSNorm, RoPE, SwiGLU, QK-norm, Muon: the `tiny` preset resized), a different network from
nanoGPT's of about the same parameter count;
`--profile` prints the op table (torch.profiler, CPU self time) of a few steps of each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tinylm.config import load_config
from tinylm.paths import shared_data_dir

# (tinylm preset, overrides, nanoGPT model arguments, batch)
GPT2_FORM = ["model.norm=layernorm", "model.pos_emb=learned", "model.mlp=gelu", "model.bias=false"]
SHAPES = {
    "nano4": dict(n_layer=4, n_head=4, d_model=128, context=64, batch=12, gpt2_form=True),
    "nano6": dict(n_layer=6, n_head=6, d_model=384, context=256, batch=16, gpt2_form=True),
    "tiny": dict(gpt2_form=False),
}


def load_nanogpt(path: Path):
    """nanoGPT's model module, imported from the user's checkout."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    if spec is None or not (path / "model.py").is_file():
        sys.exit(f"--nanogpt {path}: no model.py there (give a checkout of karpathy/nanoGPT)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tinylm_config(
    shape: str, text: Path, workdir: Path, compile_: bool | str, own_form: bool = False
):
    """The tinylm config of a shape: the tiny preset, resized for the nanoGPT shapes (with
    `own_form`, resized only: tinylm's own architecture and optimizer at that size)."""
    s = SHAPES[shape]
    overrides = [
        f"data.train={text}",
        f"data.cache_dir={workdir / 'cache'}",
        "data.tokenizer=char",
        f"train.compile={str(compile_).lower()}",
        # the fixed variants stay fp32 (as before the probe existed); --auto lets it decide
        f"train.precision={'auto' if compile_ == 'auto' else 'fp32'}",
        "train.max_steps=100000",
        "log.tensorboard=false",
        "log.progress=false",
    ]
    if s["gpt2_form"]:  # the nanoGPT shape's size
        overrides += [
            f"model.n_layer={s['n_layer']}",
            f"model.n_head={s['n_head']}",
            f"model.d_model={s['d_model']}",
            f"model.context_length={s['context']}",
            f"train.batch_size={s['batch']}",
            "model.d_ff=null",
        ]
    if s["gpt2_form"] and not own_form:  # and nanoGPT's network and optimizer
        overrides += [
            *GPT2_FORM,
            "model.n_kv_head=null",
            "model.qk_norm=false",
            # nanoGPT's optimizer: AdamW alone (the preset's Muon default would time a
            # different, costlier optimizer step, not the same training step)
            "optim.name=adamw",
            "optim.lr=1e-3",
        ]
    return load_config("tiny", overrides)


class TinylmStep:
    """tinylm's training path: a real `Trainer`, stepped through `train_step`."""

    def __init__(self, cfg, workdir: Path, name: str) -> None:
        from tinylm.train.monitor import TrainMonitor
        from tinylm.train.sinks import RunLogger
        from tinylm.train.trainer import Trainer

        with contextlib.redirect_stdout(open(os.devnull, "w")):
            self.trainer = Trainer(cfg, workdir / name)
        t = self.trainer
        log = RunLogger(
            workdir / name, cfg.log, enabled=False, run_name=name, config_dict={}, max_steps=1
        )
        self.monitor = TrainMonitor(
            log,
            cfg,
            optimizer=t.optimizer,
            device=t.device,
            precision=t.precision,
            dist=t.dist,
            flops_per_token=t.flops_per_token,
        )
        self.batches = iter(t.loader.iterate(0))
        self.tokens = cfg.train.batch_size * cfg.model.context_length
        self.params = t.raw_model.num_params()
        t.model.train()

    def __call__(self) -> None:
        t = self.trainer
        loss, _, nonfinite = t.train_step(self.batches)
        t.state.step += 1
        self.monitor.record(loss, nonfinite)

    def close(self) -> None:
        self.batches.close()  # its prefetch thread, before interpreter shutdown tears modules down
        self.trainer.loader.close()


class NanoGPTStep:
    """The training step of nanoGPT's train.py on CPU, around its own model and optimizer."""

    def __init__(self, module, cfg, train_bin: Path, compile_: bool = False) -> None:
        m = cfg.model
        torch.manual_seed(1337)
        conf = module.GPTConfig(
            block_size=m.context_length,
            vocab_size=65,
            n_layer=m.n_layer,
            n_head=m.n_head,
            n_embd=m.d_model,
            dropout=0.0,
            bias=False,
        )
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            self.raw = module.GPT(conf)
            self.opt = self.raw.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
        self.model = torch.compile(self.raw) if compile_ else self.raw
        self.train_bin, self.batch, self.block = train_bin, cfg.train.batch_size, m.context_length
        self.tokens = self.batch * self.block
        self.params = sum(p.numel() for p in self.raw.parameters())
        self.it = 0
        self.x, self.y = self.get_batch()

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # As train.py does: re-open the memmap every call, stack random windows.
        data = np.memmap(self.train_bin, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - self.block, (self.batch,))
        x = torch.stack([torch.from_numpy(data[i : i + self.block].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + self.block].astype(np.int64)) for i in ix]
        )
        return x, y

    def lr(self) -> float:
        # train.py's warmup (100 iters) + cosine to 1e-4 over 2000 iters.
        it, warm, decay = self.it, 100, 2000
        if it < warm:
            return 1e-3 * (it + 1) / (warm + 1)
        ratio = min(1.0, (it - warm) / (decay - warm))
        return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    def __call__(self) -> None:
        lr = self.lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        _, loss = self.model(self.x, self.y)
        self.x, self.y = self.get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.it += 1

    def close(self) -> None:
        pass


def write_nanogpt_data(text: Path, workdir: Path) -> Path:
    """train.bin as nanoGPT's shakespeare_char/prepare.py lays it out: uint16 ids of the sorted
    character set, the first 90% of the file."""
    data = text.read_text()
    stoi = {c: i for i, c in enumerate(sorted(set(data)))}
    ids = np.array([stoi[c] for c in data[: int(len(data) * 0.9)]], dtype=np.uint16)
    path = workdir / "train.bin"
    ids.tofile(path)
    return path


def profile(name: str, step, steps: int = 3, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"\n-- profile: {name}, {steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


class Worker:
    """One variant in a process of its own, stepped on the parent's command (`_serve`)."""

    def __init__(self, ctx, spec: dict) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, spec), daemon=True)
        self.process.start()
        child.close()
        self.tokens, self.params, self.messages = self.conn.recv()

    def call(self, command: str, n: int = 0):
        self.conn.send((command, n))
        return self.conn.recv()

    def close(self) -> None:
        self.call("close")
        self.process.join(timeout=60)


def _serve(conn, spec: dict) -> None:
    """The worker's side: build the variant, then run commands until "close"."""
    torch.set_num_threads(spec["threads"])
    text = shared_data_dir() / "tinyshakespeare.txt"
    workdir = Path(spec["workdir"])
    cfg = tinylm_config(
        spec["shape"], text, workdir, compile_=spec["compile"], own_form=spec["own"]
    )
    # Both programs at the same count: tinylm's own choice (`auto`) would read the other
    # worker's threads, still spinning after its last command, as a busy core.
    cfg.train.threads = spec["threads"]
    if spec["kind"] == "nanoGPT":
        step = NanoGPTStep(load_nanogpt(Path(spec["nanogpt"])), cfg, workdir / "train.bin")
        messages: list[str] = []
    else:
        step = TinylmStep(cfg, workdir, f"{spec['shape']}-{spec['label']}")
        messages = step.trainer.messages
    conn.send((step.tokens, step.params, messages))
    while True:
        command, n = conn.recv()
        if command == "steps":  # wall and CPU seconds of n steps (CPU: compiling included)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                step()
            conn.send((time.perf_counter() - t0, time.process_time() - c0))
        elif command == "profile":
            profile(f"{spec['shape']} {spec['label']}", step)
            conn.send(None)
        else:
            step.close()
            conn.send(None)
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a karpathy/nanoGPT checkout")
    parser.add_argument("--shapes", default="nano4,nano6,tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compile", action="store_true", help="also tinylm with compile")
    parser.add_argument("--auto", action="store_true", help="also tinylm with its defaults")
    parser.add_argument(
        "--no-eager", action="store_true", help="leave out tinylm fp32 eager (with --auto)"
    )
    parser.add_argument(
        "--own", action="store_true", help="also tinylm's own architecture at the shape's size"
    )
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    load_nanogpt(args.nanogpt.resolve())  # a wrong path fails here, before any worker starts
    text = shared_data_dir() / "tinyshakespeare.txt"
    from tinylm.train.precision import cpu_signature

    print(
        f"torch {torch.__version__}, {cpu_signature()}, {args.threads} threads, each variant in "
        f"its own process, load average at start {os.getloadavg()[0]:.2f}"
    )
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-vs-nanogpt-") as tmp:
        workdir = Path(tmp)
        write_nanogpt_data(text, workdir)
        for shape in args.shapes.split(","):
            base = dict(
                shape=shape,
                workdir=str(workdir),
                threads=args.threads,
                nanogpt=str(args.nanogpt.resolve()),
                own=False,
            )
            specs = {"nanoGPT": dict(base, kind="nanoGPT", label="nanoGPT", compile=False)}
            if not args.no_eager:
                specs["tinylm"] = dict(base, kind="tinylm", label="eager", compile=False)
            if args.compile:
                specs["tinylm compiled"] = dict(base, kind="tinylm", label="compiled", compile=True)
            if args.auto:
                specs["tinylm auto"] = dict(base, kind="tinylm", label="auto", compile="auto")
            if args.own and SHAPES[shape]["gpt2_form"]:
                specs["tinylm own"] = dict(
                    base, kind="tinylm", label="own", compile="auto", own=True
                )
            variants: dict[str, Worker] = {}
            for name, spec in specs.items():  # one at a time: a build may probe the machine
                variants[name] = Worker(ctx, spec)
            if "tinylm auto" in variants:
                chosen = [
                    m
                    for m in variants["tinylm auto"].messages
                    if m.startswith(("precision:", "compile:", "heap:"))
                ]
                print(f"{shape}: tinylm auto: " + "; ".join(chosen))
            warm = {name: w.call("steps", args.warmup)[1] for name, w in variants.items()}
            cfg = tinylm_config(shape, text, workdir, compile_=False)
            m = cfg.model
            print(
                f"\n== {shape}: {m.n_layer}L/{m.n_head}H/{m.d_model}, context {m.context_length}, "
                f"batch {cfg.train.batch_size}; parameters tinylm "
                f"{variants[list(variants)[1]].params / 1e6:.3f}M, nanoGPT "
                f"{variants['nanoGPT'].params / 1e6:.3f}M"
            )
            if args.profile:
                for worker in variants.values():
                    worker.call("profile")
            names = list(variants)
            # Wall-clock rates, and rates per CPU-second of the variant's process: on a machine
            # shared with other work the CPU time is what the step itself cost (with one thread
            # it leaves out the time spent waiting for a core), so its ratios are far less noisy.
            rates: dict[str, list[float]] = {n: [] for n in names}
            cpu_rates: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    wall, cpu = variants[name].call("steps", args.steps)
                    tokens = variants[name].tokens * args.steps
                    rates[name].append(tokens / wall)
                    cpu_rates[name].append(tokens / cpu)
            print(
                f"{'variant':<16} {'warm-up CPU s':>13} {'tokens/s':>9} {'ms/step':>8} "
                f"{'tokens/CPU-s':>13} {'CPU ms/step':>12}"
            )
            for name in names:
                med, cmed = statistics.median(rates[name]), statistics.median(cpu_rates[name])
                tok = variants[name].tokens
                print(
                    f"{name:<16} {warm[name]:>13.1f} {med:>9.0f} {1e3 * tok / med:>8.1f} "
                    f"{cmed:>13.0f} {1e3 * tok / cmed:>12.1f}"
                )
            for name in names[1:]:
                for label, rr in (("wall", rates), ("CPU", cpu_rates)):
                    ratios = [a / b for a, b in zip(rr[name], rr["nanoGPT"], strict=True)]
                    print(
                        f"ratio {name} / nanoGPT ({label}): median "
                        f"{statistics.median(ratios):.2f} "
                        f"(per round: {', '.join(f'{x:.2f}' for x in ratios)})"
                    )
            for worker in variants.values():
                worker.close()
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
