"""Which models the server can serve, and the loaded ones (each checkpoint loaded once).

Model ids (what `/v1/models` lists and a request's `model` names):
  `RUN`              the run's newest intact checkpoint, following the run as it trains
  `RUN/step_NNNNNNNN` one checkpoint, pinned

Confinement and canonical ids. An id is parsed, never joined onto a path: `RUN` must be one of
the runs found under the served root and `step_N` a checkpoint name (`step_30` and
`step_00000030` are the same checkpoint; `.`, empty parts and a trailing `/` are dropped; `..`
or any other part is an unknown model). The run directory and the checkpoint directory must
lie inside the served root after resolving symlinks, so a link to another disk location is not
served. Loaded models are keyed by the checkpoint's real path: every spelling of an id, and a
run id and the pinned id of the same checkpoint, share one loaded model and one engine.

Memory. At most `max_models` checkpoints stay loaded (least recently used first out); an
evicted or replaced model's engine is closed, so its thread ends once its requests are done
(no thread or memory grows per load). `memory()` reports RSS, threads and parameter bytes.

Reload policy. A model is loaded on its first request and kept. For a `RUN` id, a request
checks (at most every `check_seconds`, a directory listing: no hashing) whether the run has a
newer intact checkpoint; if so the newer one is loaded and used from then on (`auto_reload`,
the default; `tinylm serve --no-auto-reload` turns it off). `POST /api/reload` does the same at
once. Requests already decoding finish on the model they started with: the old engine is closed
and ends when they are done. Pinned ids never change.

Rotation. A training run deletes old checkpoints while the server reads them. A run id is
therefore loaded through the run directory (`checkpoint.load_model(run_dir)`, which resolves
the newest checkpoint again when the one it found is rotated away mid-read) and keyed by the
checkpoint actually read; a pinned checkpoint that disappears is an unknown model (404), and
files vanishing while a listing looks at them are skipped, never an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from tinylm.runs import find_runs
from tinylm.serve.engine import BatchEngine
from tinylm.tokenizer.base import Tokenizer
from tinylm.train import checkpoint

log = logging.getLogger("tinylm.serve")

# Each loaded model holds its weights and a KV cache of max_batch rows (the `small` preset at
# context 1024 and 16 rows: ~0.5 GiB); 4 covers comparing a few runs without unbounded growth.
DEFAULT_MAX_MODELS = 4
# How long a run id's load keeps trying while rotation deletes what it reads (see `_read`).
RUN_LOAD_SECONDS = 60.0


class UnknownModel(LookupError):
    """A request named a model id the server does not have (HTTP 404)."""


@dataclass
class ServedModel:
    """A loaded checkpoint with its tokenizer and batching engine."""

    model_id: str
    run_dir: Path
    checkpoint: Path
    tokenizer: Tokenizer
    context_length: int
    engine: BatchEngine
    parameter_bytes: int = 0
    loaded_at: float = field(default_factory=time.time)

    @property
    def step(self) -> int:
        return int(self.checkpoint.name.split("_")[-1])


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def parse_id(model_id: str) -> tuple[str, int | None]:
    """(run name, pinned step or None) of an id; UnknownModel when it is not of either form."""
    parts = [p for p in model_id.split("/") if p not in ("", ".")]
    pinned = re.fullmatch(r"step_(\d{1,12})", parts[1]) if len(parts) == 2 else None
    if not (len(parts) == 1 or pinned) or parts[0] == "..":
        raise UnknownModel(
            f"The model '{model_id[:200]}' does not exist: ids are RUN or RUN/step_N for the runs "
            "under the served directory (see GET /v1/models)"
        )
    return parts[0], int(pinned.group(1)) if pinned else None


def canonical_id(model_id: str) -> str:
    """The one spelling of an id: `RUN` or `RUN/step_NNNNNNNN`."""
    name, step = parse_id(model_id)
    return name if step is None else f"{name}/{checkpoint.checkpoint_name(step)}"


def process_memory() -> dict[str, int]:
    """This process's resident memory and thread count (what /health reports)."""
    proc = psutil.Process()
    return {"rss_bytes": proc.memory_info().rss, "threads": proc.num_threads()}


class ModelRegistry:
    """Discovers runs under `root` (rescanned on each listing) and loads models on demand."""

    def __init__(
        self,
        root: str | Path,
        device: str | torch.device = "cpu",
        max_batch: int = 16,
        auto_reload: bool = True,
        check_seconds: float = 2.0,
        max_models: int = DEFAULT_MAX_MODELS,
    ) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"{root}: no such run or runs directory")
        if not self.root.is_dir():
            raise NotADirectoryError(
                f"{root} is a file: serve a runs directory or one run directory (with checkpoints/)"
            )
        self.real_root = self.root.resolve()
        self.device = device
        self.max_batch = max_batch
        self.auto_reload = auto_reload
        self.check_seconds = check_seconds
        self.max_models = max_models
        # checkpoint real path -> model, least recently used first
        self._loaded: OrderedDict[Path, ServedModel] = OrderedDict()
        self._following: dict[str, Path] = {}  # run id -> real path of the checkpoint it serves
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()
        self._id_locks: dict[str, threading.Lock] = {}  # one load at a time per id
        self._refreshing: set[str] = set()  # run ids whose newer checkpoint is loading
        self._closed = False
        self.evicted = 0

    def runs(self) -> dict[str, Path]:
        """Run name -> directory, for every run under the root (or the root itself) whose real
        location is inside the root (a symlink to a run elsewhere is not served)."""
        out = {}
        for p in find_runs(self.root):
            try:
                real = p.resolve()
            except OSError:
                continue
            if _inside(real, self.real_root):
                out[p.name] = p
        return out

    def _intact(self, run_dir: Path) -> list[Path]:
        ckpts = []
        for p in checkpoint.list_checkpoints(run_dir / "checkpoints"):
            try:
                ok = checkpoint.check_checkpoint(p, verify_hashes=False) is None
            except OSError:  # rotated away while being looked at
                continue
            if ok and _inside(p.resolve(), self.real_root):
                ckpts.append(p)
        return ckpts

    def model_ids(self) -> list[tuple[str, Path]]:
        """(id, checkpoint) for each servable id: every run with a checkpoint, then its checkpoints."""
        out = []
        for name, run_dir in self.runs().items():
            ckpts = self._intact(run_dir)
            if ckpts:
                out.append((name, ckpts[-1]))
                out.extend((f"{name}/{p.name}", p) for p in ckpts)
        return out

    def _run_dir(self, model_id: str, name: str) -> Path:
        run_dir = self.runs().get(name)
        if run_dir is None:
            raise UnknownModel(f"The model '{model_id[:200]}' does not exist: see GET /v1/models")
        return run_dir

    def get(self, model_id: str) -> ServedModel:
        """The loaded model for an id (loading it if needed; a run id whose run has a newer
        checkpoint is served on the loaded one while the newer one loads in the background)."""
        return self._get(canonical_id(model_id), force=False)

    def reload(self, model_id: str) -> ServedModel:
        """Load the run's newest checkpoint now (a no-op when it is the one loaded)."""
        return self._get(canonical_id(model_id), force=True)

    def _get(self, model_id: str, force: bool) -> ServedModel:
        # Loading happens outside the registry lock (requests for loaded models never wait
        # for a load), one load per id at a time (a cold id hit by 32 clients loads once).
        name, step = parse_id(model_id)
        with self._lock:
            run_dir = self._run_dir(model_id, name)
            if not force and (served := self._cached(model_id, run_dir, step)) is not None:
                return served
            id_lock = self._id_locks.setdefault(model_id, threading.Lock())
        with id_lock:
            with self._lock:
                if not force and (served := self._cached(model_id, run_dir, step)) is not None:
                    return served
                target = self._target(model_id, run_dir, step)
                if isinstance(target, ServedModel):
                    return target
            try:
                loaded = self._read(target)
            except (FileNotFoundError, checkpoint.CheckpointError) as e:
                if step is not None and not target.exists():  # rotated away meanwhile
                    raise self._missing(model_id, run_dir, step) from None
                with self._lock:
                    current = self._loaded.get(self._following.get(model_id))
                if step is not None or current is None:
                    raise
                # A reload that lost every race with rotation: the loaded checkpoint still
                # serves (the next check or reload tries again), not an error for the client.
                log.warning(
                    "reloading %s failed, still serving %s: %s", model_id, current.checkpoint, e
                )
                return current
            with self._lock:
                return self._install(model_id, run_dir, loaded, follow=step is None)

    def _missing(self, model_id: str, run_dir: Path, step: int) -> UnknownModel:
        return UnknownModel(
            f"The model '{model_id}' does not exist: run '{run_dir.name}' has no intact "
            f"checkpoint '{checkpoint.checkpoint_name(step)}' (see GET /v1/models)"
        )

    def _cached(self, model_id: str, run_dir: Path, step: int | None) -> ServedModel | None:
        """The loaded model for an id, if any (under the lock). A run id past its check
        interval starts a background load of its run's newer checkpoint, if there is one."""
        if step is not None:
            try:
                key = (run_dir / "checkpoints" / checkpoint.checkpoint_name(step)).resolve()
            except OSError:
                return None
        else:
            key = self._following.get(model_id)
        served = self._loaded.get(key) if key is not None else None
        if served is None:
            return None
        self._loaded.move_to_end(key)
        now = time.monotonic()
        due = now - self._checked.get(model_id, 0.0) >= self.check_seconds
        if step is None and self.auto_reload and due:
            self._checked[model_id] = now
            self._refresh_later(model_id, run_dir)
        return served

    def _target(self, model_id: str, run_dir: Path, step: int | None) -> Path | ServedModel:
        """What to load for an id (under the lock): a checkpoint directory (pinned), the run
        directory (a run id: the loader picks the newest intact checkpoint as it reads), or
        the model already loaded from the same checkpoint under another id."""
        if step is not None:
            path = run_dir / "checkpoints" / checkpoint.checkpoint_name(step)
            try:
                real = path.resolve()
                if not path.is_dir() or checkpoint.check_checkpoint(path, verify_hashes=False):
                    raise self._missing(model_id, run_dir, step)
            except OSError:
                raise self._missing(model_id, run_dir, step) from None
            if not _inside(real, self.real_root):
                raise self._missing(model_id, run_dir, step)
            if real in self._loaded:
                self._loaded.move_to_end(real)
                return self._loaded[real]
            return path
        self._checked[model_id] = time.monotonic()
        try:
            newest = checkpoint.find_latest(run_dir / "checkpoints", verify_hashes=False)
        except OSError:  # a checkpoint vanished during the listing: the load looks again
            newest = None
        if newest is not None:
            real = newest.resolve()
            if real in self._loaded and _inside(real, self.real_root):
                self._loaded.move_to_end(real)
                self._switch(model_id, real)
                return self._loaded[real]
        elif not self._intact(run_dir):
            raise UnknownModel(
                f"The model '{model_id}' has no checkpoint yet: wait for the run to save one"
            )
        # The run directory, not `newest`: if rotation deletes the checkpoint found above
        # before it is read, the loader resolves the run's newest one again.
        return run_dir

    def _refresh_later(self, run_id: str, run_dir: Path) -> None:
        """Load a run's newer checkpoint in a short-lived thread (under the lock)."""
        if run_id in self._refreshing or self._closed:
            return
        try:
            newest = checkpoint.find_latest(run_dir / "checkpoints", verify_hashes=False)
        except OSError:
            return  # rotating right now: the next check looks again
        if newest is None or newest.resolve() == self._following.get(run_id):
            return
        self._refreshing.add(run_id)
        threading.Thread(
            target=self._refresh, args=(run_id, run_dir), name=f"reload-{run_id}", daemon=True
        ).start()

    def _refresh(self, run_id: str, run_dir: Path) -> None:
        try:
            loaded = self._read(run_dir)
        except Exception as e:  # a thread's error would otherwise be lost
            # The loaded checkpoint stays in service; the next check tries again.
            log.warning("reloading %s failed, still serving the loaded checkpoint: %s", run_id, e)
            loaded = None
        with self._lock:
            self._refreshing.discard(run_id)
            if loaded is not None and not self._closed:
                with contextlib.suppress(UnknownModel):
                    self._install(run_id, run_dir, loaded, follow=True)

    def _read(self, target: Path) -> tuple:
        """`checkpoint.load_model(target)`; for a run directory, again while training keeps
        rotating the checkpoint being read away (a loaded machine lost the loader's own 10 s of
        retries to a checkpoint every few seconds: tests in notes/issue-21-serve.md). A failure
        with the same newest checkpoint before and after is a real one and raised at once."""
        deadline = time.monotonic() + RUN_LOAD_SECONDS
        while True:
            before = self._newest_name(target)
            try:
                return checkpoint.load_model(target, device=self.device)
            except (FileNotFoundError, checkpoint.CheckpointError):
                if before is None or time.monotonic() > deadline:
                    raise
                if self._newest_name(target) == before:
                    raise

    @staticmethod
    def _newest_name(target: Path) -> str | None:
        """The newest checkpoint's name when `target` is a run directory, else None."""
        try:
            names = [p.name for p in checkpoint.list_checkpoints(target / "checkpoints")]
        except OSError:
            return ""
        return names[-1] if names else None

    def _switch(self, run_id: str, new: Path) -> None:
        old = self._following.get(run_id)
        self._following[run_id] = new
        if old is None or old == new or old in self._following.values():
            return
        # The run moved on: its previous checkpoint is only reachable pinned (loaded again on
        # demand); its engine ends once the requests decoding on it are done.
        if (served := self._loaded.pop(old, None)) is not None:
            served.engine.close()

    def _install(self, model_id: str, run_dir: Path, loaded: tuple, follow: bool) -> ServedModel:
        """Put a loaded checkpoint in service (under the lock), once per real path."""
        model, cfg, tokenizer, path = loaded
        real = path.resolve()
        if not _inside(real, self.real_root):
            raise UnknownModel(f"The model '{model_id}' does not exist: see GET /v1/models")
        served = self._loaded.get(real)
        if served is None:  # else another id loaded the same checkpoint meanwhile
            engine = BatchEngine(model, self.max_batch, name=f"engine-{model_id}")
            size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            served = ServedModel(
                model_id, run_dir, path, tokenizer, cfg.model.context_length, engine, size
            )
            self._loaded[real] = served
        self._loaded.move_to_end(real)
        if follow:
            self._switch(model_id, real)
        self._evict()
        return served

    def _evict(self) -> None:
        """Close the least recently used models beyond `max_models`: their requests in flight
        finish on them, then their engine threads end."""
        while len(self._loaded) > self.max_models:
            _, served = self._loaded.popitem(last=False)
            served.engine.close()
            self.evicted += 1
        for run_id, key in list(self._following.items()):
            if key not in self._loaded:
                del self._following[run_id]

    def loaded(self) -> list[ServedModel]:
        with self._lock:
            return list(self._loaded.values())

    def memory(self) -> dict[str, int]:
        """RSS, threads, models loaded and their parameter bytes (for /health)."""
        with self._lock:
            params = sum(s.parameter_bytes for s in self._loaded.values())
            count = len(self._loaded)
        return {
            **process_memory(),
            "models_loaded": count,
            "max_models": self.max_models,
            "parameter_bytes": params,
            "models_evicted": self.evicted,
            "pid": os.getpid(),
        }

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for served in self._loaded.values():
                served.engine.close()
            self._loaded.clear()
            self._following.clear()
