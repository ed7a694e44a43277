"""Non-finite weights (issue 21, item 1): a run whose weights go NaN after a finite-loss step
stops as diverged, naming its last finite checkpoint, and never saves, evaluates or samples the
NaN weights; every consumer of a checkpoint refuses NaN weights in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SMALL, forge_nan, read_metrics, run_cli, train_two_steps
from safetensors.torch import save_file

from tinylm.config import load_config
from tinylm.finite import all_finite, check_finite, nonfinite_names
from tinylm.train import checkpoint, optim
from tinylm.train.checkpoint import CheckpointError
from tinylm.train.trainer import Trainer


def _poison_after(step: int, monkeypatch) -> None:
    """The optimizer's update of `step` (whose loss is finite) leaves a NaN in one weight, as an
    overflowing update does in a diverging run."""
    real = optim.build_optimizer

    def build(model, *args, **kwargs):
        opt = real(model, *args, **kwargs)
        calls = {"n": 0}

        update = opt.step

        def step_then_poison(*args, **kwargs):
            result = update(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == step:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")
            return result

        opt.step = step_then_poison
        return opt

    monkeypatch.setattr(optim, "build_optimizer", build)


@pytest.mark.parametrize(
    "settings, stop_step",
    [
        # found at the log interval (step 8), before the checkpoint of step 9
        (["log.interval=4", "checkpoint.interval=3", "eval.interval=5"], 8),
        # found before the checkpoint and the evaluation with samples of step 8 (no log line yet)
        (["log.interval=10", "checkpoint.interval=4", "eval.interval=8"], 8),
    ],
)
def test_nan_weights_stop_the_run_as_diverged(tmp_path, corpus, monkeypatch, settings, stop_step):
    _poison_after(7, monkeypatch)
    cfg = load_config(
        "tiny",
        [
            *SMALL, f"data.train={corpus}", f"out_dir={tmp_path}", "run_name=r",
            "train.max_steps=20", "eval.samples=1", *settings,
        ],
    )  # fmt: skip
    result = Trainer(cfg, tmp_path / "r").fit()
    run = tmp_path / "r"
    assert result.step == stop_step
    assert result.stop_reason.startswith("diverged: the weights became NaN or infinite")
    saved = [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")]
    assert saved and all(int(name.split("_")[1]) <= 7 for name in saved)  # none of NaN weights
    last = saved[-1]
    for name in saved:  # every checkpoint on disk loads (finite)
        checkpoint.load_checkpoint(run / "checkpoints" / name)
    stop = next(e for e in read_metrics(run, "event") if e.get("event") == "stopped")
    assert (
        "diverged" in stop["reason"]
        and f"Last good checkpoint: {run}/checkpoints/{last}" in (stop["message"])
    )
    assert not [e for e in read_metrics(run, "event") if e.get("event") in ("failed", "done")]
    assert all(r["step"] < 8 for r in read_metrics(run, "eval") + read_metrics(run, "sample"))


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory, corpus) -> Path:
    """A run whose only checkpoint holds a NaN weight (a consistent forgery: hashes match)."""
    run = train_two_steps(tmp_path_factory.mktemp("nan-run"), corpus)
    forge_nan(checkpoint.find_latest(run / "checkpoints"))
    return run


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "{run}", "--max-new-tokens", "4"],
        ["generate", "{run}", "--max-new-tokens", "4", "--temperature", "0"],
        ["eval", "{run}"],
        ["export", "{run}", "--out", "{tmp}/hf"],
        ["train", "--resume", "{run}", "train.max_steps=3"],
    ],
    ids=["generate", "generate-greedy", "eval", "export", "resume"],
)
def test_every_consumer_refuses_nan_weights_in_one_line(nan_run, tmp_path, argv, capsys):
    argv = [a.replace("{run}", str(nan_run)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert run_cli(*argv) == 2
    out, err = capsys.readouterr()
    assert "NaN or infinite" in err and "step_00000002" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out
    assert out.strip() == ""  # nothing generated, nothing exported
    assert not (tmp_path / "hf").exists()


def test_the_loader_serve_uses_refuses_nan_weights(nan_run):
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        checkpoint.load_model(nan_run)


def test_init_from_refuses_nan_hf_weights(tmp_path):
    from tinylm.train.init_from import read_hf_weights

    save_file({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        read_hf_weights(tmp_path)


def test_the_check_itself():
    ok = {"a": torch.ones(3), "ids": torch.arange(3)}
    bad = {"a": torch.ones(3), "b": torch.tensor([0.0, float("-inf")]), "c": torch.full((2,), float("nan"))}  # fmt: skip
    assert bool(all_finite(ok.values())) and not bool(all_finite(bad.values()))
    assert nonfinite_names(bad) == ["b", "c"]
    check_finite(ok, "x", ValueError)
    with pytest.raises(ValueError, match=r"^src: the weights hold NaN .*\(b, c\)"):
        check_finite(bad, "src", ValueError)
