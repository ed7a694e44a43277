"""`export_hf(run, out)`: a run's checkpoint as a directory stock `transformers` loads.

Everything is checked before anything is written (a checkpoint to export, an architecture with
an exact stock class, an output directory that is empty or `force`d), then the files are written
into a temporary directory beside `out` and moved into place at the end, so a failure leaves
nothing half-written. With `force`, the exported files replace same-named files in an existing
`out`; other files there are left alone (we never delete what we did not write).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinylm.export import card
from tinylm.fileio import atomic_write_text, make_dir, os_error_message
from tinylm.hf.model import CLASS_NAMES, hf_family, to_hf_config, to_hf_state
from tinylm.hf.tokenizer import write_tokenizer_files
from tinylm.train.checkpoint import CHECKPOINT_NAME, META_FILE, CheckpointError, load_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class ExportResult:
    out: Path
    family: str
    class_name: str
    step: int
    files: list[str]
    left_alone: list[str]  # files already in `out` that the export did not replace


def _is_run(path: Path) -> bool:
    return (path / "checkpoints").is_dir() and (path / "config.yaml").is_file()


def _inside_a_run(out: Path) -> Path | None:
    """The run directory `out` is, or the checkpoint directory (or a run's `checkpoints/`) it
    is or is inside, else None: an export there would replace a checkpoint's own
    `model.safetensors` and `tokenizer.json` (with --force), or be rotated away with it. A new
    directory inside a run (`RUN/hf`) is fine."""
    if _is_run(out):
        return out
    for p in (out, *out.parents):
        if CHECKPOINT_NAME.match(p.name) and (p / META_FILE).is_file():
            return p
        if p.name == "checkpoints" and _is_run(p.parent):
            return p
    return None


def _check_out(out: Path, force: bool) -> list[str]:
    """Refuse a non-empty `out` unless forced, and any run or checkpoint directory even then;
    return the names already there."""
    if (run := _inside_a_run(out.resolve())) is not None:
        raise CheckpointError(
            f"--out {out} is inside the run or checkpoint directory {run}: an export there "
            "would overwrite or mix with the run's own files (even with --force); choose a "
            "directory outside it"
        )
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is a file; give a directory path")
    try:
        existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    except OSError as e:
        raise CheckpointError(os_error_message(e, out, "read the output directory")) from None
    if existing and not force:
        raise CheckpointError(
            f"--out {out} exists and is not empty ({len(existing)} entries, e.g. {existing[0]}); "
            "choose a new directory, or pass --force to replace the exported files in it"
        )
    return existing


def _tokenizer_desc(tok) -> str:
    return f"{tok.kind}, {tok.vocab_size:,} tokens (`<|endoftext|>` = BOS/EOS/PAD)"


def export_hf(
    run: str | Path,
    out: str | Path,
    *,
    dtype: str = "fp32",
    which: str = "best",
    force: bool = False,
    command: str | None = None,
) -> ExportResult:
    """Export checkpoint `which` of run (or checkpoint directory) `run` to `out`."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    existing = _check_out(out, force)
    ckpt = load_checkpoint(run, which)  # CheckpointError: no checkpoint, damaged, ...
    cfg = ckpt.config
    m = cfg.model
    family = hf_family(m)  # ConfigError listing the features in the way
    step = int(ckpt.meta.get("step", 0))
    run_dir = ckpt.path.parent.parent if ckpt.path.parent.name == "checkpoints" else None
    command = command or shlex.join(["tinylm", *sys.argv[1:]])

    make_dir(out.parent, CheckpointError, "output's parent directory")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.is_file():
            tmp.unlink()  # a link is removed itself, never what it points to
        elif tmp.exists():
            shutil.rmtree(tmp)  # our own leftover (same pid) from an earlier failed call
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(os_error_message(e, out.parent, "write the export into")) from None
    try:
        eot = ckpt.tokenizer.eot_id
        hf_cfg = to_hf_config(m, family, eot_id=eot, dtype_name=DTYPE_NAMES[dtype])
        _write_json(tmp / "config.json", hf_cfg)
        gen = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
        gen |= {"do_sample": True, "temperature": cfg.eval.temperature, "top_k": cfg.eval.top_k}
        _write_json(tmp / "generation_config.json", gen)
        tensors = to_hf_state(m, ckpt.model_state, family, DTYPES[dtype])
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        write_tokenizer_files(ckpt.tokenizer, tmp, m.context_length)
        num_params = sum(t.numel() for t in tensors.values())  # a tied head is stored once
        text = card.model_card(
            cfg,
            family=family,
            class_name=CLASS_NAMES[family],
            num_params=num_params,
            tokenizer_desc=_tokenizer_desc(ckpt.tokenizer),
            step=step,
            facts=card.run_facts(run_dir, step),
            export_command=command,
            dtype_name=DTYPE_NAMES[dtype],
        )
        atomic_write_text(tmp / "README.md", text)
        files = sorted(p.name for p in tmp.iterdir())
        if not out.exists():
            tmp.replace(out)
        else:  # --force into an existing directory: replace our files one by one
            for name in files:
                (tmp / name).replace(out / name)  # a link at the name is replaced, not followed
            tmp.rmdir()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(os_error_message(e, out, "write the export into")) from None
        raise
    left_alone = [n for n in existing if n not in files]
    return ExportResult(out, family, CLASS_NAMES[family], step, files, left_alone)


def _write_json(path: Path, content: dict) -> None:
    atomic_write_text(path, json.dumps(content, indent=1) + "\n")
