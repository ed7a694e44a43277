"""`data.phases` curricula: the phase of each step, the loader drawing only the phase's sources,
batches a pure function of the step across a phase switch, config refusals, and end to end: the
phase in the train records and the progress line, per-source validation losses, and a resume in
the middle of a phase that continues bit for bit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import SMALL, read_metrics, run_cli

from tinylm.config import ConfigError, load_config
from tinylm.data.curriculum import Curriculum
from tinylm.data.loader import BatchLoader


def test_phases_by_step_and_the_loader_follows_them():
    cur = Curriculum([(0.25, [1, 0]), (1.0, [1, 3])], total_steps=10, n_sources=2)
    assert cur.ends() == [2, 10]  # round(0.25 * 10) = 2
    assert [cur.index(s) for s in (0, 1, 2, 9, 50)] == [0, 0, 1, 1, 1]
    assert cur.probs(5).tolist() == [0.25, 0.75] and cur.label(0) == "phase 1/2"
    a = np.zeros(5000, dtype=np.int64)  # source 0 is all zeros, source 1 all ones
    b = np.ones(5000, dtype=np.int64)
    make = lambda: BatchLoader([("a", a, 1.0), ("b", b, 1.0)], batch_size=64, seq_len=8,  # noqa: E731
                               seed=3, prefetch=0, curriculum=cur)  # fmt: skip
    loader = make()
    assert int(loader.host_batch(1, 0)[0].sum()) == 0  # phase 1: source a only
    share = float(np.mean([loader.host_batch(s, 0)[0].float().mean() for s in range(2, 10)]))
    assert 0.65 < share < 0.85  # phase 2: three quarters from b
    stream = loader.iterate(0)
    straight = [next(stream) for _ in range(6)][3:]
    resumed = make().iterate(3)  # a new loader started mid-run, as a resume does
    for x, y in straight:
        x2, y2 = next(resumed)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    loader.close()
    with pytest.raises(Exception, match="sampling=random"):
        BatchLoader([("a", a, 1.0), ("b", b, 1.0)], batch_size=4, seq_len=8, prefetch=0,
                    sampling="sequential", curriculum=cur)  # fmt: skip


MIX = "data.mix=[{path: A, name: a}, {path: B, name: b}]"


@pytest.mark.parametrize(
    ("phases", "extra", "match"),
    [
        ("[{until: 1, weights: [1, 0, 2]}]", [], "3 weights for 2"),
        ("[{until: 0.5, weights: [1, 0]}, {until: 0.4, weights: [1, 1]}]", [], "must be after"),
        ("[{until: 0.5, weights: [1, 0]}]", [], "must end at 1"),
        ("[{until: 1, weights: [0, 0]}]", [], "at least one positive"),
        ("[{until: 1, weights: [1, -1]}]", [], "at least one positive"),
        ("[{until: 1, weights: [1, 1]}]", ["data.sampling=sequential"], "sampling=random"),
        ("[{until: 0, weights: [1, 1]}]", [], "out of range"),
    ],
)
def test_phases_config_refusals(phases, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [MIX, f"data.phases={phases}", *extra])
    with pytest.raises(ConfigError, match=r"at least two in data\.mix"):
        load_config("tiny", ["data.phases=[{until: 1, weights: [1]}]"])


def test_curriculum_run_switches_phase_and_resumes_mid_phase_exactly(tmp_path, corpus, capsys):
    other = tmp_path / "other.txt"
    other.write_text("".join(f"zebra {i} quietly ate {i % 5} plums.\n" for i in range(800)))
    common = [
        f"data.mix=[{{path: {corpus}, name: play}}, {{path: {other}, name: zoo}}]",
        "data.phases=[{until: 0.5, weights: [1, 0]}, {until: 1, weights: [0.2, 0.8]}]",
        f"out_dir={tmp_path}", "log.interval=1", "eval.interval=4", "eval.samples=0",
        "checkpoint.interval=5", "optim.warmup_steps=2", "train.max_steps=8", *SMALL,
    ]  # fmt: skip
    assert run_cli("train", "tiny", "run_name=full", *common) == 0
    out = capsys.readouterr().out
    assert "| phase 1/2" in out and "| phase 2/2" in out
    full = read_metrics(tmp_path / "full", "train")
    assert [r["phase"] for r in full] == [1, 1, 1, 1, 2, 2, 2, 2]
    evals = read_metrics(tmp_path / "full", "eval")
    assert {"val_play/loss", "val_zoo/loss", "val/loss"} <= set(evals[-1])

    assert run_cli("train", "tiny", "run_name=split", *common) == 0
    split = tmp_path / "split"
    # back to the checkpoint at step 5, in the middle of phase 2 (steps 4..8)
    shutil.rmtree(split / "checkpoints" / "step_00000008")
    (split / "checkpoints" / "latest").write_text("step_00000005")
    assert run_cli("train", "--resume", split) == 0
    resumed = read_metrics(split, "train")
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in full]
    starts = [e for e in read_metrics(split, "event") if e.get("event") == "start"]
    assert starts[-1]["step"] == 5
