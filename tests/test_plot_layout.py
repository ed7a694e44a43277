"""`tinylm plot`'s figure layout: no empty panels, and the legend outside every panel's data
(written runs' logs, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinylm.runs import make_figure


def _run(path: Path, tokenizer: str, records: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"data:\n  train: corpus.txt\n  tokenizer: {tokenizer}\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _train(step: int, **extra) -> dict:
    return {"kind": "train", "step": step, "tokens": 256 * step, "loss": 4.0 / step, **extra}


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize(
    "full, titles",
    [
        (
            True,
            {
                "loss vs steps",
                "loss vs tokens",
                "validation bits per byte",
                "learning rate",
                "throughput",
            },
        ),
        (False, {"loss vs steps", "loss vs tokens"}),
    ],
    ids=["all-panels", "loss-only"],
)
def test_no_empty_panels_and_legend_outside(tmp_path, full, titles):
    extra = {"lr": 1e-3, "tokens_per_second": 900.0} if full else {}
    evals = [{"kind": "eval", "step": 4, "val/loss": 1.2, "val/bits_per_byte": 1.7}] if full else []
    runs = [
        _run(tmp_path / f"run{i}", tok, [_train(s, **extra) for s in (1, 2, 3, 4)] + evals)
        for i, tok in enumerate(["char", "gpt2", "char", "bpe:512", "char"])
    ]
    fig = make_figure(runs)
    fig.canvas.draw()
    got = {ax.get_title().split(" (")[0] for ax in fig.axes}
    assert got == titles  # a panel without data is not drawn
    assert all(ax.lines for ax in fig.axes)
    assert all(ax.get_legend() is None for ax in fig.axes)  # no legend over the curves
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:5] == [
        f"run{i} (corpus.txt, {t})"
        for i, t in enumerate(["char", "gpt2", "char", "bpe:512", "char"])
    ]
    assert ("val" in labels) == full
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not _overlaps(box, ax.get_window_extent()), ax.get_title()
    figure_box = fig.bbox
    assert box.y0 >= figure_box.y0 and box.x0 >= figure_box.x0 and box.x1 <= figure_box.x1
