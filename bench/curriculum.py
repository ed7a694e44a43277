"""Curriculum vs plain mixture at equal steps (issue 20's worked example, docs/curriculum.md).

Trains the same small model twice on Shakespeare + synthetic stories, at equal steps:
  plain       10/90 Shakespeare/stories throughout
  curriculum  Shakespeare alone for the first 20% of steps, then 10/90
and plots each run's per-source validation losses against steps (notes/figures/).

    .venv/bin/python bench/curriculum.py --steps 600 --out /tmp/curriculum
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MIX = "data.mix=[{path: shakespeare, name: shakespeare}, {path: synthetic-stories, name: stories}]"
ARMS = {
    "plain": "data.phases=[{until: 1, weights: [0.1, 0.9]}]",
    "curriculum": "data.phases=[{until: 0.2, weights: [1, 0]}, {until: 1, weights: [0.1, 0.9]}]",
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--out", default="/tmp/curriculum")
    p.add_argument("--figure", default="notes/figures/issue-20-curriculum.png")
    args = p.parse_args()
    small = ["model.n_layer=2", "model.d_model=96", "model.n_head=4", "model.d_ff=256",
             "model.context_length=64", f"train.max_steps={args.steps}", f"eval.interval={args.eval_interval}",
             "eval.max_batches=10", "eval.samples=0", "log.interval=10", "optim.warmup_steps=30",
             "checkpoint.interval=0", "log.tensorboard=false", "log.progress=false"]  # fmt: skip
    for name, phases in ARMS.items():
        if (Path(args.out) / name / "metrics.jsonl").is_file():
            continue
        cmd = [sys.executable, "-m", "tinylm.cli", "train", "tiny", MIX, phases, *small,
               f"out_dir={args.out}", f"run_name={name}"]  # fmt: skip
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    plot(Path(args.out), Path(args.figure))


def plot(root: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for name in ARMS:
        lines = (root / name / "metrics.jsonl").read_text().splitlines()
        evals = [r for r in map(json.loads, lines) if r.get("kind") == "eval"]
        for ax, source in zip(axes, ("shakespeare", "stories"), strict=True):
            key = f"val_{source}/loss"
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], label=name)
            print(f"{name:>17} {source:>11}: final {evals[-1][key]:.4f}, "
                  f"best {min(r[key] for r in evals):.4f}")  # fmt: skip
    for ax, source in zip(axes, ("Shakespeare", "stories"), strict=True):
        ax.set_title(f"validation loss on {source} (nats/char)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
