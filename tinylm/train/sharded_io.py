"""A sharded checkpoint's files read in one process, without a process group.

torch.distributed.checkpoint (DCP) writes an index (`.metadata`, the global shape and dtype of
every tensor and where its chunks are) and one `__R_0.distcp` file per rank. This module reads
them for the consumers that want whole weights in one process (`tinylm generate`, `eval`,
`export`, `serve`, `train.init_from`): the index alone gives the shapes, and DCP's own loader
(`no_dist=True`) assembles each tensor from the chunks every rank wrote, whatever the world size
of the run that saved it. The collective save and the resharding load of a run are in
`sharded.py`.

The index is a pickle, and DCP's reader unpickles it with no restriction: a foreign or edited
`.metadata` could run code. `SafeReader` reads it with an unpickler that admits only the classes
DCP's index consists of (its metadata dataclasses, torch dtypes and sizes, paths), so a file
that is not an index is refused, never loaded unsafely; the shard files themselves are read
with `torch.load(weights_only=True)` by DCP already.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

MODEL_KEY = "model"  # the saved state dict is {"model": weights, "optim": optimizer state}
OPTIM_KEY = "optim"

# (module, name) the index pickle may reference; everything else is refused.
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns on every save or load without a process group that it assumes one process:
    that is what tinylm asks for there (`no_dist=True`), so the warning says nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        yield


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


class SafeReader(FileSystemReader):
    """DCP's file-system reader with the index read through `_IndexUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _IndexUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not an index")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_index(path: Path, error: Callable[[str], Exception]) -> Metadata:
    """The DCP index of the checkpoint at `path`; `error(message)` when it is not one."""
    file = path / ".metadata"
    try:
        return SafeReader(path).read_metadata()
    except FileNotFoundError:
        raise  # rotated away meanwhile: the caller resolves the checkpoint again
    except Exception as e:  # pickle raises many types for a foreign file
        raise error(
            f"{file} is not a sharded checkpoint's index ({type(e).__name__}: {e}); it was not "
            "loaded. Use another checkpoint"
        ) from None


def read_model(
    path: Path, file: Path, consolidate: bool, error: Callable[[str], Exception]
) -> dict[str, torch.Tensor]:
    """The model's weights from the sharded checkpoint at `path`: whole CPU tensors assembled
    from every rank's shards (`consolidate`), or meta-device tensors of their shapes only."""
    index = read_index(path, error)
    prefix = f"{MODEL_KEY}."
    entries = {
        key[len(prefix) :]: item
        for key, item in index.state_dict_metadata.items()
        if key.startswith(prefix)
    }
    if not entries or not all(isinstance(e, TensorStorageMetadata) for e in entries.values()):
        raise error(f"{file}: the index lists no model weights (not a tinylm sharded checkpoint)")
    device = "cpu" if consolidate else "meta"
    state = {
        name: torch.empty(tuple(e.size), dtype=e.properties.dtype, device=device)
        for name, e in entries.items()
    }
    if consolidate:
        try:
            with single_process_quiet():
                dcp.load({MODEL_KEY: state}, storage_reader=SafeReader(path), no_dist=True)
        except Exception as e:  # DCP wraps the reader's errors in its own exception types
            raise error(
                f"{path}: its weight shards cannot be read ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''})"
            ) from None
    return state
