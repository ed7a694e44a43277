"""The routes behind the page's runs dashboard: run summaries, metrics read incrementally,
samples, and reloading a run's newest checkpoint.

`GET /api/runs/{run}/metrics?offset=N&file=ID` returns the complete `metrics.jsonl` lines after
byte `offset` (a line still being written waits for the next poll) and the new offset, so a page
polling every few seconds reads each byte once however long the run. `file` identifies the file
(inode and creation); when it differs, or the file got shorter than `offset` (a resumed run
rewrites its history past the resumed step), the answer starts again from byte 0 with
`reset: true` and the page redraws that run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tinylm.runs import METRICS_FILE, parse_record, read_metrics, summarize
from tinylm.serve.phases import run_phases
from tinylm.serve.protocol import ApiError
from tinylm.serve.registry import UnknownModel, canonical_id
from tinylm.train.checkpoint import CheckpointError

router = APIRouter(prefix="/api")

MAX_CHUNK = 4 << 20  # bytes of metrics per answer: a long run's history arrives in a few polls
# The fields the charts and table use; other metrics stay on disk.
TRAIN_KEYS = ("step", "tokens", "loss")
EVAL_KEYS = ("step", "val/loss", "val/bits_per_byte")


def _run_dir(request: Request, name: str) -> Path:
    run_dir = request.app.state.registry.runs().get(name)
    if run_dir is None:
        raise ApiError(404, f"no run named '{name}': see GET /api/runs", code="run_not_found")
    return run_dir


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def run_tokenizer(run_dir: Path) -> str | None:
    """The tokenizer a run was configured with (`data.tokenizer` in its config.yaml): the page
    plots bits/byte by default when the runs shown differ in it."""
    import yaml

    try:
        data = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    tokenizer = data.get("tokenizer") if isinstance(data, dict) else None
    return str(tokenizer) if tokenizer is not None else None


def run_row(run_dir: Path) -> dict[str, Any]:
    """One run for the dashboard table."""
    s = summarize(run_dir)
    records = read_metrics(run_dir)
    bpb = [
        v
        for r in records
        if r.get("kind") == "eval" and (v := _finite(r.get("val/bits_per_byte"))) is not None
    ]
    return {
        "name": run_dir.name,
        "status": s.status,
        "step": s.step,
        "max_steps": s.max_steps,
        "tokens": s.tokens,
        "best_val_loss": s.best_val_loss,
        "best_bits_per_byte": min(bpb) if bpb else None,
        "last_train_loss": _finite(s.last_train_loss),
        "last_checkpoint": s.last_checkpoint,
        "tokenizer": run_tokenizer(run_dir),
        "bad_lines": s.bad_lines,
        "curriculum": run_phases(run_dir, records),  # data.phases (serve/phases.py), or None
    }


def _rows(request: Request) -> list[dict[str, Any]]:
    return [run_row(p) for p in request.app.state.registry.runs().values()]


@router.get("/runs")
async def list_runs(request: Request) -> dict:
    return {"runs": await run_in_threadpool(_rows, request)}


def file_id(path: Path) -> str:
    """Identifies the file itself, so a file replaced under the same name reads as new."""
    st = path.stat()
    return f"{st.st_dev}-{st.st_ino}"


def read_new_records(path: Path, offset: int, known_file: str) -> dict[str, Any]:
    """Records of complete lines after `offset` (see the module docstring)."""
    fid = file_id(path)
    size = path.stat().st_size
    reset = (bool(known_file) and known_file != fid) or offset > size
    if reset:
        offset = 0
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(MAX_CHUNK)
    end = data.rfind(b"\n") + 1  # only whole lines: the writer may be mid-line
    records = []
    for line in data[:end].splitlines():
        r = parse_record(line)
        if r is None:
            continue  # malformed (a line cut short by a kill, an edit): runs.read_metrics counts them
        kind = r.get("kind")
        if kind == "train":
            records.append({"kind": kind, **{k: r.get(k) for k in TRAIN_KEYS}})
        elif kind == "eval" and "val/loss" in r:
            records.append({"kind": kind, **{k: r.get(k) for k in EVAL_KEYS}})
    return {"records": records, "offset": offset + end, "file": fid, "reset": reset}


@router.get("/runs/{name}/metrics")
async def run_metrics(
    request: Request, name: str, offset: int = Query(0, ge=0), file: str = ""
) -> dict:
    path = _run_dir(request, name) / METRICS_FILE
    return await run_in_threadpool(read_new_records, path, offset, file)


@router.get("/runs/{name}/samples")
async def run_samples(request: Request, name: str, limit: int = Query(4, ge=1, le=50)) -> dict:
    run_dir = _run_dir(request, name)
    records = await run_in_threadpool(read_metrics, run_dir)
    samples = [
        {"step": r.get("step"), "tag": r.get("tag"), "text": r.get("text", "")}
        for r in records
        if r.get("kind") == "sample"
    ]
    return {"samples": samples[-limit:]}


class ReloadRequest(BaseModel):
    model: str


@router.post("/reload")
async def reload(request: Request, body: ReloadRequest) -> dict:
    """Load the newest checkpoint of a run (`model` is a run id) now."""
    try:
        served = await run_in_threadpool(request.app.state.registry.reload, body.model)
    except UnknownModel as e:
        raise ApiError(404, str(e), param="model", code="model_not_found") from e
    except CheckpointError as e:  # damaged on disk: the server's side, said in one line
        raise ApiError(503, f"the model cannot be loaded: {e}", type="server_error") from e
    # The id asked for (canonical): the model may have been loaded first under another id.
    model = canonical_id(body.model)
    return {"model": model, "checkpoint": served.checkpoint.name, "step": served.step}
