"""Resuming without `--resume`: elastic restarts and re-submitted jobs (`train.resume`).

`torchrun --max-restarts=N` restarts the whole worker group after a worker dies, with the same
command line, and a preempted Slurm job is requeued with the same batch script. Neither can add
`--resume`, so the run must notice by itself that it is a continuation:

- `auto` (default): under torchrun, a restarted group (`TORCHELASTIC_RESTART_COUNT` >= 1) resumes
  the newest intact checkpoint of its run directory, and so does a job started with an explicit
  `run_name` whose directory already has checkpoints (a re-submission). Outside torchrun nothing
  changes: a `run_name` with checkpoints is refused (use `--resume`), an unnamed run gets a fresh
  `<preset>-N` directory.
- `always`: resume whenever the run directory has an intact checkpoint, also outside torchrun
  (an unnamed run: the newest directory of its `<preset>[-N]` series).
- `never`: only `--resume` resumes.

A restarted group without `run_name` continues the directory of the series `<preset>[-N]` whose
metrics were written last (the one its first attempt created). Rank 0 decides from its view of
the disk and every rank takes its decision (`distributed.broadcast_object`), so the ranks can
never disagree on the directory or on whether to resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tinylm.config import Config


@dataclass(frozen=True)
class Decision:
    run_dir: Path
    resume: bool
    reason: str | None  # why it resumes, for the `resumed (...) at step N` event


def restart_count() -> int | None:
    """torchrun's restart count of this worker group (0 on the first start); None outside torchrun."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _has_checkpoint(run_dir: Path) -> bool:
    from tinylm.train import checkpoint

    return checkpoint.find_latest(run_dir / "checkpoints", verify_hashes=False) is not None


def _latest_of_series(out: Path, base: str) -> Path | None:
    """The directory of the series `base`, `base-2`, ... whose metrics were written last."""
    best, best_time = None, -1.0
    for path in [out / base, *out.glob(f"{base}-*")]:
        suffix = path.name[len(base) + 1 :]
        if path != out / base and not suffix.isdigit():
            continue
        try:
            mtime = (path / "metrics.jsonl").stat().st_mtime
        except OSError:
            continue
        if mtime > best_time:
            best, best_time = path, mtime
    return best


def decide(cfg: Config, run_dir: Path, explicit_name: bool, preset: str | None) -> Decision:
    """Whether this `tinylm train` (without --resume) continues an existing run, and which.

    `run_dir` is the directory a new run would use; `explicit_name` says whether the user named
    it. Collective under torchrun (rank 0's decision is broadcast); sets `cfg.run_name`.
    """
    decision = Decision(run_dir, False, None)
    if os.environ.get("RANK", "0") == "0":
        decision = _decide_here(cfg, run_dir, explicit_name, preset)
    world_size = os.environ.get("WORLD_SIZE", "1")
    if world_size != "1" and not (world_size.isdigit() and int(world_size) <= 1):
        # torch only when there is something to share; a malformed WORLD_SIZE is refused in
        # one line by distributed.setup (launcher_int), not parsed here
        from tinylm.train import distributed

        decision = distributed.broadcast_object(decision, distributed.setup())
    cfg.run_name = decision.run_dir.name
    return decision


def _decide_here(cfg: Config, run_dir: Path, explicit_name: bool, preset: str | None) -> Decision:
    mode, restarts = cfg.train.resume, restart_count()
    if mode == "never" or (mode == "auto" and restarts is None):
        return Decision(run_dir, False, None)
    if not explicit_name and (restarts or mode == "always"):  # the directory it began in
        base = Path(preset).stem if preset else "run"
        run_dir = _latest_of_series(Path(cfg.out_dir), base) or run_dir
    if not _has_checkpoint(run_dir):
        return Decision(run_dir, False, None)
    if restarts:
        return Decision(run_dir, True, f"elastic restart {restarts}")
    if explicit_name:
        return Decision(run_dir, True, f"run_name={run_dir.name} started again")
    return Decision(run_dir, True, "train.resume=always")
