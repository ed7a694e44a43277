"""The XLA device's RNG in checkpoints: dropout masks on XLA come from the device's own generator
(not torch's host one), so a resumed run must restore it to repeat the uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from helpers import SMALL, read_metrics, run_cli

from tinylm.train import checkpoint

pytest.importorskip("torch_xla", reason="torch_xla is not installed: run in .venv-xla (.ci/run)")

STEPS = 20


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run, "train")}


def _resume_from_step_10(src, dst, forget_xla_rng: bool = False) -> None:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / f"step_{STEPS:08d}")
    if forget_xla_rng:  # a checkpoint as this code wrote it before the XLA RNG was saved
        ckpt = dst / "checkpoints" / "step_00000010"
        path = ckpt / checkpoint.STATE_FILE
        state = torch.load(path, weights_only=True)
        for rank_state in state["rng"]:
            del rank_state["xla"]
        torch.save(state, path)
        meta = json.loads((ckpt / checkpoint.META_FILE).read_text())
        data = path.read_bytes()
        meta["files"][path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (ckpt / checkpoint.META_FILE).write_text(json.dumps(meta))
    assert run_cli("train", "--resume", dst) == 0


def test_dropout_on_xla_resumes_with_the_device_rng(tmp_path, corpus):
    """Dropout 0.1 on XLA: a resume from step 10 repeats steps 11-20 exactly; the same resume
    without the saved device RNG state draws other masks (so the state is what made it exact)."""
    assert run_cli(
        "train", "tiny", "run_name=full", "train.device=xla", "model.dropout=0.1",
        f"data.train={corpus}", f"out_dir={tmp_path}", f"train.max_steps={STEPS}",
        "optim.name=adamw", "log.interval=1", "eval.interval=10", "checkpoint.interval=10",
        "checkpoint.keep_last=5", "eval.samples=0", "train.compile=false", *SMALL,
    ) == 0  # fmt: skip
    full = _losses(tmp_path / "full")
    state = torch.load(
        tmp_path / "full" / "checkpoints" / "step_00000010" / checkpoint.STATE_FILE,
        weights_only=True,
    )
    assert isinstance(state["rng"][0]["xla"], int)

    _resume_from_step_10(tmp_path / "full", tmp_path / "resumed")
    assert _losses(tmp_path / "resumed") == full

    _resume_from_step_10(tmp_path / "full", tmp_path / "reseeded", forget_xla_rng=True)
    reseeded = _losses(tmp_path / "reseeded")
    assert all(reseeded[s] == full[s] for s in range(1, 11))
    assert max(abs(reseeded[s] - full[s]) for s in range(11, STEPS + 1)) > 1e-4
