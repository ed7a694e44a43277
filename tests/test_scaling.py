"""`tinylm scaling`: the fits recover a known law from synthetic runs (exponents included), the
compute-optimal size follows the closed form, and the command prints, predicts and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from tinylm.config import load_config
from tinylm.estimate import model_counts
from tinylm.scaling.fit import fit_c, fit_nd

LAW = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}  # Chinchilla's fit


def law(n, d):
    return LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]


def test_fit_nd_recovers_the_exponents():
    rng = np.random.default_rng(0)
    n = np.repeat([1e5, 3e5, 1e6, 3e6], 4)
    d = np.tile([1e7, 3e7, 1e8, 3e8], 4)
    exact = fit_nd(n, d, law(n, d))
    for key, value in LAW.items():
        assert exact.params[key] == pytest.approx(value, rel=1e-3), key
    assert exact.rms_log_error < 1e-6
    noisy = fit_nd(n, d, law(n, d) * np.exp(rng.normal(0, 0.002, len(n))))  # 0.2% noise
    assert noisy.params["alpha"] == pytest.approx(0.34, abs=0.03)
    assert noisy.params["beta"] == pytest.approx(0.28, abs=0.03)
    assert 0.0005 < noisy.rms_log_error < 0.004
    n_opt, d_opt = exact.optimum(1e21)
    a, b = LAW["alpha"], LAW["beta"]
    g = (a * LAW["A"] / (b * LAW["B"])) ** (1 / (a + b))
    assert n_opt == pytest.approx(g * (1e21 / 6) ** (b / (a + b)), rel=1e-3)
    assert 6 * n_opt * d_opt == pytest.approx(1e21)
    # the optimum is a minimum of L along the budget
    for factor in (0.7, 1.4):
        assert law(n_opt * factor, d_opt / factor) > law(n_opt, d_opt)


def test_fit_c_recovers_the_exponent():
    c = np.geomspace(1e12, 1e18, 8)
    fit = fit_c(c, 2.0 + 50.0 / c**0.12)
    assert fit.params["gamma"] == pytest.approx(0.12, rel=1e-3)
    assert fit.params["E"] == pytest.approx(2.0, rel=1e-3)
    assert fit.optimum(1e20) is None
    with pytest.raises(ValueError, match="at least 3"):
        fit_c(c[:2], np.ones(2))


def write_run(root: Path, name: str, d_model: int, n_layer: int, tokens: int) -> int:
    cfg = load_config("tiny", [f"model.d_model={d_model}", f"model.n_layer={n_layer}",
                               "model.n_head=2", "model.vocab_size=96"])  # fmt: skip
    n = model_counts(cfg.model)[1]
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    lines = [{"kind": "event", "event": "start", "step": 0, "max_steps": 10},
             {"kind": "train", "step": 10, "tokens": tokens, "loss": 3.0,
              "tokens_per_second": 1000.0},
             {"kind": "eval", "step": 10, "val/loss": law(n, tokens)},
             {"kind": "event", "event": "done", "step": 10}]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    return n


def test_scaling_command_on_synthetic_runs(tmp_path, capsys):
    sizes = [(32, 1), (64, 2), (128, 2), (128, 4)]
    for i, (d_model, n_layer) in enumerate(sizes):
        for j, tokens in enumerate((10**6, 10**7, 10**8)):
            write_run(tmp_path, f"r{i}{j}", d_model, n_layer, tokens)
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "metrics.jsonl").write_text(
        json.dumps({"kind": "event", "event": "pruned", "step": 3}) + "\n"
    )
    assert run_cli("scaling", tmp_path, "--budget-flops", "1e18") == 0
    out = capsys.readouterr().out
    fit_line = next(line for line in out.splitlines() if line.startswith("fit: L(N, D)"))
    assert "/ N^0.3400" in fit_line and "/ D^0.2800" in fit_line and "12 runs" in fit_line
    assert "compute-optimal at C = 1.000e+18" in out and "left out pruned" in out
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    assert run_cli("scaling", tmp_path, "--law", "c", "--budget-hours", "2") == 0
    out = capsys.readouterr().out
    assert "fit: L(C)" in out and "the runs' median measured speed" in out
    assert run_cli("scaling", tmp_path / "r00") == 2  # one run is not enough to fit
    assert math.isfinite(law(1e6, 1e9))
