"""`train.device=xla` on XLA's CPU device: the same losses as a CPU run, checkpoints that move
between XLA and CPU both ways, and one compiled graph per step kind (no recompilation as the
learning rate changes). Ctrl+C: test_xla_replicas.py (two replicas, the harder case). See
tests/xla/conftest.py for how these run."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import SMALL, read_metrics, run_cli

pytest.importorskip("torch_xla", reason="torch_xla is not installed: run in .venv-xla (.ci/run)")

STEPS = 20
TOLERANCE = 1e-4


def _common(tmp_path, corpus) -> list[str]:
    return [
        f"data.train={corpus}", f"out_dir={tmp_path}", f"train.max_steps={STEPS}", "optim.name=adamw",
        "log.interval=1", "eval.interval=10", "checkpoint.interval=10", "checkpoint.keep_last=5",
        "eval.samples=1", "train.compile=false", *SMALL,
    ]  # fmt: skip


def _compiles(met) -> int:
    data = met.metric_data("CompileTime")  # None before the first compile
    return data[0] if data else 0


def _losses(run, kind="train", key="loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run, kind)}


def _close(a: dict[int, float], b: dict[int, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= TOLERANCE for k in a)


def _resume_from_step_10(src, dst, device: str) -> None:
    """Continue `src`'s run from its step-10 checkpoint in `dst`, on `device`."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_00000020")
    assert run_cli("train", "--resume", dst, f"train.device={device}") == 0


def test_xla_matches_cpu_and_checkpoints_cross_over(tmp_path, corpus, capsys):
    """20 steps on XLA:CPU equal the CPU eager run (losses, grad norms, val losses within 1e-4);
    a checkpoint written on XLA resumes on CPU and one written on CPU resumes on XLA, both
    continuing to the same losses."""
    import torch_xla.debug.metrics as met

    common = _common(tmp_path, corpus)
    assert run_cli("train", "tiny", "run_name=cpu", "train.device=cpu", *common) == 0
    before = _compiles(met)  # this process's count: other tests compiled graphs before
    assert run_cli("train", "tiny", "run_name=xla", "train.device=xla", *common) == 0
    # The learning rate changes every step (warm-up): a graph that baked it in would compile
    # every step (20+). Measured: 9 graphs: the first step (optimizer state created), the steady
    # step, the first after an evaluation, the evaluation, and the monitor's small reads.
    compiles = _compiles(met) - before
    assert compiles <= 12, met.short_metrics_report()
    out = capsys.readouterr().out
    assert "device: xla (CPU" in out and "--- sample 0 at step 20 ---" in out
    cpu, xla = tmp_path / "cpu", tmp_path / "xla"
    assert len(_losses(cpu)) == STEPS
    assert _close(_losses(xla), _losses(cpu)), (_losses(xla), _losses(cpu))
    assert _close(_losses(xla, key="grad_norm"), _losses(cpu, key="grad_norm"))
    assert _close(_losses(xla, "eval", "val/loss"), _losses(cpu, "eval", "val/loss"))

    _resume_from_step_10(xla, tmp_path / "xla_then_cpu", "cpu")
    _resume_from_step_10(cpu, tmp_path / "cpu_then_xla", "xla")
    for run in ("xla_then_cpu", "cpu_then_xla"):
        assert _close(_losses(tmp_path / run), _losses(cpu)), run
    with open(tmp_path / "xla" / "checkpoints" / "step_00000020" / "meta.json") as f:
        assert json.load(f)["loop"]["step"] == STEPS
