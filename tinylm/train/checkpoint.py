"""Checkpoints that cannot be half-written: atomic save, validation, rotation, and loading.

A checkpoint is a directory `checkpoints/step_00001000/` holding
  model.safetensors   weights (tied tensors stored once; `meta.json` names the aliases)
  train_state.pt      optimizer, grad scaler, RNG states and loop state (weights_only-loadable)
  tokenizer.json      the run's tokenizer, so the directory alone is enough for inference
  meta.json           step, validation loss, the resolved config, and size + SHA-256 of each file
It is assembled under a temporary name and renamed into place only once every file is on disk,
so a crash leaves either the previous checkpoints or a stray `.tmp-*` directory, never a
checkpoint that looks complete but is not. `meta.json`'s sizes and checksums catch the rest
(a truncated copy, a disk error): `find_latest` skips such a checkpoint with a warning.

Test hook: with `TINYLM_TEST_SLOW_CHECKPOINT=SECONDS` in the environment, `save_checkpoint`
sleeps that long after writing the weights, so tests can deliver a signal mid-write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tinylm import __version__
from tinylm.config import CheckpointConfig, Config, config_from_dict, validate
from tinylm.tokenizer import Tokenizer, tokenizer_from_file

PREFIX = "step_"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected; the message says what was found."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform (e.g. Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dedupe_shared(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): keep one, name the rest."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().contiguous().cpu()
    return unique, aliases


def numpy_rng_to_torch(state: dict[str, Any]) -> dict[str, Any]:
    """Make RNG states loadable with `torch.load(weights_only=True)` (no pickled numpy arrays)."""
    out = dict(state)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out["numpy"] = (
        kind,
        torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        pos,
        has_gauss,
        cached,
    )
    return out


def torch_rng_to_numpy(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    return out


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config: Config,
    tokenizer: Tokenizer,
    val_loss: float | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically and return its directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    tensors, aliases = _dedupe_shared(model_state)
    save_file(tensors, tmp / MODEL_FILE)
    if slow := os.environ.get("TINYLM_TEST_SLOW_CHECKPOINT"):  # see the module docstring
        time.sleep(float(slow))
    torch.save(train_state, tmp / STATE_FILE)
    tokenizer.save(tmp / TOKENIZER_FILE)
    files = {}
    for name in (MODEL_FILE, STATE_FILE, TOKENIZER_FILE):
        path = tmp / name
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        files[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    meta = {
        "step": step,
        "val_loss": val_loss,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tinylm_version": __version__,
        "aliases": aliases,
        "files": files,
        "config": config.to_dict(),
    }
    meta_tmp = tmp / (META_FILE + ".tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1))
    with open(meta_tmp, "rb+") as f:
        os.fsync(f.fileno())
    meta_tmp.replace(tmp / META_FILE)
    _fsync_dir(tmp)

    if final.exists():  # re-saving the same step (e.g. end of run right after an interval save)
        trash = root / f".trash-{final.name}-{os.getpid()}"
        final.replace(trash)
        tmp.replace(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.replace(final)
    _fsync_dir(root)
    return final


def write_run_files(run_dir: Path, config: Config, tokenizer: Tokenizer) -> None:
    """The run directory's `config.yaml` (written atomically) and `tokenizer.json`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(config.to_yaml())
    tmp.replace(run_dir / "config.yaml")
    tokenizer.save(run_dir / "tokenizer.json")


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META_FILE).read_text())


def check_checkpoint(path: Path, verify_hashes: bool = True) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it."""
    if not (path / META_FILE).is_file():
        return "no meta.json (incomplete write)"
    try:
        meta = read_meta(path)
    except (json.JSONDecodeError, OSError) as e:
        return f"unreadable meta.json ({e})"
    for name, info in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != info["bytes"]:
            return f"{name} has {size} bytes, expected {info['bytes']} (truncated?)"
        if verify_hashes and _sha256(file) != info["sha256"]:
            return f"{name} does not match its checksum (corrupt)"
    return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under `root`, oldest first (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX) :]))


def find_latest(root: str | Path, verify_hashes: bool = True) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        problem = check_checkpoint(path, verify_hashes)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}; using an earlier one", stacklevel=2)
    return None


def find_best(root: str | Path) -> Path | None:
    """The intact checkpoint with the lowest recorded validation loss."""
    best, best_loss = None, float("inf")
    for path in list_checkpoints(root):
        if check_checkpoint(path, verify_hashes=False) is None:
            loss = read_meta(path).get("val_loss")
            if loss is not None and loss < best_loss:
                best, best_loss = path, loss
    return best


def rotate(root: str | Path, cfg: CheckpointConfig) -> list[Path]:
    """Delete checkpoints outside the policy (last K, best, milestones); return those deleted."""
    root = Path(root)
    all_ckpts = list_checkpoints(root)
    intact = [p for p in all_ckpts if check_checkpoint(p, verify_hashes=False) is None]
    keep = set(intact[-cfg.keep_last :])
    if cfg.keep_best and (best := find_best(root)) is not None:
        keep.add(best)
    if cfg.milestone_interval > 0:
        keep.update(p for p in intact if read_meta(p)["step"] % cfg.milestone_interval == 0)
    deleted = []
    newest_intact = intact[-1] if intact else None
    for path in all_ckpts:
        # A damaged checkpoint newer than every intact one is left for inspection, not deleted.
        if path in keep or (newest_intact is not None and path.name > newest_intact.name):
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    # Leftovers of writes killed half-way (.tmp-*) or of a re-save killed between its renames
    # (.trash-*, the old copy of a step whose new copy is in place or was never finished).
    for stray in [*root.glob(".tmp-*"), *root.glob(".trash-*")]:
        if not stray.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stray, ignore_errors=True)
    return deleted


@dataclass
class LoadedCheckpoint:
    path: Path
    meta: dict[str, Any]
    config: Config
    model_state: dict[str, torch.Tensor]
    tokenizer: Tokenizer

    def train_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return torch.load(self.path / STATE_FILE, map_location=map_location, weights_only=True)


def resolve_checkpoint(target: str | Path, which: str = "latest") -> Path:
    """A checkpoint directory from a run directory (latest or best) or a checkpoint directory."""
    path = Path(target)
    if (path / META_FILE).is_file() and path.name.startswith(PREFIX):
        problem = check_checkpoint(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        return path
    root = path / "checkpoints"
    if not path.is_dir():
        raise CheckpointError(f"'{path}' is neither a run directory nor a checkpoint directory")
    if which not in ("latest", "best"):
        raise CheckpointError(f"checkpoint selector must be 'latest' or 'best', got {which!r}")
    found = find_best(root) if which == "best" else find_latest(root)
    if found is None and which == "best":
        found = find_latest(root)
    if found is None:
        raise CheckpointError(
            f"no intact checkpoint in {root}: train first (`tinylm train ...`), or check the path"
        )
    return found


def load_checkpoint(target: str | Path, which: str = "latest") -> LoadedCheckpoint:
    """Load weights, config and tokenizer (not the optimizer) from a run or checkpoint dir."""
    path = resolve_checkpoint(target, which)
    meta = read_meta(path)
    config = config_from_dict(meta["config"])
    validate(config)
    state = load_file(path / MODEL_FILE)
    for alias, source in meta.get("aliases", {}).items():
        state[alias] = state[source]
    tokenizer = tokenizer_from_file(path / TOKENIZER_FILE)
    return LoadedCheckpoint(path, meta, config, state, tokenizer)


def load_model(target: str | Path, which: str = "latest", device: str | torch.device = "cpu"):
    """A ready-to-use model for inference: `(model, config, tokenizer, checkpoint_path)`."""
    from tinylm.model import GPT

    ckpt = load_checkpoint(target, which)
    model = GPT(ckpt.config.model)
    model.load_state_dict(ckpt.model_state)
    model.to(device).eval()
    return model, ckpt.config, ckpt.tokenizer, ckpt.path
