"""The page at `/` in a real headless Chromium (Debian's chromium + chromedriver, via selenium):
the dashboard lists the runs and draws their curves (checked point by point against
metrics.jsonl), a run training during the test gets new points without a reload, the
playground streams a completion and stops one, the chart's unit switches to bits/byte when
a run with another tokenizer appears while run colours stay, and a curriculum run (`data.phases`)
shows its phase on its row and its phase boundary on the chart. Screenshots go to
tests/artifacts/."""

from __future__ import annotations

import json
import os
import shutil
import shutil as _shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import SERVE_MODEL, ThreadServer
from helpers import SMALL, read_metrics, run_cli

from tinylm.serve.engine import SLOW_ENV
from tinylm.serve.phases import run_phases

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
POLL_MS = 400


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(
            "chromium and chromedriver are needed: `bash scripts/setup.sh --dev` installs them "
            "(apt-get install chromium chromium-driver)"
        )
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1300,1500")
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def live_root(serve_root, corpus, tmp_path_factory):
    """The finished runs (copied: a symlink to a run outside the served directory is not
    served) and a run `live` that trains while the tests look at it."""
    root = tmp_path_factory.mktemp("browser") / "runs"
    root.mkdir()
    for name in ("alpha", "beta"):
        _shutil.copytree(serve_root / name, root / name)
    # A curriculum run: `play` alone for steps 1-4, then 20/80 play/zoo for steps 5-8 (~1 s).
    zoo = root.parent / "zoo.txt"
    zoo.write_text("".join(f"zebra {i} quietly ate {i % 5} plums.\n" for i in range(800)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLM_CACHE", str(serve_root.parent / "cache"))
        assert run_cli(
            "train", "tiny", "run_name=phased", f"out_dir={root}", *SMALL,
            f"data.mix=[{{path: {corpus}, name: play}}, {{path: {zoo}, name: zoo}}]",
            "data.phases=[{until: 0.5, weights: [1, 0]}, {until: 1, weights: [0.2, 0.8]}]",
            "train.max_steps=8", "log.interval=1", "eval.interval=4", "eval.samples=0",
            "checkpoint.interval=8", "optim.warmup_steps=2",
        ) == 0  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TINYLM_CACHE": str(serve_root.parent / "cache")}
    cmd = [sys.executable, "-m", "tinylm.cli", "train", "tiny", "run_name=live"]
    args = [f"data.train={corpus}", f"out_dir={root}", *SERVE_MODEL, "train.max_steps=100000"]
    proc = subprocess.Popen(
        [*cmd, *args, "log.interval=2", "checkpoint.interval=100000"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield root
    proc.send_signal(signal.SIGTERM)  # a graceful stop: it checkpoints and exits
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def page(live_root):
    # 30 ms per decode step: the playground's stream lasts long enough to watch and stop.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SLOW_ENV, "0.03")
        server = ThreadServer(live_root)
        browser = _browser()
        ARTIFACTS.mkdir(exist_ok=True)
        try:
            browser.get(f"{server.url}/?poll={POLL_MS}")
            yield browser, server
        finally:
            browser.quit()
            server.stop()


def _points(browser, run: str, kind: str) -> list[list[float]]:
    return browser.execute_script(
        "return window.tinylmDashboard.points(arguments[0], arguments[1])", run, kind
    )


def _rows(browser) -> dict[str, str]:
    """Run name -> the row's cells joined by tabs (read in one go: the table is redrawn)."""
    return browser.execute_script(
        "const out = {};"
        "for (const tr of document.querySelectorAll('#runs-table tbody tr'))"
        "  out[tr.dataset.run] = [...tr.cells].map((td) => td.textContent).join('\\t');"
        "return out;"
    )


def test_dashboard_shows_runs_and_their_curves(page, live_root):
    browser, _ = page
    _wait(lambda: len(_points(browser, "alpha", "val")) == 3, 90, "alpha's val curve")
    rows = _rows(browser)
    assert {"alpha", "beta"} <= set(rows)
    assert "finished" in rows["alpha"] and "30/30" in rows["alpha"]
    for run in ("alpha", "beta"):
        train = read_metrics(live_root / run, "train")
        evals = read_metrics(live_root / run, "eval")
        expected = [[r["step"], r["loss"]] for r in train]
        # JSON numbers are doubles on both sides: the chart holds exactly the logged values.
        assert _points(browser, run, "train") == expected
        assert _points(browser, run, "val") == [[r["step"], r["val/loss"]] for r in evals]
    best = min(r["val/loss"] for r in read_metrics(live_root / "alpha", "eval"))
    assert f"{best:.4f}" in rows["alpha"]
    # Samples sit below a fold (closed: the playground is not pushed down) until opened.
    fold = browser.find_element("id", "samples-fold")
    assert fold.get_attribute("open") is None
    browser.find_element("css selector", "#samples-fold summary").click()
    samples = _wait(lambda: browser.find_element("id", "samples").text, 10, "the samples")
    assert "alpha" in samples and "step 30" in samples
    browser.find_element("css selector", "#samples-fold summary").click()
    # By tokens: the same losses at tokens = step * tokens per step.
    browser.find_element("css selector", "input[name=xaxis][value=tokens]").click()
    tokens = _points(browser, "alpha", "train")
    assert [t for t, _ in tokens] == [
        r["tokens"] for r in read_metrics(live_root / "alpha", "train")
    ]
    browser.find_element("css selector", "input[name=xaxis][value=step]").click()
    browser.save_screenshot(str(ARTIFACTS / "serve-dashboard.png"))


def test_live_run_gets_new_points_without_reload(page):
    browser, _ = page
    browser.execute_script("window.__sameDocument = true")  # gone if the page reloads
    _wait(lambda: "live" in _rows(browser), 180, "the live run in the table")
    first = _wait(lambda: _points(browser, "live", "train"), 180, "the live run's first point")
    n = len(first)
    grown = _wait(
        lambda: len(p := _points(browser, "live", "train")) > n and p,
        60,
        "a new point of the live run",
    )
    assert grown[: len(first)] == first  # appended, not redrawn from scratch data
    assert browser.execute_script("return window.__sameDocument === true")
    assert _rows(browser)["live"].split("\t")[2] == "running"
    browser.save_screenshot(str(ARTIFACTS / "serve-dashboard-live.png"))


def test_playground_streams_and_stops(page):
    browser, server = page
    from selenium.webdriver.support.ui import Select

    browser.find_element("id", "playground").location_once_scrolled_into_view  # noqa: B018
    _wait(lambda: "alpha" in browser.find_element("id", "pg-model").text, 60, "the model list")
    Select(browser.find_element("id", "pg-model")).select_by_value("alpha")
    for field, value in (
        ("pg-temperature", "0"),
        ("pg-max-tokens", "40"),
        ("pg-prompt", "ANNA: the"),
    ):
        element = browser.find_element("id", field)
        element.clear()
        element.send_keys(value)
    browser.find_element("id", "pg-go").click()
    text = lambda: browser.find_element("id", "pg-text").text  # noqa: E731
    status = lambda: browser.find_element("id", "pg-status").text  # noqa: E731
    # Part of the text on the page while it is still generating: it streams.
    partial = _wait(lambda: status().startswith("generating") and text(), 60, "streamed text")
    _wait(lambda: status().startswith("done"), 90, "the end of the completion")
    final = text()
    assert len(final) > len(partial) and final.startswith(partial)
    expected = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "alpha", "prompt": "ANNA: the", "max_tokens": 40, "temperature": 0},
        timeout=60,
    ).json()["choices"][0]["text"]
    assert final == expected
    browser.save_screenshot(str(ARTIFACTS / "serve-playground.png"))

    browser.find_element("id", "pg-max-tokens").clear()
    browser.find_element("id", "pg-max-tokens").send_keys("50")
    browser.find_element("id", "pg-go").click()
    _wait(lambda: len(text()) >= 3, 60, "the second stream")
    browser.find_element("id", "pg-stop").click()
    _wait(lambda: status() == "stopped", 30, "the stop")
    stopped_at = len(text())
    time.sleep(0.5)
    assert len(text()) == stopped_at < 50  # nothing more arrives after the stop


def _y_label(browser) -> str:
    """The y axis label the chart draws (uPlot draws it on its canvas, from this option)."""
    return browser.execute_script("return window.tinylmDashboard.chart().axes[1].label")


def test_units_switch_to_bits_per_byte_and_colours_stay(page, live_root):
    """A run with another tokenizer appears: the y axis turns to bits/byte by itself (val
    points are the logged val/bits_per_byte; train losses scaled by the run's bits per nat),
    existing runs keep their colours (also after a page reload), and the user can switch back."""
    browser, server = page
    _wait(lambda: _points(browser, "alpha", "val"), 60, "alpha's curve")
    assert browser.execute_script("return window.tinylmDashboard.yUnit()") == "nats"
    assert _y_label(browser) == "loss (nats/token)"
    colors = browser.execute_script("return window.tinylmDashboard.colors()")
    gamma = live_root / "gamma"  # a logged run with the GPT-2 tokenizer (no training needed)
    gamma.mkdir()
    (gamma / "config.yaml").write_text("data:\n  tokenizer: gpt2\n")
    lines = [{"kind": "train", "step": s, "tokens": 512 * s, "loss": 9.0 - s} for s in (1, 2, 3)]
    lines.append({"kind": "eval", "step": 3, "val/loss": 6.0, "val/bits_per_byte": 2.4})
    (gamma / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    _wait(lambda: _points(browser, "gamma", "val"), 30, "gamma's curve")
    assert browser.execute_script("return window.tinylmDashboard.yUnit()") == "bpb"
    assert _y_label(browser) == "bits/byte"
    assert _points(browser, "gamma", "val") == [[3, 2.4]]
    scaled = [[s, y] for s, y in _points(browser, "gamma", "train")]
    assert [s for s, _ in scaled] == [1, 2, 3]
    assert all(abs(y - (9.0 - s) * 0.4) < 1e-9 for s, y in scaled)
    evals = read_metrics(live_root / "alpha", "eval")
    assert _points(browser, "alpha", "val") == [[r["step"], r["val/bits_per_byte"]] for r in evals]
    now = browser.execute_script("return window.tinylmDashboard.colors()")
    assert {k: now[k] for k in colors} == colors and len(set(now.values())) == len(now)
    browser.save_screenshot(str(ARTIFACTS / "serve-dashboard-bpb.png"))
    browser.find_element("css selector", "input[name=yunit][value=nats]").click()
    assert _y_label(browser) == "loss (nats/token)"
    assert _points(browser, "gamma", "val") == [[3, 6.0]]
    browser.get(f"{server.url}/?poll={POLL_MS}")  # a new page: same colours for the same runs
    _wait(lambda: _points(browser, "gamma", "val"), 30, "the reloaded page's curves")
    again = browser.execute_script("return window.tinylmDashboard.colors()")
    assert {k: again[k] for k in now} == now


def test_curriculum_phase_on_the_row_and_the_chart(page, live_root):
    browser, _ = page
    train = read_metrics(live_root / "phased", "train")
    # What the trainer logged: phase 1 up to step 4, phase 2 from step 5.
    assert [r["phase"] for r in train] == [1, 1, 1, 1, 2, 2, 2, 2]
    row = _wait(lambda: _rows(browser).get("phased"), 90, "the curriculum run in the table")
    cells = row.split("\t")
    assert cells[4] == "2/2 · steps 5–8 · play 20% zoo 80%"
    assert _rows(browser)["alpha"].split("\t")[4] == "-"  # no curriculum
    title = browser.find_element("css selector", "tr[data-run=phased] .phase").get_attribute(
        "title"
    )
    assert title == "phase 1: steps 1–4 · play 100%\nphase 2: steps 5–8 · play 20% zoo 80%"
    # The current phase is the newest record's: two records in, the run was in phase 1.
    assert (
        run_phases(live_root / "phased", [{"kind": "train", **r} for r in train[:2]])["current"]
        == 1
    )
    marks = lambda: browser.execute_script("return window.tinylmDashboard.phaseMarks()")  # noqa: E731
    got = _wait(lambda: [m for m in marks() if m["run"] == "phased"], 30, "the phase boundary")
    assert got == [{"run": "phased", "phase": 2, "x": 4, "drawn": True}]
    # By tokens: the boundary moves with the curve, to step 4's tokens.
    browser.find_element("css selector", "input[name=xaxis][value=tokens]").click()
    got = [m for m in marks() if m["run"] == "phased"]
    assert got[0]["x"] == train[3]["tokens"] and got[0]["drawn"]
    browser.find_element("css selector", "input[name=xaxis][value=step]").click()
    browser.save_screenshot(str(ARTIFACTS / "serve-dashboard-phases.png"))
