"""The typed configuration tree: dataclasses per concern, YAML presets, strict dotted overrides.

A run is described by one `Config`. It is built from a YAML preset (`configs/*.yaml` or a preset
name such as `tiny`), then `section.key=value` overrides from the command line, then `validate()`.
Unknown keys, wrong types and impossible combinations are errors that name the key, raised as
`ConfigError` before anything expensive happens. The resolved config is saved with every run.

Every numeric field declares its domain where it is defined: `ranged(default, ge=.., le=..)`
(tinylm/domains.py). `validate()` walks the tree and checks each one (NaN, infinity, negatives,
zero where meaningless, and an upper bound where a huge value is a typo or a runaway
allocation), then the relations between fields. A new numeric field must use `ranged`:
tests/test_config_domains.py fails for one that does not.

This module imports no torch so that `tinylm --help` and config errors are instant.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tinylm.domains import field_domain, is_device, numeric_kind, ranged, walk_fields
from tinylm.suggest import close_matches, did_you_mean, nearby_path
from tinylm.yamlio import YAMLTooLarge, shorten
from tinylm.yamlio import load as load_yaml

PRESET_DIR = Path(__file__).parent / "configs"
# Seeds go to numpy, which takes 0 <= seed < 2^32.
SEED_MAX = 2**32 - 1
# Sampling is one forward pass per token; 65,536 tokens is ~40 books' worth of a char model and
# minutes even for the tiny preset on CPU: a larger count is a typo, not a request.
MAX_NEW_TOKENS = 65536
# bpe:N: 256 byte tokens and <|endoftext|> at least; 2^20 is 4x the largest vocabularies in use
# (~256k), beyond which training merges is hours of work for ids a small model cannot learn.
BPE_MIN_VOCAB, BPE_MAX_VOCAB = 257, 2**20


class ConfigError(ValueError):
    """A configuration problem that names the offending key and how to fix it."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Architecture of the decoder-only transformer (see tinylm/model.py)."""

    # 0 = take it from the tokenizer (padded up to `vocab_multiple`)
    vocab_size: int = ranged(0, ge=0, le=2**24, note="0 = from the tokenizer")
    # pad the embedding table to a multiple of this (tensor-core friendly)
    vocab_multiple: int = ranged(64, ge=1, le=4096)
    context_length: int = ranged(256, ge=1, le=2**20)
    # 1000 is ~10x the deepest published dense models; more is a typo (and TBs of weights).
    n_layer: int = ranged(4, ge=1, le=1000)
    n_head: int = ranged(4, ge=1, le=1024)
    # None = n_head (multi-head); fewer = grouped-query attention
    n_kv_head: int | None = ranged(None, ge=1, le=1024, none="n_head")
    d_model: int = ranged(128, ge=1, le=2**16)
    # None = 4*d_model for GELU and ReLU², 8/3*d_model rounded to 64 for SwiGLU
    d_ff: int | None = ranged(None, ge=1, le=2**20, none="the default for model.mlp")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = ranged(1e-5, gt=0, le=1)
    pos_emb: Literal["learned", "rope"] = "learned"
    rope_theta: float = ranged(10000.0, gt=0, le=1e12)
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    qk_norm: bool = False
    bias: bool = True
    dropout: float = ranged(0.0, ge=0, lt=1)
    attn_dropout: float = ranged(0.0, ge=0, lt=1)
    tie_embeddings: bool = True
    init: Literal["normal", "trunc_normal"] = "normal"
    init_std: float = ranged(0.02, gt=0, le=10)
    # the blocks' two residual projections start at zero (each block starts as the identity)
    zero_init_residual: bool = False
    # attend to at most this many previous positions
    sliding_window: int | None = ranged(None, ge=1, le=2**20, none="off")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":  # keep the parameter count of a 4x GELU MLP (LLaMA's choice)
            return 64 * ((int(8 * self.d_model / 3) + 63) // 64)
        return 4 * self.d_model


@dataclass
class DataSourceConfig:
    """One corpus in a mixture."""

    path: str = ""  # file, directory, glob, prepared dataset dir, `hf:NAME`, or a registry name
    weight: float = ranged(1.0, gt=0, le=1e9)  # relative to the other sources' weights
    name: str = ""  # label in per-dataset validation metrics (default: derived from path)


@dataclass
class PhaseConfig:
    """One phase of a data curriculum (`data.phases`): the mixture used until `until`."""

    # the phase ends at this fraction of train.max_steps (the last phase must end at 1)
    until: float = ranged(1.0, gt=0, le=1)
    # one weight per data.mix source, in its order; 0 = that source is not read in this phase
    weights: list[float] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where tokens come from and how they are split, prepared and fed."""

    train: str = "synthetic-stories"  # a single source (see DataSourceConfig.path)
    mix: list[DataSourceConfig] = field(default_factory=list)  # several weighted sources instead
    val: str = ""  # explicit validation source; empty = split from the training source
    tokenizer: str = "char"  # char | gpt2 | bpe:N (train N-token BPE on the data) | tok.json
    # share of documents (or of tokens, for a single document) held out
    val_fraction: float = ranged(0.1, ge=0, lt=1)
    # > 0: hold out exactly this many documents instead of val_fraction
    val_count: int = ranged(0, ge=0, le=10**9, note="0 = use data.val_fraction")
    split_seed: int = ranged(1234, ge=0, le=SEED_MAX)
    text_field: str = "text"  # field/column of jsonl, json, parquet and HF sources
    doc_delimiter: str = "<|endoftext|>"  # separates documents inside one plain-text file
    # pretokenized sources (tinylm/data/pretokenized.py): the column of ids in parquet/arrow/HF
    # sources, and the id dtype of headerless (nanoGPT) .bin files
    token_field: str = "input_ids"
    token_dtype: Literal["uint16", "uint32", "int32"] = "uint16"
    cache_dir: str = ""  # prepared datasets; empty = $TINYLM_CACHE or ~/.cache/tinylm
    # tokenizer worker processes; 0 = one per CPU core
    num_workers: int = ranged(0, ge=0, le=1024, note="0 = one per CPU core")
    sampling: Literal["random", "sequential"] = "random"
    # batches prepared ahead in a background thread (0 = off)
    prefetch: int = ranged(2, ge=0, le=64, note="0 = off")
    # a curriculum: mixture weights that change over the run (data/curriculum.py); empty = off
    phases: list[PhaseConfig] = field(default_factory=list)


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon + AdamW) and the learning-rate schedule."""

    lr: float = ranged(1e-3, gt=0, le=10)
    min_lr: float = ranged(1e-4, ge=0, le=10)  # floor reached at the end of the decay
    warmup_steps: int = ranged(100, ge=0, le=10**9)
    # None = max_steps - warmup_steps (wsd: the decay's length; None = decay_fraction * max_steps)
    decay_steps: int | None = ranged(
        None, ge=1, le=10**9, none="train.max_steps - optim.warmup_steps"
    )
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    # applied to >=2-D weights only (not norms, biases)
    weight_decay: float = ranged(0.1, ge=0, le=10)
    beta1: float = ranged(0.9, ge=0, lt=1)
    beta2: float = ranged(0.95, ge=0, lt=1)
    eps: float = ranged(1e-8, gt=0, le=1)
    grad_clip: float = ranged(1.0, ge=0, le=1e6, note="0 = off")  # max global grad norm; 0 = off
    fused: bool | None = None  # None = fused AdamW where the device supports it
    # Muon (optim.name=muon) on the hidden matrices; `lr`/`min_lr` stay AdamW's for the rest,
    # and Muon's LR follows the same schedule scaled by muon_lr / lr.
    name: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = ranged(0.02, gt=0, le=10)  # torch's Muon example; notes/issue-10-optim.md
    muon_momentum: float = ranged(0.95, ge=0, lt=1)
    muon_nesterov: bool = True
    muon_ns_steps: int = ranged(5, ge=1, le=99)  # Newton-Schulz iterations (torch allows < 100)
    muon_weight_decay: float = ranged(0.0, ge=0, le=10)  # decoupled, times Muon's LR
    muon_lr_adjust: Literal["original", "match_rms_adamw"] = "original"  # shape-based LR scale
    # Newton-Schulz precision; auto = bfloat16 on CUDA, float32 elsewhere (19x faster on AVX2 CPUs)
    muon_ns_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # wsd: decay over the last decay_steps (default: decay_fraction * max_steps), this shape
    decay_fraction: float = ranged(0.2, gt=0, le=1)
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = ranged(1000, ge=1, le=10**9)
    batch_size: int = ranged(32, ge=1, le=65536)  # micro-batch size (sequences per forward pass)
    # effective batch = batch_size * grad_accum * world_size
    grad_accum: int = ranged(1, ge=1, le=65536)
    # end the run after this wall time (then a final evaluation and checkpoint); 0 = off
    max_time_minutes: float = ranged(0.0, ge=0, le=10**7, note="0 = off")
    # with max_time_minutes: time the first steps and set max_steps to what fits the time, so
    # the LR schedule ends when the time does (train/time_budget.py)
    fit_steps_to_time: bool = False
    # fp8: torchao float8 matmuls in the blocks (train/fp8.py; GPUs of compute capability 8.9+);
    # bf32: fp32 with bf16-input matmuls on a CPU's bf16 units (train/precision.py)
    precision: Literal["auto", "fp32", "bf16", "bf32", "fp16", "fp8"] = "auto"
    compile: bool | Literal["auto"] = "auto"  # auto: on when the run repays compile time
    # Recompute each block in the backward pass instead of keeping its activations (per block,
    # non-reentrant torch.utils.checkpoint); auto: on only when the run would not fit without it
    activation_checkpointing: bool | Literal["auto"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps | xla (PyTorch/XLA: TPU)
    seed: int = ranged(1337, ge=0, le=SEED_MAX)
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"  # under torchrun; auto = ddp
    # continue the run's newest intact checkpoint without --resume: auto = when torchrun
    # restarted the group or a job with an explicit run_name is re-submitted under torchrun
    # (train/auto_resume.py); always = also outside torchrun; never = only with --resume
    resume: Literal["auto", "always", "never"] = "auto"
    # evaluations without improvement before stopping; 0 = off
    early_stop_patience: int = ranged(0, ge=0, le=10**6, note="0 = off")
    early_stop_min_delta: float = ranged(0.0, ge=0, le=100)  # in nats of val loss
    # consecutive non-finite losses/grad norms before stopping
    max_nonfinite_steps: int = ranged(5, ge=1, le=10**6)
    # Factors <= 1 would flag every ordinary step (the loss fluctuates around its average).
    # log a spike when loss > factor * recent average
    spike_factor: float = ranged(3.0, gt=1, le=1e6)
    gap_warn_factor: float = ranged(1.5, gt=1, le=1e6)  # warn when val loss > factor * train loss
    # Start from existing weights (fresh optimizer and schedule): a tinylm run or checkpoint
    # directory, a Hugging Face model directory, or hf:NAME. Empty = random initialisation.
    init_from: str = ""
    trainable: str = "all"  # all | no-embeddings | last:N (train only the last N blocks)
    # CPU threads of torch ops, fixed for the whole run (results depend on it; train/threads.py).
    # auto: a resumed run's own count, else OMP_NUM_THREADS/MKL_NUM_THREADS, else a probe
    threads: int | Literal["auto"] = ranged("auto", ge=1, le=4096, note="or auto")


@dataclass
class EvalConfig:
    """Validation during training and `tinylm eval`."""

    # steps between evaluations (0 = only at the end)
    interval: int = ranged(200, ge=0, le=10**9, note="0 = only at the end")
    # bounded, deterministic validation during training
    max_batches: int = ranged(20, ge=1, le=10**6)
    batch_size: int = ranged(0, ge=0, le=65536, note="0 = train.batch_size")  # 0 = train.batch_size
    samples: int = ranged(1, ge=0, le=100)  # generations printed at each evaluation
    sample_tokens: int = ranged(200, ge=0, le=MAX_NEW_TOKENS)
    sample_prompt: str = ""
    temperature: float = ranged(0.8, ge=0, le=100, note="0 = greedy")
    top_k: int = ranged(50, ge=0, le=2**24, note="0 = off")


@dataclass
class CheckpointConfig:
    """When checkpoints are written and which are kept."""

    # steps between checkpoints (also written at the end and on a stop)
    interval: int = ranged(500, ge=0, le=10**9, note="0 = only at the end")
    keep_last: int = ranged(2, ge=1, le=10**6)
    keep_best: bool = True  # also keep the checkpoint with the best validation loss
    # keep every checkpoint whose step is a multiple; 0 = none
    milestone_interval: int = ranged(0, ge=0, le=10**9, note="0 = none")
    # full: one model.safetensors + train_state.pt gathered on rank 0; sharded: each rank writes
    # its shards (torch.distributed.checkpoint); auto: sharded under FSDP above a size threshold
    # (tinylm/train/sharded.py says which and why)
    format: Literal["full", "sharded", "auto"] = "auto"


@dataclass
class LogConfig:
    """What the run reports and where."""

    interval: int = ranged(10, ge=1, le=10**9)  # steps between log lines
    progress: bool = True  # progress bar (off automatically when not a terminal)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "tinylm"
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"


@dataclass
class Config:
    """One run: every section, plus where its directory goes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    out_dir: str = "runs"
    run_name: str = ""  # empty = <preset>-<timestamp>

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Building a config from dicts, with type checking that names the key
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {shorten(value)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: must be one of {_type_name(tp)}, got {shorten(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {shorten(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping of {tp.__name__} fields, got {shorten(value)}"
            )
        return build_section(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {shorten(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {shorten(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {shorten(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {shorten(value)}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # a bug in this file, not user input


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_section(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from `values`, refusing unknown keys and wrong types."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in types_:
            raise ConfigError(_unknown_key_message(full, key, types_))
        kwargs[key] = _coerce(value, types_[key], full)
    return cls(**kwargs)


def all_keys() -> list[str]:
    """Every dotted key of the config tree (`data.mix[].path` for fields of list items)."""
    return [key for key, _, _ in walk_fields(Config)]


def _unknown_key_message(full: str, key: str, here: dict[str, Any]) -> str:
    """'unknown config key' with the likely intended key: the same name in another section
    (`max_steps` -> `train.max_steps`, `train.lr` -> `optim.lr`), else the closest spelling
    among every key's name (`train.warmup_step` -> `optim.warmup_steps`)."""
    prefix = full[: -len(key)]
    where: dict[str, list[str]] = {name: [prefix + name] for name in here}
    for k in all_keys():
        if "[]" not in k:
            where.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    exact = [k for k in where.get(key, []) if k != full]
    near = close_matches(key, where, n=1)
    close = list(dict.fromkeys(where[near[0]])) if near else []
    if prefix + (near[0] if near else "") in close:
        close = [prefix + near[0]]  # the name exists in this very section: that is the one
    hint = _one_of(exact or close)
    return f"unknown config key '{full}'.{hint} Known keys here: {', '.join(here)}"


def _one_of(keys: list[str]) -> str:
    return " Did you mean " + " or ".join(f"'{k}'" for k in keys) + "?" if keys else ""


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `section.key=value`; the value is read as YAML (so 1e-3, true, [a, b] work)."""
    if "=" not in text:
        raise ConfigError(
            f"override '{text}' is not of the form section.key=value (e.g. train.max_steps=2000)"
        )
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = load_yaml(raw, f"override {key}") if raw.strip() else ""
    except YAMLTooLarge as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError:
        value = raw
    if value is None and raw.strip() not in ("null", "~", "None"):
        value = raw
    if raw.strip() == "None":
        value = None
    return key.split("."), value


def _set_dotted(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"'{'.'.join(path)}': '{part}' is a value, not a section")
        node = nxt
    node[path[-1]] = value


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (`tiny`) or a path to a YAML file."""
    path = Path(name_or_path)
    presets = ", ".join(list_presets())
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise ConfigError(f"config file '{path}' is a directory; give a YAML file or a preset")
        if not path.is_file():
            near = nearby_path(path)
            hint = f" Did you mean '{near}'?" if near and near.is_file() else ""
            if path.stem in list_presets() and len(path.parts) == 1:
                # `tinylm train tiny.yaml`: the preset, which is named without its suffix
                hint = f" Did you mean the preset '{path.stem}' (`tinylm train {path.stem}`)?"
            raise ConfigError(f"config file '{path}' not found.{hint} Presets: {presets}")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        hint = did_you_mean(name_or_path, list_presets())
        raise ConfigError(
            f"'{name_or_path}' is neither a config file nor a preset.{hint} Presets: {presets}"
        )
    return preset


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset (or defaults) + dotted overrides -> validated `Config`."""
    tree: dict[str, Any] = {}
    if preset:
        path = resolve_preset(preset)
        try:
            loaded = load_yaml(path.read_text(), str(path)) or {}
        except YAMLTooLarge as e:
            raise ConfigError(str(e)) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        tree = _deep_merge(tree, loaded)
    for text in overrides or []:
        path_parts, value = parse_override(text)
        _set_dotted(tree, path_parts, value)
    cfg = config_from_dict(tree)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    return build_section(Config, tree)


def load_config_file(path: str | Path) -> Config:
    """Read a resolved config written into a run directory; every error names the file."""
    path = Path(path)
    try:
        tree = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except YAMLTooLarge as e:
        raise ConfigError(str(e)) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{path}: not a readable YAML config ({type(e).__name__}); it was edited or damaged: "
            "restore it (the checkpoints' meta.json holds a copy under 'config')"
        ) from None
    if not isinstance(tree, (dict, type(None))):
        raise ConfigError(f"{path}: holds a {type(tree).__name__}, not a config mapping")
    try:
        cfg = config_from_dict(tree or {})
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


# --------------------------------------------------------------------------------------------
# Validation: combinations that cannot work
# --------------------------------------------------------------------------------------------


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Raise ConfigError for values or combinations that cannot work.

    First every field against its declared domain (`ranged(...)` above; a generic walk, so a
    new field is checked by declaring it), then the names that become paths, then relations
    between fields.
    """
    _check_domains(cfg)
    _check_strings(cfg)
    m, o, d = cfg.model, cfg.optim, cfg.data
    _require(
        m.d_model % m.n_head == 0,
        f"model.n_head={m.n_head} must divide model.d_model={m.d_model} "
        f"(e.g. n_head={_nearest_divisor(m.d_model, m.n_head)})",
    )
    if m.n_kv_head is not None:
        _require(
            m.n_kv_head <= m.n_head and m.n_head % m.n_kv_head == 0,
            f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head} "
            f"(e.g. n_kv_head={_nearest_divisor(m.n_head, m.n_kv_head)}, or null for n_head)",
        )
    if m.pos_emb == "rope":
        _require(
            m.head_dim % 2 == 0, f"model.pos_emb=rope needs an even head dim, got {m.head_dim}"
        )
    _require(
        o.min_lr <= o.lr,
        f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}] (the decay ends at min_lr)",
    )
    _require(
        not cfg.train.fit_steps_to_time or cfg.train.max_time_minutes > 0,
        "train.fit_steps_to_time=true fits max_steps to train.max_time_minutes, which is 0 (off): "
        "set train.max_time_minutes=N as well",
    )
    _require(bool(d.train) or bool(d.mix), "data.train (or data.mix) must name a source")
    for i, src in enumerate(d.mix):
        _require(bool(src.path), f"data.mix[{i}].path is empty")
    _check_phases(d)


def _check_phases(d: DataConfig) -> None:
    """`data.phases`: weights for each `data.mix` source, phases in order, the last ending at 1."""
    if not d.phases:
        return
    _require(
        len(d.mix) >= 2,
        "data.phases change the weights of data.mix sources: list at least two in data.mix",
    )
    _require(
        d.sampling == "random",
        "data.phases needs data.sampling=random (sequential epochs follow fixed weights)",
    )
    previous = 0.0
    for i, phase in enumerate(d.phases):
        key = f"data.phases[{i}]"
        _require(
            len(phase.weights) == len(d.mix),
            f"{key}.weights has {len(phase.weights)} weights for {len(d.mix)} data.mix sources: "
            "give one per source, in data.mix order (0 = unused in this phase)",
        )
        _require(
            all(math.isfinite(w) and 0 <= w <= 1e9 for w in phase.weights)
            and sum(phase.weights) > 0,
            f"{key}.weights={phase.weights}: weights must be in [0, 1e9], at least one positive",
        )
        _require(
            phase.until > previous,
            f"{key}.until={phase.until} must be after the previous phase's end ({previous})",
        )
        previous = phase.until
    _require(
        previous == 1.0,
        f"the last of data.phases ends at until={previous}: it must end at 1 (the end of the run)",
    )


def _check_domains(node: Any, prefix: str = "") -> None:
    """Every numeric field of the tree against the domain it declares (see tinylm/domains.py)."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        key, value, tp = f"{prefix}{f.name}", getattr(node, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            _check_domains(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_domains(item, f"{key}[{i}].")
        elif isinstance(value, str):
            _require("\x00" not in value, f"{key}: contains a NUL character; remove it")
        elif (domain := field_domain(f)) is not None:
            kind = numeric_kind(tp)
            problem = domain.problem(value, integer=kind == "int")
            _require(
                problem is None,
                f"{key}={shorten(value)} is out of range ({problem}): must be "
                f"{domain.describe(integer=kind == 'int')}",
            )


def _check_strings(cfg: Config) -> None:
    """Strings with a fixed form. `run_name` names one directory inside `out_dir`, never a path:
    a run elsewhere is chosen with `out_dir` (any path, written on purpose), while a slash or
    `..` in a name is a typo or an escape from `out_dir`."""
    name = cfg.run_name
    _require(
        not name or (name not in (".", "..") and "/" not in name and "\\" not in name),
        f"run_name={name!r} must be a single directory name (no '/', not '.' or '..'); "
        "to put the run somewhere else set out_dir=PATH",
    )
    _require(
        name == name.strip(),
        f"run_name={name!r} starts or ends with whitespace; remove it",
    )
    tok = cfg.data.tokenizer
    if tok.startswith("bpe:"):
        size = tok[4:]
        _require(
            size.isdigit() and BPE_MIN_VOCAB <= int(size) <= BPE_MAX_VOCAB,
            f"data.tokenizer={tok!r}: expected bpe:N with N in [{BPE_MIN_VOCAB}, "
            f"{BPE_MAX_VOCAB:,}] (256 byte tokens + <|endoftext|> + merges), e.g. bpe:8192",
        )
    _require(
        is_device(cfg.train.device),
        f"train.device={cfg.train.device!r} is not a device; use auto, cpu, cuda, cuda:N, mps or xla",
    )
    t = cfg.train
    if t.device == "xla":  # what the XLA path supports (tinylm/train/xla.py says why)
        _require(
            cfg.optim.name == "adamw",
            "optim.name=muon is not supported on train.device=xla; use optim.name=adamw",
        )
        _require(
            t.compile is not True,
            "train.compile=true with train.device=xla: XLA compiles each step's graph itself; "
            "use train.compile=auto or false",
        )
        _require(
            t.precision in ("auto", "fp32", "bf16"),
            f"train.precision={t.precision} is not supported on train.device=xla; use bf16 or fp32",
        )
        _require(
            t.distributed != "fsdp",
            "train.distributed=fsdp is not supported on train.device=xla (XLA replicas keep whole "
            "copies of the weights); use train.distributed=auto or ddp",
        )
    _require(
        re.fullmatch(r"all|no-embeddings|last:[1-9][0-9]*", t.trainable) is not None,
        f"train.trainable={t.trainable!r}: expected all, no-embeddings or last:N (N >= 1)",
    )
    _require(
        t.init_from == t.init_from.strip(),
        f"train.init_from={t.init_from!r} has surrounding spaces; give the path or hf:NAME alone",
    )


def _nearest_divisor(n: int, near: int) -> int:
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: abs(k - near))
