"""Looking before training: `tinylm train --list`, `--print-config` and `--dry-run`.

- `preset_table()`: each preset's one-line description, parameter count and intended hardware
  (the description is the preset's first comment line, the hardware its `# hardware:` line; the
  parameter count is the model's own `num_params`, built on the meta device).
- `resolved_yaml(cfg)`: the fully resolved config, exactly what a run saves as `config.yaml`.
- `dry_run(cfg, run_dir)`: builds what a run builds (data, tokenizer, model, optimizer), times a
  few real training steps, prints sizes, the memory estimate and the time per step, and writes
  nothing but the prepared-data cache (which the real run then reuses).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tinylm.config import PRESET_DIR, Config, list_presets, load_config

# Steps timed by --dry-run after one untimed warm-up step (allocations, lazy init): three keep
# the dry run of the tiny preset under ~2 s on 2 cores while averaging out one noisy step.
DRY_RUN_STEPS = 3
DESCRIPTION_CHARS = 110  # one line of `--list` beside the indent


@dataclass
class PresetInfo:
    name: str
    description: str
    params: int
    vocab_note: str
    hardware: str


def _header_comments(path: Path) -> list[str]:
    """The comment lines at the top of a YAML file, without the leading '#'."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def preset_info(name: str) -> PresetInfo:
    """Description, parameter count and hardware of one preset (no weights are allocated)."""
    from tinylm.estimate import estimate

    comments = _header_comments(PRESET_DIR / f"{name}.yaml")
    hardware = next(
        (c.split(":", 1)[1].strip() for c in comments if c.lower().startswith("hardware:")), "-"
    )
    # The first sentence of the header, without the "tiny:" it starts with.
    text = " ".join(c for c in comments if not c.lower().startswith("hardware:"))
    text = re.sub(rf"^{re.escape(name)}\s*:\s*", "", text)
    description = re.split(r"(?<=[A-Za-z0-9)])\.(\s|$)", text, maxsplit=1)[0]
    if len(description) > DESCRIPTION_CHARS:
        description = description[: DESCRIPTION_CHARS - 3].rsplit(" ", 1)[0] + " ..."
    e = estimate(load_config(name), tokens=1)
    return PresetInfo(name, description, e.params, e.vocab_note, hardware)


def preset_table() -> str:
    """What `tinylm train --list` prints: one block per preset."""
    blocks = []
    for name in list_presets():
        info = preset_info(name)
        approx = "~" if info.vocab_note.startswith("assumed") else ""
        params = f"{approx}{info.params / 1e6:.1f}M"
        blocks.append(
            f"{info.name:<16} {params:>7} params  {info.description}\n"
            f"{'':<16} {'':>7}         hardware: {info.hardware}"
        )
    return "\n".join(blocks)


def resolved_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what the run directory's config.yaml will hold)."""
    return cfg.to_yaml()


def dry_run(cfg: Config, run_dir: Path) -> str:
    """Build data, tokenizer, model and optimizer; time `DRY_RUN_STEPS` steps at the thread
    count the run would choose; return the report."""
    from tinylm.train.threads import restored

    with restored():
        return _dry_run(cfg, run_dir)


def _dry_run(cfg: Config, run_dir: Path) -> str:
    import torch

    from tinylm.estimate import estimate, format_bytes
    from tinylm.train.eta import EtaEstimator
    from tinylm.train.monitor import format_eta
    from tinylm.train.trainer import Trainer

    trainer = Trainer(cfg, run_dir)  # builds everything; writes nothing into run_dir
    model, data, tok = trainer.raw_model, trainer.data, trainer.tokenizer
    lines = [*trainer.messages, f"run directory (not created): {run_dir}"]
    train_tokens = sum(len(tokens) for _, tokens, _ in data.train)
    lines.append(
        f"tokenizer: {tok.kind}, {tok.vocab_size:,} tokens; data: {train_tokens:,} train tokens, "
        f"{sum(len(t) for t in data.val.values()):,} val tokens (details above)"
    )
    resolved = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, precision=trainer.precision.name)
    )
    checkpointing = trainer.raw_model.activation_checkpointing
    e = estimate(resolved, tokens=None, activation_checkpointing=checkpointing)
    recompute = ", blocks recomputed in the backward pass" if checkpointing else ""
    lines.append(
        f"memory estimate for training: {format_bytes(e.total_memory)} (weights, gradients, AdamW "
        f"state, {e.precision} activations at batch {e.batch_size} x {e.context_length}"
        f"{recompute}; see `tinylm estimate`)"
    )

    model.train()
    with trainer.loader:
        batches = iter(trainer.loader.iterate(0))
        trainer.train_step(batches)  # warm-up: first-call allocations are not a step's cost
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        start = time.perf_counter()
        for _ in range(DRY_RUN_STEPS):
            loss, _, _ = trainer.train_step(batches)
        loss.item()  # waits for the device
        per_step = (time.perf_counter() - start) / DRY_RUN_STEPS
        x, y = next(batches)
        with torch.no_grad():  # one evaluation batch's forward pass, to price the evaluations
            start = time.perf_counter()
            trainer.raw_model(x, y)
            forward = time.perf_counter() - start
    tokens_per_step = (
        cfg.train.batch_size * cfg.model.context_length * cfg.train.grad_accum
    ) * trainer.dist.world_size
    lines.append(
        f"time per step: {1000 * per_step:.0f} ms ({tokens_per_step / per_step:,.0f} tokens/s, "
        f"mean of {DRY_RUN_STEPS} steps after a warm-up)"
    )
    eval_rows = cfg.eval.batch_size or cfg.train.batch_size
    eval_seconds = forward * eval_rows / x.shape[0] * cfg.eval.max_batches * max(1, len(data.val))
    eta = EtaEstimator(cfg.train.max_steps, eval_interval=cfg.eval.interval, checkpoint_interval=0)
    eta.steps(DRY_RUN_STEPS, DRY_RUN_STEPS * per_step)
    eta.overhead("eval", eval_seconds)
    total = eta.remaining(0) or 0.0
    lines.append(
        f"{cfg.train.max_steps:,} steps: about {format_eta(total)} at {torch.get_num_threads()} "
        f"thread(s) ({format_eta(cfg.train.max_steps * per_step)} of training steps, "
        f"{format_eta(total - cfg.train.max_steps * per_step)} of evaluations at "
        f"~{eval_seconds:.1f} s each), plus samples and checkpoints"
    )
    lines.append("dry run: nothing trained or written (the prepared data stays cached)")
    return "\n".join(lines)
