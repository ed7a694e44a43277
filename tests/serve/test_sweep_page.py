"""The sweep page (`tinylm serve SWEEP_DIR`, /sweep) in headless Chromium: each hyper-parameter
drawn against the trials' best bits/byte (point positions follow the values), the trial table
best first with statuses; /api/sweep refuses a directory that is not a sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
from conftest import ThreadServer
from test_serve_browser import ARTIFACTS, _browser, _wait

TRIALS = [  # as tinylm/sweep/report.py writes them: sorted best first
    {"trial": 2, "name": "t002-lr0.003-d_model64", "status": "finished", "steps": 40,
     "params": {"optim.lr": "0.003", "model.d_model": "64"}, "best_val_loss": 1.2,
     "best_bits_per_byte": 1.2 / math.log(2)},
    {"trial": 0, "name": "t000-lr0.001-d_model32", "status": "finished", "steps": 40,
     "params": {"optim.lr": "0.001", "model.d_model": "32"}, "best_val_loss": 1.5,
     "best_bits_per_byte": 1.5 / math.log(2)},
    {"trial": 1, "name": "t001-lr1e-05-d_model64", "status": "pruned", "steps": 10,
     "params": {"optim.lr": "1e-05", "model.d_model": "64"}, "best_val_loss": 3.0,
     "best_bits_per_byte": 3.0 / math.log(2)},
    {"trial": 3, "name": "t003-lr0.0005-d_model32", "status": "running", "steps": 0,
     "params": {"optim.lr": "0.0005", "model.d_model": "32"}, "best_val_loss": None,
     "best_bits_per_byte": None},
]  # fmt: skip


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep") / "sw"
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps({"format": "tinylm-sweep", "version": 2}))
    axes = [{"key": "optim.lr", "kind": "float", "log": True},
            {"key": "model.d_model", "kind": "choice", "log": False}]  # fmt: skip
    summary = {"sweep": "sw", "axes": axes, "sampler": "tpe", "pruner": "median", "trials": TRIALS}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def test_api_sweep_refuses_a_runs_directory(tmp_path):
    server = ThreadServer(tmp_path)
    try:
        answer = httpx.get(f"{server.url}/api/sweep", timeout=30)
    finally:
        server.stop()
    assert answer.status_code == 404 and "not a sweep directory" in answer.text


def test_sweep_page_draws_parameters_against_bits_per_byte(sweep_dir):
    server = ThreadServer(sweep_dir)
    browser = _browser()
    try:
        browser.get(f"{server.url}/sweep?poll=300")
        rows = _wait(
            lambda: browser.execute_script(
                "return [...document.querySelectorAll('#trials-table tbody tr')]"
                ".map((tr) => [...tr.cells].map((td) => td.textContent))"
            ),
            60,
            "the trial table",
        )
        assert [r[1] for r in rows] == ["2", "0", "1", "3"]  # best bits/byte first
        assert rows[0][3:5] == ["0.003", "64"] and rows[0][5] == "finished"
        assert rows[0][-1] == f"{1.2 / math.log(2):.4f}" and rows[3][-2:] == ["-", "-"]
        assert rows[2][5] == "pruned"
        lr = {t: (x, y) for t, x, y in browser.execute_script(
            "return window.tinylmSweep.points('optim.lr')")}  # fmt: skip
        assert set(lr) == {0, 1, 2}  # the running trial has no score yet: not drawn
        assert lr[1][0] < lr[0][0] < lr[2][0]  # x follows lr (1e-5 < 1e-3 < 3e-3)
        assert lr[2][1] > lr[0][1] > lr[1][1]  # lower bits/byte drawn lower (SVG y grows down)
        # log scale: 1e-5 -> 1e-3 is 2 decades, 1e-3 -> 3e-3 is 0.48 of one
        assert (lr[0][0] - lr[1][0]) / (lr[2][0] - lr[0][0]) == pytest.approx(2 / math.log10(3))
        d_model = {t: x for t, x, _ in browser.execute_script(
            "return window.tinylmSweep.points('model.d_model')")}  # fmt: skip
        assert d_model[0] < d_model[2] == d_model[1]  # 32 left of 64
        best = browser.execute_script(  # read in one go: the page redraws on every poll
            "return [...document.querySelectorAll('svg circle.best')].map((c) => c.dataset.trial)"
        )
        assert set(best) == {"2"}
        assert "4 trials" in browser.find_element("id", "sweep-info").text
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "serve-sweep.png"))
    finally:
        browser.quit()
        server.stop()
