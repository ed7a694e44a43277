"""Sinks: TensorBoard event files read back, wandb offline end to end, metrics.jsonl truncation."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time

import pytest
from helpers import SMALL, read_metrics, run_cli

from tinylm.train.sinks import truncate_metrics


def tiny_run(tmp_path, corpus, *extra: str) -> None:
    args = [f"data.train={corpus}", f"out_dir={tmp_path}", "run_name=r", *SMALL]
    assert run_cli("train", "tiny", *args, "train.max_steps=6", "log.interval=2", *extra) == 0


def test_tensorboard_events_hold_losses_and_samples(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_run(tmp_path, corpus, "log.tensorboard=true", "eval.interval=3")
    acc = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/tokens_per_second", "val/loss", "val/perplexity"):
        assert tag in scalars, tag
    jsonl_train = read_metrics(tmp_path / "r", "train")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in jsonl_train
    ]
    assert [e.step for e in acc.Scalars("val/loss")] == [3, 6]
    text_events = acc.Tensors("sample/0/text_summary")
    assert [e.step for e in text_events] == [3, 6]
    sample = read_metrics(tmp_path / "r", "sample")[-1]["text"]
    stored = text_events[-1].tensor_proto.string_val[0].decode()
    assert sample in stored


def test_tensorboard_history_after_a_resume_has_no_duplicates(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinylm.train import checkpoint

    tiny_run(tmp_path, corpus, "log.tensorboard=true", "eval.interval=0", "checkpoint.interval=3")
    # As if the run had died after logging step 6 but before checkpointing it.
    run = tmp_path / "r"
    for path in checkpoint.list_checkpoints(run / "checkpoints")[1:]:
        shutil.rmtree(path)
    assert run_cli("train", "--resume", run) == 0
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]  # 4 and 6 purged, re-logged
    assert [r["step"] for r in read_metrics(run, "train")] == [2, 4, 6]


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None,
    reason="wandb not installed (pip install tinylm[wandb])",
)
def test_wandb_offline_run_is_written(tmp_path, corpus, monkeypatch):
    # Keep wandb's own settings and caches inside the test directory; offline: no network.
    for var, sub in (
        ("WANDB_CONFIG_DIR", "cfg"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
    ):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny_run(tmp_path, corpus, "log.wandb=true", "log.wandb_mode=offline", "eval.interval=3")
    run = tmp_path / "r"
    run_id = (run / "wandb_id").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    logs = list(offline[0].glob("run-*.wandb"))
    assert len(logs) == 1, "no wandb event log in the offline run"
    # Offline runs keep their history in this protobuf log (no summary file until a sync);
    # the metric keys are stored as plain strings in it.
    # wandb's service process may still be flushing it when finish() has returned.
    deadline = time.monotonic() + 20
    while b"sample/0" not in (data := logs[0].read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for key in (b"train/loss", b"train/lr", b"val/loss", b"val/bits_per_byte", b"sample/0"):
        assert key in data, key


def test_truncate_drops_the_lost_future_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"kind": "event", "event": "start", "step": 0},
        {"kind": "train", "step": 5, "loss": 1.0},
        {"kind": "eval", "step": 5, "val/loss": 1.1},
        {"kind": "train", "step": 10, "loss": 0.9},  # after the checkpoint at 5: lost
        {"kind": "event", "event": "spike", "step": 10},  # would be logged again on resume
        {"kind": "event", "message": "no step"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "st')
    truncate_metrics(path, after_step=5)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [lines[0], lines[1], lines[2], lines[5]]
