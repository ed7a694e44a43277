"""Where a run's numbers go: JSON lines (always), TensorBoard, wandb, the console and a progress bar.

Only the main process logs. `metrics.jsonl` gets one object per event, flushed as it is written,
with a `kind` of "train", "eval", "sample" or "event"; events carry an `event` type ("start",
"done", "stopped", "failed", "nonfinite", "spike", "gap") that `tinylm runs` reads. On resume the
lines past the resumed step (written after the last checkpoint by the run that died) are dropped,
and TensorBoard is told to purge the same steps, so every sink holds exactly the history of the
run as it continues; a run started afresh (step 0) starts a fresh file.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tinylm.config import LogConfig
from tinylm.fileio import atomic_write_text, open_append

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop lines with step > after_step (they belong to a lost future) and lines cut short.

    Events go too when they name a later step: the resumed run logs them again if they recur,
    so keeping them would count a spike or a warning twice.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= after_step:
            kept.append(line)
    # Atomic: a kill during the rewrite leaves the old file, which the next resume cuts again.
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def open_metrics(path: Path, *, truncate: bool):
    """`metrics.jsonl` for appending (never through a symbolic link), as a CheckpointError
    naming the path when it cannot be opened."""
    try:
        return open_append(path, truncate=truncate)
    except OSError as e:
        from tinylm.fileio import os_error_message
        from tinylm.train.checkpoint import CheckpointError

        raise CheckpointError(os_error_message(e, path, "open the metrics file")) from None


class RunLogger:
    """Fan-out of metrics and text to every configured sink."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LogConfig,
        *,
        enabled: bool,
        run_name: str,
        config_dict: dict[str, Any],
        max_steps: int,
        start_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        metrics_path = run_dir / METRICS_FILE
        if start_step > 0:
            truncate_metrics(metrics_path, start_step)
        # A run that starts at step 0 has no checkpoint behind it: any older lines are from
        # an attempt that never saved, so they are not this run's history.
        self._jsonl = open_metrics(metrics_path, truncate=start_step == 0)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step)
        if cfg.wandb:
            self._wandb = _init_wandb(run_dir, cfg, run_name, config_dict)
        if cfg.progress and sys.stderr.isatty():
            self._bar = tqdm(
                total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False
            )

    def set_total(self, max_steps: int) -> None:
        """The run's step count changed (fitted to its time limit): the progress bar follows."""
        if self._bar is not None:
            self._bar.total = max_steps
            self._bar.refresh()

    def print(self, message: str) -> None:
        """A console line that does not garble the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def log(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
        """Record scalars for `step` in every sink (keys like `loss`, `val/loss`)."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        self._write_line(json.dumps(record))
        scalars = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key if "/" in key else f"{kind}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log(
                {(k if "/" in k else f"{kind}/{k}"): v for k, v in scalars.items()}, step=step
            )

    def text(self, step: int, tag: str, text: str) -> None:
        """Record a generated sample (or any text) for `step`."""
        if not self.enabled:
            return
        self._write_line(json.dumps({"kind": "sample", "step": step, "tag": tag, "text": text}))
        if self._tb is not None:
            self._tb.add_text(tag, f"```\n{text}\n```", step)
        if self._wandb is not None:
            self._wandb.log({tag: text}, step=step)

    def event(self, message: str, **fields: Any) -> None:
        """A one-off event (resume, stop, warning) in the JSONL log and on the console."""
        if not self.enabled:
            return
        record = {"kind": "event", "time": round(time.time(), 3), "message": message, **fields}
        self._write_line(json.dumps(record, default=str))
        self.print(message)

    def _write_line(self, line: str) -> None:
        """One metrics line; a failed write (disk full) stops the run with a clear error once,
        and later lines (the "failed" event) are dropped instead of failing again."""
        if self._jsonl is None:
            return
        try:
            self._jsonl.write(line + "\n")
        except OSError as e:
            from tinylm.fileio import os_error_message
            from tinylm.train.checkpoint import CheckpointError

            path = self._jsonl.name
            with contextlib.suppress(OSError):
                self._jsonl.close()
            self._jsonl = None
            raise CheckpointError(
                os_error_message(e, path, "write the metrics file")
                + "; the run stops here and resumes from its last checkpoint once that is fixed"
            ) from None

    def advance(self, step: int, postfix: str = "") -> None:
        if self._bar is not None:
            self._bar.n = step
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._jsonl is not None:
            with contextlib.suppress(OSError):  # a full disk: the error was raised already
                self._jsonl.close()
        self._bar = self._tb = self._wandb = self._jsonl = None


def _init_wandb(run_dir: Path, cfg: LogConfig, run_name: str, config_dict: dict[str, Any]):
    try:
        import wandb
    except ImportError:
        from tinylm.config import ConfigError

        raise ConfigError(
            "log.wandb=true needs the wandb package: pip install 'tinylm[wandb]'"
        ) from None
    id_file = run_dir / "wandb_id"  # a resumed run continues the same wandb run
    # Our own id, not wandb.util.generate_id: that helper is gone from recent wandb releases.
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    atomic_write_text(id_file, run_id)
    return wandb.init(
        project=cfg.wandb_project,
        name=run_name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=cfg.wandb_mode,
        config=config_dict,
    )
