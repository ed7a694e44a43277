"""Sharded checkpoints of a run (`checkpoint.format=sharded|auto`): save and resume.

A full checkpoint gathers the whole model and optimizer state onto rank 0 at every save (the
state-dict helpers' `full_state_dict=True`): 12 bytes per parameter with AdamW (fp32 weights and
two moments) in one process's host memory, written by one rank. A sharded one is written by
torch.distributed.checkpoint (DCP): every rank writes its own shards of the weights and the
optimizer state (FSDP2's DTensors as they are; under DDP each replicated tensor once), with no
gather. It is as atomic as a full one: the ranks write into rank 0's temporary directory
(`checkpoint.begin_write`), each hashes the files it wrote, and only when every rank has
finished does rank 0 add the training state, tokenizer and `meta.json` and rename the directory
into place (`checkpoint.publish`). A rank killed mid-write leaves a `.tmp-*` directory, never a
`step_*` one; a shard lost afterwards fails the checkpoint's size and hash checks.

Resuming reads the shards into the wrapped model and optimizer (`load_into`): DCP reshards on
load, so a checkpoint saved by 2 ranks resumes under 1, 2 or 4 (the optimizer state too, through
`get_state_dict`/`set_state_dict`); at an unchanged world size the continued run is bit-identical
to an uninterrupted one. Whole weights for inference come from `sharded_io.read_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinylm.config import Config, ConfigError
from tinylm.tokenizer import Tokenizer
from tinylm.train import checkpoint, distributed
from tinylm.train.checkpoint import CheckpointError
from tinylm.train.distributed import DistInfo

# `auto` shards from this many parameters on (under FSDP; DDP and one process keep `full`).
# Below it a full checkpoint is the better file: one model.safetensors any tool reads, and its
# gather is small (12 bytes/parameter with AdamW: 3 GB at 250M, a few seconds). Above it the
# gather grows past what rank 0's host can be assumed to hold next to the node's other ranks
# (12 GB at 1B parameters, on every save) and the whole write goes through one process.
AUTO_SHARD_PARAMS = 250_000_000


def choose_format(
    requested: str, info: DistInfo, mode: str, n_params: int, device: torch.device
) -> tuple[str, str]:
    """`(format, reason)` of this run's checkpoints for `checkpoint.format=requested`."""
    if requested == "full":
        return "full", "full (checkpoint.format=full)"
    if device.type == "xla":
        if requested == "sharded":
            raise ConfigError(
                "checkpoint.format=sharded is not supported on XLA devices (the weights are "
                "saved from host copies): use checkpoint.format=full or auto"
            )
        return "full", "full (auto: XLA saves host copies)"
    if requested == "sharded":
        return "sharded", "sharded (checkpoint.format=sharded)"
    fsdp = info.enabled and mode == "fsdp"
    size = f"{n_params / 1e6:,.1f}M parameters"
    if fsdp and n_params >= AUTO_SHARD_PARAMS:
        return "sharded", f"sharded (auto: FSDP and {size} >= {AUTO_SHARD_PARAMS / 1e6:,.0f}M)"
    why = "not FSDP" if not fsdp else f"{size} < {AUTO_SHARD_PARAMS / 1e6:,.0f}M"
    return "full", f"full (auto: {why})"


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`{"model": ..., "optim": ...}` as DCP saves and loads it: the state-dict helpers' sharded
    form (DTensors under FSDP2), optimizer state keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from tinylm.train.sharded_io import MODEL_KEY, OPTIM_KEY

    parts = getattr(optimizer, "optimizers", optimizer)  # Muon + AdamW: its parts
    model_state, optim_state = get_state_dict(distributed.unwrap(model), parts)
    return {MODEL_KEY: model_state, OPTIM_KEY: optim_state}


def save(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    info: DistInfo,
    *,
    train_state: dict[str, Any],
    config: Config,
    tokenizer: Tokenizer,
    val_loss: float | None,
) -> Path | None:
    """Write checkpoint `step` sharded, atomically (collective: every rank calls it; rank 0 gets
    the path, the others None). `train_state`: scaler, RNG and loop state (rank 0's is written).

    A failure on any rank raises CheckpointError on every rank, with nothing left behind.
    """
    import torch.distributed.checkpoint as dcp

    from tinylm.train.sharded_io import single_process_quiet

    tmp: Path | str | None = None
    if info.is_main:
        try:
            tmp = checkpoint.begin_write(root, step)[1]
        except CheckpointError as e:
            tmp = f"error: {e}"
    tmp = distributed.broadcast_object(str(tmp), info)
    if tmp.startswith("error: "):
        raise CheckpointError(tmp[len("error: ") :])
    tmp = Path(tmp)
    own_error: BaseException | None = None
    try:
        writer = dcp.FileSystemWriter(tmp, sync_files=True)
        with single_process_quiet():
            dcp.save(_state(model, optimizer), storage_writer=writer, no_dist=not info.enabled)
        checkpoint.slow_checkpoint_hook()
        mine = [p.name for p in tmp.iterdir() if p.name.startswith(f"__{info.rank}_")]
        if info.is_main:
            mine.append(checkpoint.SHARD_INDEX)
        written: dict[str, Any] | str = checkpoint.hash_files(tmp, mine)
    except (OSError, RuntimeError) as e:  # DCP raises its CheckpointException (a RuntimeError)
        own_error = e
        written = f"rank {info.rank}: {type(e).__name__}: {str(e).strip()[:300]}"
    every = distributed.gather_objects(written, info)
    outcome: str | None = None
    bug: Exception | None = None  # not an I/O failure: rank 0 re-raises it for the crash report
    if info.is_main:
        failed = [w for w in every if isinstance(w, str)]
        try:
            if isinstance(own_error, OSError):
                raise own_error  # its errno says what to do (disk full, permission, ...)
            if failed:
                raise OSError("; ".join(failed))
            files = {name: entry for rank_files in every for name, entry in rank_files.items()}
            checkpoint.write_rest(
                tmp, step, train_state, config, tokenizer, val_loss, files, fmt="sharded"
            )
            outcome = str(checkpoint.publish(tmp.parent, tmp, step))
        except Exception as e:  # every rank must hear of it
            try:
                checkpoint.abandon_write(tmp.parent, tmp, step, e)
            except Exception as raised:
                outcome = f"error: {raised}"
                bug = None if isinstance(raised, CheckpointError) else raised
    outcome = distributed.broadcast_object(outcome, info)
    if bug is not None:
        raise bug
    if outcome.startswith("error: "):
        raise CheckpointError(outcome[len("error: ") :])
    return Path(outcome) if info.is_main else None


def load_into(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo
) -> None:
    """Read the sharded checkpoint at `path` into the (wrapped) model and its optimizer, each
    rank its own part, resharded when the world size differs from the saving run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from tinylm.train.sharded_io import MODEL_KEY, OPTIM_KEY, SafeReader, single_process_quiet

    state = _state(model, optimizer)
    try:
        with single_process_quiet():
            dcp.load(state, storage_reader=SafeReader(path), no_dist=not info.enabled)
    except Exception as e:  # DCP wraps the reader's errors in its own exception types
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise CheckpointError(
            f"{path}: the sharded checkpoint cannot be read into this run ({lines[-1][:200]}); "
            "resume from another checkpoint"
        ) from None
    parts = getattr(optimizer, "optimizers", optimizer)
    set_state_dict(
        distributed.unwrap(model),
        parts,
        model_state_dict=state[MODEL_KEY],
        optim_state_dict=state[OPTIM_KEY],
    )
