"""Run directories: where a new run goes, who may use one, and resuming it from its latest checkpoint.

A resumed run continues exactly only if every setting that changes what a step computes is the
one it was started with; the keys that only change how it is observed or how long it lasts may
change (`RESUME_SAFE_PREFIXES`). `--force` resumes anyway and says what changed, except for a
change of the model's shape, which no checkpoint can continue (`refuse_shape_change`).

One `tinylm train` at a time per run directory (`run_lock`, a `locks.DirectoryLock` taken
before anything is read or written): a second one, even started in the same second or with
--resume, is refused at once with the first one's PID. A new run never overwrites files it did
not write: a directory holding a `config.yaml`, `tokenizer.json` or `metrics.jsonl` that is not
from a tinylm run is refused (`refuse_existing_run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tinylm.config import Config, ConfigError, validate
from tinylm.fileio import make_dir
from tinylm.locks import DirectoryLock
from tinylm.train import checkpoint
from tinylm.train.optim import stable_until

RUN_FILES = ("config.yaml", "tokenizer.json", "metrics.jsonl")

# Keys that may differ when a run is resumed without --force: they change when or how the run
# is observed or how long it lasts, not what a given step computes.
RESUME_SAFE_PREFIXES = (
    "train.max_steps",
    "train.max_time_minutes",
    "train.compile",
    "train.device",
    "train.early_stop",
    "train.max_nonfinite_steps",
    "train.resume",
    "train.spike_factor",
    "train.gap_warn_factor",
    "eval.",
    "checkpoint.",
    "log.",
    "data.num_workers",
    "data.prefetch",
    "data.cache_dir",
    "out_dir",
    "run_name",
)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# Keys that only say when and how the LR decays. Changing them is safe while the checkpoint is in
# the stable phase under both the old and the new schedule: no completed step had a different LR
# and the LR does not jump (this is how a WSD or constant run is cooled down from a checkpoint).
SCHEDULE_KEYS = ("optim.schedule", "optim.decay_steps", "optim.decay_fraction", "optim.decay_shape")


def in_stable_phase(cfg: Config, step: int) -> bool:
    """True while the LR at `step` (and before) is the schedule's warmup or peak, not a decay."""
    return step <= stable_until(cfg.optim, cfg.train.max_steps)


def unsafe_changes(saved: Config, current: Config, step: int | None = None) -> list[str]:
    """Config keys that differ between the checkpoint (at `step`) and now and would change the run."""
    old, new = flatten(saved.to_dict()), flatten(current.to_dict())
    schedule_ok = (
        step is not None and in_stable_phase(saved, step) and in_stable_phase(current, step)
    )
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and not key.startswith(RESUME_SAFE_PREFIXES):
            if key == "model.vocab_size" and new.get(key) == 0:
                continue  # 0 means "from the tokenizer", which the saved value already is
            if key in SCHEDULE_KEYS and schedule_ok:
                continue
            diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return diffs


def schedule_change_note(saved: Config, current: Config, step: int = 0) -> str | None:
    """max_steps may change on resume, but the LR decay depends on it: say what happens."""
    old, new, opt = saved.train.max_steps, current.train.max_steps, current.optim
    if old == new or opt.schedule == "constant":
        return None
    if opt.schedule == "wsd":
        start = stable_until(opt, new)
        if in_stable_phase(saved, step) and step <= start:
            return f"train.max_steps {old} -> {new}: the LR stays at its peak; the decay now starts at step {start}"
        return (
            f"train.max_steps {old} -> {new}: the decay had started (step {step}); it restarts "
            f"from the LR of step {step} under the new length (the curve jumps). A cool-down "
            "belongs in the stable phase: resume an earlier checkpoint's run with --cooldown N"
        )
    if opt.decay_steps is not None:
        return None
    return (
        f"train.max_steps {old} -> {new}: the learning-rate decay runs to max_steps, so "
        "it is rescaled from this step on (the curve jumps); to keep the old schedule, "
        f"resume with optim.decay_steps={max(0, old - opt.warmup_steps)} --force"
    )


def apply_cooldown(run_dir: Path, cfg: Config, steps: int) -> str:
    """Turn `cfg` (a run being resumed) into a cool-down of `steps` steps from its latest checkpoint.

    The cool-down is a WSD decay that starts at the checkpoint's step `s`: schedule wsd,
    `decay_steps=steps`, `max_steps=s+steps`. It needs the checkpoint to be in its stable phase
    (past warmup, LR not yet decaying), so that the decay starts from the peak without a jump.
    Returns the note to print. Raises ConfigError (naming the fix) otherwise.
    """
    if steps <= 0:
        raise ConfigError(f"--cooldown must be a positive number of steps, got {steps}")
    latest = checkpoint.find_latest(run_dir / "checkpoints")
    if latest is None:
        raise checkpoint.CheckpointError(
            f"--cooldown: no intact checkpoint in {run_dir / 'checkpoints'} to cool down from"
        )
    step = checkpoint.read_meta(latest)["step"]
    saved = checkpoint.load_checkpoint(latest).config
    if step < saved.optim.warmup_steps or not in_stable_phase(saved, step):
        phase = "still warming up" if step < saved.optim.warmup_steps else "already decaying"
        raise ConfigError(
            f"--cooldown: the latest checkpoint (step {step}) is {phase} "
            f"(optim.schedule={saved.optim.schedule}, warmup {saved.optim.warmup_steps}, "
            f"decay from step {stable_until(saved.optim, saved.train.max_steps)}); a cool-down "
            "starts from the peak LR of a stable phase (wsd or constant schedules). To continue "
            "an interrupted cool-down, resume without --cooldown"
        )
    cfg.optim.schedule, cfg.optim.decay_steps = "wsd", steps
    cfg.train.max_steps = step + steps
    validate(cfg)
    return f"cool-down: LR decays from step {step} to {step + steps} ({cfg.optim.decay_shape})"


def open_for_resume(
    run_dir: Path, cfg: Config, force: bool
) -> tuple[checkpoint.LoadedCheckpoint, list[str]]:
    """The run's latest intact checkpoint and the messages to print about resuming from it.

    Raises `CheckpointError` when there is none and `ConfigError` when `cfg` differs from the
    checkpoint's config in a way that changes the run (unless `force`). Sets
    `cfg.model.vocab_size` from the checkpoint.
    """
    root = run_dir / "checkpoints"
    latest = checkpoint.find_latest(root)
    if latest is None:
        raise checkpoint.CheckpointError(
            f"--resume: no intact checkpoint in {root}; start a new run without --resume"
        )
    # A sharded checkpoint: shapes only here; each rank reads its shards after wrapping the model.
    loaded = checkpoint.load_checkpoint(latest, consolidate=False)
    step = loaded.meta["step"]
    refuse_shape_change(loaded, cfg, run_dir)
    changes = unsafe_changes(loaded.config, cfg, step)
    if changes and not force:
        raise ConfigError(
            "the config differs from the checkpoint's in ways that would change the run:\n  "
            + "\n  ".join(changes)
            + "\nResume with the original values, or pass --force to resume anyway."
        )
    notes = []
    if changes:
        notes.append("resuming with changed config (--force): " + "; ".join(changes))
    if note := schedule_change_note(loaded.config, cfg, step):
        notes.append(note)
    cfg.model.vocab_size = loaded.config.model.vocab_size
    notes.append(f"resuming from {latest}")
    return loaded, notes


def refuse_shape_change(loaded: checkpoint.LoadedCheckpoint, cfg: Config, run_dir: Path) -> None:
    """A checkpoint can never continue as a model of another shape, not even with --force
    (loading it would fail with a size mismatch deep in PyTorch): refuse with the way on."""
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:  # "from the tokenizer", i.e. the checkpoint's own
        model_cfg = dataclasses.replace(model_cfg, vocab_size=loaded.config.model.vocab_size)
    tensors = checkpoint.shape_changes(loaded.model_state, model_cfg)
    if not tensors:
        return
    keys = [
        c for c in unsafe_changes(loaded.config, cfg, loaded.meta["step"]) if c.startswith("model.")
    ]
    shown = tensors[:4] + ([f"... {len(tensors) - 4} more"] if len(tensors) > 4 else [])
    raise ConfigError(
        f"--resume {run_dir}: the model's shape differs from the checkpoint's "
        f"({'; '.join(keys) or 'model settings'}), so its weights do not fit:\n  "
        + "\n  ".join(shown)
        + "\nA run cannot continue as a model of another shape, not even with --force. "
        "Resume with the checkpoint's model.* values, or train the new shape as a new run "
        f"(another run_name=...); to start a new run from this run's weights, use "
        f"train.init_from={run_dir}"
    )


def stop_message(run_dir: Path, step: int, reason: str) -> str:
    """What stopped the run, the checkpoint it can continue from, and the command to do so."""
    latest = checkpoint.find_latest(run_dir / "checkpoints", verify_hashes=False)
    if latest is None:
        return (
            f"stopped at step {step}: {reason}. No checkpoint was written; "
            "start the run again without --resume"
        )
    return (
        f"stopped at step {step}: {reason}. "
        f"Last good checkpoint: {latest} (step {checkpoint.read_meta(latest)['step']})\n"
        f"Resume with: tinylm train --resume {run_dir}"
    )


def finished_message(run_dir: Path, cfg: Config, force: bool) -> str | None:
    """What `--resume` of a run that has reached its `train.max_steps` says instead of training
    (nothing is written: re-running its last evaluation and sample would only append duplicate
    records); None when the latest checkpoint has steps left, there is none, or the config
    changed in a way the resume refuses (that refusal comes first)."""
    from tinylm.config import config_from_dict

    root = run_dir / "checkpoints"
    latest = checkpoint.find_latest(root, verify_hashes=False)
    if latest is None:
        return None
    meta = checkpoint.read_meta(latest)
    step = meta["step"]
    if step < cfg.train.max_steps:
        return None
    try:
        changed = unsafe_changes(config_from_dict(meta["config"]), cfg, step)
    except (ConfigError, KeyError, TypeError):
        return None  # a damaged checkpoint: the resume says what is wrong with it
    if changed and (not force or any(c.startswith("model.") for c in changed)):
        return None  # refused by open_for_resume (a model's shape even with --force)
    best = checkpoint.find_best(root)
    loss = checkpoint.read_meta(best).get("val_loss") if best else None
    shown = f"best val {loss:.4f}" if isinstance(loss, (int, float)) else "no val loss recorded"
    return (
        f"{run_dir}: already finished at step {step} ({shown}); raise train.max_steps to "
        f"continue: tinylm train --resume {run_dir} train.max_steps=N (N > {step})"
    )


def default_run_dir(cfg: Config, preset: str | None) -> Path:
    """`out_dir/run_name`, or the first free `out_dir/<preset>[-N]` when no name was given."""
    out = Path(cfg.out_dir)
    if cfg.run_name:
        return out / cfg.run_name
    base = Path(preset).stem if preset else "run"
    candidate, n = out / base, 1
    while (candidate / "checkpoints").exists():
        n += 1
        candidate = out / f"{base}-{n}"
    cfg.run_name = candidate.name
    return candidate


def refuse_existing_run(run_dir: Path) -> None:
    """A new run must not overwrite one that has checkpoints (that one continues with --resume),
    nor files of the same names that no tinylm run wrote."""
    if checkpoint.list_checkpoints(run_dir / "checkpoints"):
        raise ConfigError(
            f"{run_dir} already has checkpoints: continue it with --resume, or choose another run_name=..."
        )
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if present and not _written_by_a_run(run_dir):
        raise ConfigError(
            f"{run_dir} holds {', '.join(present)} that no tinylm run wrote, and a new run would "
            "overwrite them: choose another run_name=... (or out_dir=...)"
        )


def _written_by_a_run(run_dir: Path) -> bool:
    """True if `run_dir` holds a tinylm run's metrics (a `start` event) or its saved config."""
    try:
        with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("event") == "start":
                        return True
    except OSError:
        pass
    try:
        from tinylm.config import config_from_dict
        from tinylm.yamlio import load as load_yaml

        config_from_dict(load_yaml((run_dir / "config.yaml").read_text()))
        return True
    except Exception:  # anything unreadable as our config is not ours
        return False


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock (main process only; see the module docstring).

    A run directory this call created is removed again if the run left nothing in it (a
    refused config, an interrupted set-up): never a directory that holds anything.
    """
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 holds it for all
        yield
        return
    created = not run_dir.exists()
    make_dir(run_dir, ConfigError, "run directory")
    try:
        with DirectoryLock(run_dir, "train a run", wait=False, error=ConfigError) as lock:
            if lock.stale.get("pid"):
                print(
                    f"note: {run_dir}: the previous run (PID {lock.stale['pid']}) ended without "
                    "releasing its lock (killed?); continuing",
                )
            yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only succeeds when empty
