"""Checkpoints that cannot be half-written: atomic save, validation, rotation, and loading.

A checkpoint is a directory `checkpoints/step_00001000/` holding
  model.safetensors   weights (tied tensors stored once; `meta.json` names the aliases)
  train_state.pt      optimizer, grad scaler, RNG states and loop state (weights_only-loadable)
  tokenizer.json      the run's tokenizer, so the directory alone is enough for inference
  meta.json           step, validation loss, loop state (tokens seen, ...), the resolved config,
                      and size + SHA-256 of each file
A sharded checkpoint (`checkpoint.format=sharded`, `meta.json` says `"format": "sharded"`) holds
torch.distributed.checkpoint's files instead of `model.safetensors`: `.metadata` (the index) and
one `__R_0.distcp` per rank holding that rank's shards of the weights and the optimizer state;
`train_state.pt` then holds the rest (scaler, RNG, loop). The same atomic write, checks, rotation
and loading apply; readers consolidate the weights in one process (`sharded_io.py`).
It is assembled under a temporary name and renamed into place only once every file is on disk,
so a crash leaves either the previous checkpoints or a stray `.tmp-*` directory, never a
checkpoint that looks complete but is not. `meta.json`'s sizes and checksums catch the rest
(a truncated copy, a disk error): `find_latest` skips such a checkpoint with a warning.

Everything read back is checked before use: `meta.json` against its schema (file names must be
plain names inside the checkpoint: `../x` or `/x` is refused before anything is opened or
hashed), `train_state.pt` is loaded with `weights_only=True` and checked for its keys (a file
that is refused is "not a tinylm checkpoint", never "load it unsafely"), the weights' names and
shapes against the model the saved config describes, and the tokenizer's vocabulary against the
model's. Only directories named exactly `step_NNNNNNNN` are checkpoints; a look-alike
(`step_00000060.bak`, a user's copy) is ignored with a note and never rotated away.

A write that fails (disk full, read-only, permission) removes its temporary directory and raises
`CheckpointError` naming the path; the previous checkpoints are untouched, so the run resumes
from the last of them once the problem is fixed. Readers (`tinylm eval`/`generate` during a run)
that lose a race with rotation resolve the checkpoint again.

Test hook: with `TINYLM_TEST_SLOW_CHECKPOINT=SECONDS` in the environment, `save_checkpoint`
sleeps that long after writing the weights, so tests can deliver a signal mid-write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tinylm import __version__
from tinylm.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    ModelConfig,
    config_from_dict,
    validate,
)
from tinylm.errors import CheckpointError  # re-exported: callers import it from here
from tinylm.fileio import atomic_write_text, confined, make_dir, os_error_message
from tinylm.finite import check_finite
from tinylm.tokenizer import Tokenizer, TokenizerError, tokenizer_from_file

PREFIX = "step_"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})$")
# Leftovers of our own interrupted writes: `.tmp-step_N-PID` and `.trash-step_N-PID`.
STRAY_NAME = re.compile(r"^\.(?:tmp|trash)-step_\d{8,}-(\d+)$")
REQUIRED_FILES = (MODEL_FILE, STATE_FILE, TOKENIZER_FILE)
FORMATS = ("full", "sharded")
SHARD_INDEX = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint


_noted: set[str] = set()


def _note(message: str) -> None:
    """A one-time note on stderr (not a warning: nothing is wrong with the run)."""
    if message not in _noted:
        _noted.add(message)
        print(f"note: {message}", file=sys.stderr)


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
    """Write checkpoint `step` under `root` atomically and return its directory.

    A failed write (disk full, read-only, permission) leaves no trace and raises
    CheckpointError; the checkpoints already under `root` are untouched.
    """
    root, tmp = begin_write(root, step)
    try:
        tensors, aliases = _dedupe_shared(model_state)
        save_file(tensors, tmp / MODEL_FILE)
        slow_checkpoint_hook()
        files = hash_files(tmp, [MODEL_FILE])
        write_rest(tmp, step, train_state, config, tokenizer, val_loss, files, aliases=aliases)
    except BaseException as e:
        abandon_write(root, tmp, step, e)
    return publish(root, tmp, step)


def begin_write(root: str | Path, step: int) -> tuple[Path, Path]:
    """`(root, tmp)`: the checkpoint directory (created) and an empty temporary directory in it
    where checkpoint `step` is assembled (CheckpointError naming the path when that fails)."""
    root = make_dir(root, CheckpointError, "checkpoint directory")
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(_write_failure(e, root, step)) from None
    return root, tmp


def abandon_write(root: Path, tmp: Path, step: int, error: BaseException) -> None:
    """Remove the temporary directory of a failed write and raise: CheckpointError for an OS
    error (disk full, read-only, permission), `error` itself otherwise."""
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(error, OSError):
        raise CheckpointError(_write_failure(error, root, step)) from None
    raise error


def slow_checkpoint_hook() -> None:
    """Test hook: sleep `TINYLM_TEST_SLOW_CHECKPOINT` seconds mid-write (see the module docstring)."""
    if slow := os.environ.get("TINYLM_TEST_SLOW_CHECKPOINT"):
        time.sleep(float(slow))


def publish(root: Path, tmp: Path, step: int) -> Path:
    """Rename the complete `tmp` into place as checkpoint `step`; its final path."""
    final = root / checkpoint_name(step)
    if final.exists():  # re-saving the same step (e.g. end of run right after an interval save)
        trash = root / f".trash-{final.name}-{os.getpid()}"
        final.replace(trash)
        tmp.replace(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.replace(final)
    _fsync_dir(root)
    return final


def _write_failure(e: OSError, root: Path, step: int) -> str:
    previous = [p for p in list_checkpoints(root) if p.name != checkpoint_name(step)]
    kept = (
        f"the previous checkpoint {previous[-1]} is intact, so the run can be resumed from it"
        if previous
        else "no earlier checkpoint exists"
    )
    return f"{os_error_message(e, root, f'write checkpoint {checkpoint_name(step)} into')}. Nothing was half-written: {kept}"


def hash_files(directory: Path, names: Collection[str]) -> dict[str, dict[str, Any]]:
    """`{name: {bytes, sha256}}` of files in `directory`, each fsync'ed first (meta.json's
    `files` entries; under a sharded save each rank hashes the files it wrote)."""
    files = {}
    for name in names:
        path = directory / name
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        files[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return files


def write_rest(
    tmp: Path,
    step: int,
    train_state: dict[str, Any],
    config: Config,
    tokenizer: Tokenizer,
    val_loss: float | None,
    files: dict[str, dict[str, Any]],
    *,
    aliases: dict[str, str] | None = None,
    fmt: str = "full",
) -> None:
    """The training state, tokenizer and `meta.json` (last) of a checkpoint whose weights are
    written already (`files`: their sizes and hashes)."""
    torch.save(train_state, tmp / STATE_FILE)
    tokenizer.save(tmp / TOKENIZER_FILE)
    files = {**files, **hash_files(tmp, [STATE_FILE, TOKENIZER_FILE])}
    meta = {
        "step": step,
        "val_loss": val_loss,
        # The loop state (tokens seen, ...) also here, so `tinylm runs` reads a run's progress
        # from its checkpoint without loading the optimizer state.
        "loop": train_state.get("loop"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tinylm_version": __version__,
        "format": fmt,
        "aliases": aliases or {},
        "files": files,
        "config": config.to_dict(),
    }
    atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1))
    _fsync_dir(tmp)


def write_run_files(run_dir: Path, config: Config, tokenizer: Tokenizer | None = None) -> None:
    """The run directory's `config.yaml` and `tokenizer.json` (each written atomically);
    without a tokenizer, only the config (a setting fixed during the run, e.g. a fitted max_steps)."""
    make_dir(run_dir, CheckpointError, "run directory")
    try:
        atomic_write_text(run_dir / "config.yaml", config.to_yaml())
        if tokenizer is not None:
            tokenizer.save(run_dir / "tokenizer.json")
    except OSError as e:
        raise CheckpointError(os_error_message(e, run_dir, "write the run files into")) from None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META_FILE).read_text())


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def meta_problem(path: Path, meta: Any) -> str | None:
    """None if `meta` (read from `path/meta.json`) has the shape this version writes, else why not."""
    if not isinstance(meta, dict):
        return f"meta.json holds a {type(meta).__name__}, not an object"
    if not _is_count(meta.get("step")):
        return f"meta.json: 'step' is {meta.get('step')!r}, not a step number"
    match = CHECKPOINT_NAME.match(path.name)
    if match and int(match.group(1)) != meta["step"]:
        return f"meta.json says step {meta['step']}, the directory name says {int(match.group(1))}"
    loss = meta.get("val_loss")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        return f"meta.json: 'val_loss' is {loss!r}, not a number"
    if not isinstance(meta.get("config"), dict):
        return "meta.json has no 'config' object"
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        return "meta.json: 'aliases' must map tensor names to tensor names"
    fmt = meta.get("format", "full")  # absent in checkpoints written before the format existed
    if fmt not in FORMATS:
        return f"meta.json: 'format' is {fmt!r}, not one of {', '.join(FORMATS)}"
    required = required_files(fmt)
    files = meta.get("files")
    if not isinstance(files, dict) or not set(required) <= set(files):
        return f"meta.json must list {', '.join(required)} under 'files'"
    for name, info in files.items():
        try:
            confined(path, name, path / META_FILE)
        except ValueError as e:
            return str(e)
        if not (
            isinstance(info, dict)
            and _is_count(info.get("bytes"))
            and isinstance(info.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", info["sha256"])
        ):
            return f"meta.json: the entry for {name} needs 'bytes' and a hex 'sha256'"
    return None


def required_files(fmt: str) -> tuple[str, ...]:
    """The files a checkpoint of format `fmt` cannot be without (a sharded one's shard files
    are listed in its meta.json, one per rank that wrote any)."""
    if fmt == "sharded":
        return (SHARD_INDEX, STATE_FILE, TOKENIZER_FILE)
    return REQUIRED_FILES


def check_checkpoint(path: Path, verify_hashes: bool = True) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it."""
    if not (path / META_FILE).is_file():
        return "no meta.json (incomplete write)"
    try:
        meta = read_meta(path)
    except (ValueError, OSError) as e:
        return f"unreadable meta.json ({e})"
    if problem := meta_problem(path, meta):
        return problem
    for name, info in meta["files"].items():
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
    """Checkpoint directories under `root`, oldest first (by step).

    Only names of the form `step_NNNNNNNN`; a look-alike (`step_00000060.bak`) is noted and left alone.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = []
    for p in root.iterdir():
        if not p.name.startswith(PREFIX):
            continue
        if CHECKPOINT_NAME.match(p.name) and p.is_dir():
            dirs.append(p)
        else:
            _note(
                f"ignoring {p}: not a checkpoint directory name tinylm writes (a copy or a backup?)"
            )
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
            try:
                loss = read_meta(path).get("val_loss")
            except OSError:  # deleted by the writer's rotation since the check
                continue
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
    for stray in root.iterdir():
        match = STRAY_NAME.match(stray.name)
        if match and int(match.group(1)) != os.getpid():
            shutil.rmtree(stray, ignore_errors=True)
    return deleted


@dataclass
class LoadedCheckpoint:
    path: Path
    meta: dict[str, Any]
    config: Config
    model_state: dict[str, torch.Tensor]  # meta-device tensors: a sharded one not consolidated
    tokenizer: Tokenizer

    @property
    def format(self) -> str:
        return self.meta.get("format", "full")

    @property
    def consolidated(self) -> bool:
        """False for a sharded checkpoint loaded for resuming: `model_state` holds the shapes
        only, and the weights are read into the wrapped model (`sharded.load_into`)."""
        return all(t.device.type != "meta" for t in self.model_state.values())

    def train_state(
        self,
        map_location: str | torch.device = "cpu",
        loop_fields: Collection[str] | None = None,
    ) -> dict[str, Any]:
        """Optimizer, scaler, RNG and loop state, checked (`loop_fields`: the keys 'loop' may hold)."""
        return read_train_state(
            self.path,
            self.meta["step"],
            map_location,
            loop_fields,
            sharded=self.format == "sharded",
        )


def read_train_state(
    path: Path,
    step: int,
    map_location: str | torch.device = "cpu",
    loop_fields: Collection[str] | None = None,
    sharded: bool = False,
) -> dict[str, Any]:
    """`path/train_state.pt`, loaded with `weights_only=True` and checked against its schema
    (a sharded checkpoint's optimizer state is in its shards, not in this file)."""
    file = path / STATE_FILE
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except OSError as e:
        raise CheckpointError(os_error_message(e, file, "read")) from None
    except Exception as e:  # torch raises many types for a foreign file
        # torch's own message suggests `weights_only=False`, which would run whatever code the
        # file holds: never pass that advice on. The file is simply not ours.
        raise CheckpointError(
            f"{file} is not a tinylm checkpoint's training state: it cannot be read as tensors "
            f"and plain data ({type(e).__name__}), so it was not loaded. Resume from another "
            "checkpoint, or start a new run"
        ) from None

    def bad(what: str) -> CheckpointError:
        return CheckpointError(
            f"{file}: {what}; it is not a training state this tinylm wrote. Resume from another "
            "checkpoint, or start a new run"
        )

    if not isinstance(state, dict):
        raise bad(f"holds a {type(state).__name__}, not a dict")
    if not sharded and not _is_optimizer_state(state.get("optimizer")):
        raise bad("no optimizer state ('optimizer' with 'state' and 'param_groups')")
    if not isinstance(state.get("rng"), list) or not state["rng"]:
        raise bad("no RNG states ('rng')")
    if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
        raise bad("'scaler' is neither a grad-scaler state nor empty")
    loop = state.get("loop")
    if not isinstance(loop, dict) or not all(
        v is None or isinstance(v, (int, float)) for v in loop.values()
    ):
        raise bad("'loop' must map names to numbers")
    if loop_fields is not None and (unknown := set(loop) - set(loop_fields)):
        raise bad(f"unknown loop-state keys {sorted(unknown)}")
    if loop.get("step") != step:
        raise bad(f"its loop state is at step {loop.get('step')!r}, the checkpoint at step {step}")
    return state


def _is_optimizer_state(value: Any) -> bool:
    """A torch optimizer's state dict, or a composite's dict of them (Muon + AdamW)."""
    if not isinstance(value, dict) or not value:
        return False
    if "param_groups" in value:
        return isinstance(value.get("state"), dict) and isinstance(value["param_groups"], list)
    return all(_is_optimizer_state(part) for part in value.values())


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


def load_checkpoint(
    target: str | Path, which: str = "latest", consolidate: bool = True
) -> LoadedCheckpoint:
    """Load weights, config and tokenizer (not the optimizer) from a run or checkpoint dir.

    Everything is checked against everything else before it is returned (see the module
    docstring). A sharded checkpoint's weights are consolidated in this process, without a
    process group; with `consolidate=False` (resuming: each rank reads its own shards later)
    only their shapes are read, as meta-device tensors. A checkpoint rotated away by a training run between being found and being read
    is resolved again: rotation deletes only after a newer checkpoint is complete.
    """
    # Each retry means a newer checkpoint was completed meanwhile. A deadline, not a count: a
    # reader slower than a training step (a checkpoint every step, keep_last=1, a loaded
    # machine) lost 10 tries in a row in 2 of 4 runs of tests/test_concurrency.py.
    deadline = time.monotonic() + 10.0
    # Only a read that began with a checkpoint on disk can lose a race with rotation: a path
    # that does not exist, or a run without checkpoints, is refused at once (a mistyped run
    # path used to cost the whole 10 s). And only a failure while the checkpoints on disk
    # changed is a lost race: a damaged checkpoint that nothing touches is refused at once
    # (each corrupt-checkpoint test used to wait out the 10 s).
    target = Path(target)
    existed = _holds_checkpoint(target)
    before = _disk_state(target)
    while True:
        try:
            return _load(resolve_checkpoint(target, which), consolidate)
        except (FileNotFoundError, CheckpointError):
            now = _disk_state(target)
            if not existed or now == before or time.monotonic() > deadline:
                raise
            before = now  # rotation moved something: the newer checkpoint is complete by now
            time.sleep(0.02)


def _disk_state(target: Path) -> frozenset[tuple[str, tuple[str, ...]]]:
    """The checkpoint directories at `target` (a checkpoint, or a run's `checkpoints/`) with
    the names of their files: what a rotation or a newly saved checkpoint changes."""
    if (target / META_FILE).is_file() or CHECKPOINT_NAME.match(target.name):
        dirs = [target]
    else:
        dirs = _entries(target / "checkpoints")
    return frozenset((d.name, tuple(sorted(e.name for e in _entries(d)))) for d in dirs)


def _holds_checkpoint(path: Path) -> bool:
    """True if `path` is a checkpoint directory or a run directory with checkpoints."""
    return (path / META_FILE).is_file() or any(
        CHECKPOINT_NAME.match(p.name) for p in _entries(path / "checkpoints")
    )


def _entries(root: Path) -> list[Path]:
    try:
        return list(root.iterdir())
    except OSError:
        return []


def _load(path: Path, consolidate: bool = True) -> LoadedCheckpoint:
    meta = read_meta(path)
    try:
        config = config_from_dict(meta["config"])
        validate(config)
    except ConfigError as e:
        raise CheckpointError(
            f"{path / META_FILE}: its config is not valid for this tinylm ({e})"
        ) from None
    if meta.get("format", "full") == "sharded":
        from tinylm.train import sharded_io

        file = path / SHARD_INDEX
        state = sharded_io.read_model(path, file, consolidate, CheckpointError)
    else:
        file = path / MODEL_FILE
        state = _read_safetensors(file)
    for alias, source in meta.get("aliases", {}).items():
        if source not in state:
            raise CheckpointError(
                f"{path / META_FILE}: alias {alias!r} names {source!r}, which is not in {MODEL_FILE}"
            )
        state[alias] = state[source]
    check_weights(file, state, config)
    # Shapes only (a sharded one read for resuming): the run checks its weights at its first log line.
    if not any(t.is_meta for t in state.values()):
        check_finite(state, f"checkpoint {path}", CheckpointError)  # generate, eval, export, serve
    try:
        tokenizer = tokenizer_from_file(path / TOKENIZER_FILE)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if tokenizer.vocab_size > config.model.vocab_size:
        raise CheckpointError(
            f"{path / TOKENIZER_FILE}: {tokenizer.vocab_size:,} tokens, more than the model's "
            f"{config.model.vocab_size:,} (model.vocab_size in {path / META_FILE}): the tokenizer "
            "is not the one this model was trained with"
        )
    return LoadedCheckpoint(path, meta, config, state, tokenizer)


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({type(e).__name__}: {e})"
        ) from None


def shape_changes(weights: dict[str, Any], model_cfg: ModelConfig) -> list[str]:
    """How the tensors of `weights` differ from those of a model built from `model_cfg`:
    missing, unexpected, or of another shape (the model is built on the meta device: shapes
    only, no memory, no initialisation cost)."""
    from tinylm.model import GPT

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(model_cfg).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    out = [
        f"{k}: {list(found[k])} -> {list(shape)}"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    out += [f"{k}: new in this config" for k in expected if k not in found]
    out += [f"{k}: not in this config" for k in found if k not in expected]
    return out


def check_weights(file: Path, state: dict[str, torch.Tensor], config: Config) -> None:
    """Refuse weights whose names or shapes differ from the model `config` describes."""
    if changes := shape_changes(state, config.model):
        shown = "; ".join(changes[:3]) + (
            f"; ... {len(changes) - 3} more" if len(changes) > 3 else ""
        )
        raise CheckpointError(
            f"{file}: the weights do not fit the model its config describes ({shown}); "
            "the files of this checkpoint do not belong together"
        )


def load_model(target: str | Path, which: str = "latest", device: str | torch.device = "cpu"):
    """A ready-to-use model for inference: `(model, config, tokenizer, checkpoint_path)`."""
    from tinylm.model import GPT

    ckpt = load_checkpoint(target, which)
    model = GPT(ckpt.config.model)
    model.load_state_dict(ckpt.model_state)
    model.to(device).eval()
    return model, ckpt.config, ckpt.tokenizer, ckpt.path
