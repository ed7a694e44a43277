"""Helpers shared by the end-to-end tests: small-model overrides and CLI/metrics shortcuts."""

from __future__ import annotations

import json
from pathlib import Path

from tinylm.cli import main

# A model small enough that a step takes milliseconds on one core.
SMALL = [
    "model.context_length=32",
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "train.batch_size=8",
    "eval.max_batches=2",
    "eval.sample_tokens=16",
    "log.tensorboard=false",
    "log.progress=false",
    "data.num_workers=1",
]


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


def read_metrics(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
