"""The dashboard's sweep page: `tinylm serve SWEEP_DIR` shows the sweep's trials.

`GET /sweep` is the page (static/sweep.html: each hyper-parameter against the trials' best
bits per byte, and the trial table); `GET /api/sweep` answers what it draws, read from the
sweep's `summary.json` (tinylm/sweep/report.py rewrites it after every trial, so a running sweep
is seen as it goes) and `sweep.json`. The server imports neither Optuna nor the sweep runner.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from tinylm.runs import metric_number
from tinylm.serve.protocol import ApiError

STATIC_DIR = Path(__file__).parent / "static"
api_router = APIRouter(prefix="/api")
page_router = APIRouter()


def _finite(value: Any) -> float | None:
    v = metric_number(value)
    return v if v is not None and math.isfinite(v) else None


def read_sweep(root: Path) -> dict[str, Any]:
    """The sweep at `root` for the page; ApiError 404 when `root` is not a sweep directory."""
    summary = root / "summary.json"
    if not (root / "sweep.json").is_file():
        raise ApiError(
            404,
            f"'{root.name}' is not a sweep directory (no sweep.json): serve the directory "
            "`tinylm sweep` wrote",
            code="not_a_sweep",
        )
    if not summary.is_file():
        return {"sweep": root.name, "axes": [], "trials": []}
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):  # being replaced right now (atomic rename): next poll
        return {"sweep": root.name, "axes": [], "trials": []}
    if not isinstance(data, dict):
        return {"sweep": root.name, "axes": [], "trials": []}
    trials = []
    for t in data.get("trials") or []:
        if not isinstance(t, dict):
            continue
        trials.append(
            {
                "trial": t.get("trial"),
                "name": str(t.get("name", "")),
                "params": {str(k): str(v) for k, v in (t.get("params") or {}).items()},
                "status": str(t.get("status", "")),
                "steps": t.get("steps") if isinstance(t.get("steps"), int) else 0,
                "best_val_loss": _finite(t.get("best_val_loss")),
                "best_bits_per_byte": _finite(t.get("best_bits_per_byte")),
            }
        )
    axes = [
        {"key": str(a.get("key")), "kind": str(a.get("kind")), "log": bool(a.get("log"))}
        for a in data.get("axes") or []
        if isinstance(a, dict)
    ]
    return {
        "sweep": root.name,
        "sampler": str(data.get("sampler", "")),
        "pruner": str(data.get("pruner", "")),
        "axes": axes,
        "trials": trials,
    }


@api_router.get("/sweep")
async def sweep(request: Request) -> dict[str, Any]:
    return read_sweep(Path(request.app.state.settings.root))


@page_router.get("/sweep", include_in_schema=False)
async def sweep_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "sweep.html")
