"""Speed of the lm-evaluation-harness adapter: batched vs one-at-a-time log-likelihood scoring,
and generate_until (KV cache) per generated token. Never run by the tests; figures go in
notes/issue-8-harness.md.

    .venv/bin/python bench/harness_scoring.py [--preset tiny] [--requests 256] [--repeats 5]

A randomly initialised model of the preset with a character tokenizer scores multiple-choice
style requests (a ~100-300 character context, a 10-60 character continuation). The A/B pairs
alternate within one process, `--repeats` times, and the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from lm_eval.api.instance import Instance

from tinylm.config import load_config
from tinylm.eval.harness import TinyLMHarness
from tinylm.model import GPT
from tinylm.tokenizer import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz      .,"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = random.Random(0)
    tok = CharTokenizer.fit([ALPHABET])
    cfg = load_config(args.preset, [f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.init_weights()
    model.eval()

    def text(lo: int, hi: int) -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi)))

    requests = [
        Instance("loglikelihood", {}, (text(100, 300), " " + text(10, 60)), i)
        for i in range(args.requests)
    ]
    batched = TinyLMHarness(model, tok, batch_size=args.batch_size)
    single = TinyLMHarness(model, tok, batch_size=1)
    times: dict[str, list[float]] = {"batched": [], "single": []}
    for _ in range(args.repeats):
        for name, lm in (("batched", batched), ("single", single)):
            t0 = time.perf_counter()
            lm.loglikelihood(requests, disable_tqdm=True)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"preset {args.preset} ({model.num_params() / 1e6:.2f}M params, context "
        f"{cfg.model.context_length}), {args.requests} loglikelihood requests, "
        f"torch threads {torch.get_num_threads()}"
    )
    for name, values in times.items():
        print(
            f"  {name:8s} " + " ".join(f"{v:.2f}" for v in values) + f"  median {med[name]:.2f} s"
        )
    print(f"  one-at-a-time / batch {args.batch_size}: {med['single'] / med['batched']:.2f}x")

    gen = [
        Instance("generate_until", {}, (text(50, 50), {"until": ["\n"], "max_gen_toks": 64}), i)
        for i in range(args.batch_size)
    ]
    t0 = time.perf_counter()
    batched.generate_until(gen, disable_tqdm=True)
    dt = time.perf_counter() - t0
    print(
        f"  generate_until: {args.batch_size} prompts x 64 tokens (one batch, KV cache) "
        f"{dt:.2f} s = {dt / (64 * args.batch_size) * 1e3:.2f} ms per token"
    )


if __name__ == "__main__":
    main()
