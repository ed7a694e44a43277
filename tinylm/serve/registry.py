"""Which models the server can serve, and the loaded ones (each loaded once, with its engine).

Model ids (what `/v1/models` lists and a request's `model` names):
  `RUN`              the run's newest intact checkpoint, following the run as it trains
  `RUN/step_NNNNNNNN` one checkpoint, pinned

Reload policy. A model is loaded on its first request and kept. For a `RUN` id, a request
checks (at most every `check_seconds`, a directory listing: no hashing) whether the run has a
newer intact checkpoint; if so the newer one is loaded and used from then on (`auto_reload`,
the default; `tinylm serve --no-auto-reload` turns it off). `POST /api/reload` does the same at
once. Requests already decoding finish on the model they started with: the old engine is closed
and ends when they are done. Pinned ids never change.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinylm.runs import find_runs
from tinylm.serve.engine import BatchEngine
from tinylm.tokenizer.base import Tokenizer
from tinylm.train import checkpoint


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
    loaded_at: float = field(default_factory=time.time)

    @property
    def step(self) -> int:
        return int(self.checkpoint.name.split("_")[-1])


class ModelRegistry:
    """Discovers runs under `root` (rescanned on each listing) and loads models on demand."""

    def __init__(
        self,
        root: str | Path,
        device: str | torch.device = "cpu",
        max_batch: int = 16,
        auto_reload: bool = True,
        check_seconds: float = 2.0,
    ) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"{root}: no such run or runs directory")
        self.device = device
        self.max_batch = max_batch
        self.auto_reload = auto_reload
        self.check_seconds = check_seconds
        self._loaded: dict[str, ServedModel] = {}
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def runs(self) -> dict[str, Path]:
        """Run name -> directory, for every run under the root (or the root itself)."""
        return {p.name: p for p in find_runs(self.root)}

    def model_ids(self) -> list[tuple[str, Path]]:
        """(id, checkpoint) for each servable id: every run with a checkpoint, then its checkpoints."""
        out = []
        for name, run_dir in self.runs().items():
            ckpts = [
                p
                for p in checkpoint.list_checkpoints(run_dir / "checkpoints")
                if checkpoint.check_checkpoint(p, verify_hashes=False) is None
            ]
            if ckpts:
                out.append((name, ckpts[-1]))
                out.extend((f"{name}/{p.name}", p) for p in ckpts)
        return out

    def _resolve(self, model_id: str) -> tuple[Path, Path]:
        """(run directory, checkpoint directory) for an id; UnknownModel when there is none."""
        name, _, pinned = model_id.partition("/")
        run_dir = self.runs().get(name)
        if run_dir is None:
            raise UnknownModel(f"The model '{model_id}' does not exist: see GET /v1/models")
        root = run_dir / "checkpoints"
        if pinned:
            path = root / pinned
            if not path.is_dir() or checkpoint.check_checkpoint(path, verify_hashes=False):
                raise UnknownModel(
                    f"The model '{model_id}' does not exist: run '{name}' has no intact "
                    f"checkpoint '{pinned}' (see GET /v1/models)"
                )
            return run_dir, path
        latest = checkpoint.find_latest(root, verify_hashes=False)
        if latest is None:
            raise UnknownModel(
                f"The model '{model_id}' has no checkpoint yet: wait for the run to save one"
            )
        return run_dir, latest

    def get(self, model_id: str) -> ServedModel:
        """The loaded model for an id (loading it, or a newer checkpoint of its run, if needed)."""
        with self._lock:
            served = self._loaded.get(model_id)
            pinned = "/" in model_id
            if served is not None and (pinned or not self.auto_reload):
                return served
            now = time.monotonic()
            if served is not None and now - self._checked.get(model_id, 0.0) < self.check_seconds:
                return served
            self._checked[model_id] = now
            return self._load(model_id, served)

    def reload(self, model_id: str) -> ServedModel:
        """Load the run's newest checkpoint now (a no-op when it is the one loaded)."""
        with self._lock:
            self._checked[model_id] = time.monotonic()
            return self._load(model_id, self._loaded.get(model_id))

    def loaded(self) -> list[ServedModel]:
        with self._lock:
            return list(self._loaded.values())

    def _load(self, model_id: str, current: ServedModel | None) -> ServedModel:
        run_dir, path = self._resolve(model_id)
        if current is not None and current.checkpoint == path:
            return current
        model, cfg, tokenizer, path = checkpoint.load_model(path, device=self.device)
        engine = BatchEngine(model, self.max_batch, name=f"engine-{model_id}")
        served = ServedModel(model_id, run_dir, path, tokenizer, cfg.model.context_length, engine)
        self._loaded[model_id] = served
        if current is not None:
            current.engine.close()  # its requests in flight finish on the old weights
        return served

    def close(self) -> None:
        with self._lock:
            for served in self._loaded.values():
                served.engine.close()
            self._loaded.clear()
