"""The typed configuration tree: dataclasses per concern, YAML presets, strict dotted overrides.

A run is described by one `Config`. It is built from a YAML preset (`configs/*.yaml` or a preset
name such as `tiny`), then `section.key=value` overrides from the command line, then `validate()`.
Unknown keys, wrong types and impossible combinations are errors that name the key, raised as
`ConfigError` before anything expensive happens. The resolved config is saved with every run.

This module imports no torch so that `tinylm --help` and config errors are instant.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration problem that names the offending key and how to fix it."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Architecture of the decoder-only transformer (see tinylm/model.py)."""

    vocab_size: int = 0  # 0 = take it from the tokenizer (padded up to `vocab_multiple`)
    vocab_multiple: int = 64  # pad the embedding table to a multiple of this (tensor-core friendly)
    context_length: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (multi-head); fewer = grouped-query attention
    d_model: int = 128
    d_ff: int | None = None  # None = 4*d_model for GELU, 8/3*d_model rounded to 64 for SwiGLU
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    pos_emb: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    mlp: Literal["gelu", "swiglu"] = "gelu"
    qk_norm: bool = False
    bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    tie_embeddings: bool = True
    init: Literal["normal", "trunc_normal"] = "normal"
    init_std: float = 0.02
    sliding_window: int | None = None  # attend to at most this many previous positions

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
    weight: float = 1.0
    name: str = ""  # label in per-dataset validation metrics (default: derived from path)


@dataclass
class DataConfig:
    """Where tokens come from and how they are split, prepared and fed."""

    train: str = "synthetic-stories"  # a single source (see DataSourceConfig.path)
    mix: list[DataSourceConfig] = field(default_factory=list)  # several weighted sources instead
    val: str = ""  # explicit validation source; empty = split from the training source
    tokenizer: str = "char"  # char | gpt2 | bpe:N (train N-token BPE on the data) | tok.json
    val_fraction: float = 0.1  # share of documents (or of tokens, for a single document) held out
    val_count: int = 0  # > 0: hold out exactly this many documents instead of val_fraction
    split_seed: int = 1234
    text_field: str = "text"  # field/column of jsonl, json, parquet and HF sources
    doc_delimiter: str = "<|endoftext|>"  # separates documents inside one plain-text file
    cache_dir: str = ""  # prepared datasets; empty = $TINYLM_CACHE or ~/.cache/tinylm
    num_workers: int = 0  # tokenizer worker processes; 0 = one per CPU core
    sampling: Literal["random", "sequential"] = "random"
    prefetch: int = 2  # batches prepared ahead in a background thread (0 = off)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-3
    min_lr: float = 1e-4  # floor reached at the end of the decay
    warmup_steps: int = 100
    decay_steps: int | None = None  # None = max_steps - warmup_steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1  # applied to >=2-D weights only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    fused: bool | None = None  # None = fused AdamW where the device supports it


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = 1000
    batch_size: int = 32  # micro-batch size (sequences per forward pass)
    grad_accum: int = 1  # effective batch = batch_size * grad_accum * world_size
    max_time_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 1337
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"  # under torchrun; auto = ddp
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    early_stop_min_delta: float = 0.0
    max_nonfinite_steps: int = 5  # consecutive non-finite losses/grad norms before stopping
    spike_factor: float = 3.0  # log a spike when loss > factor * recent average
    gap_warn_factor: float = 1.5  # warn when val loss > factor * train loss


@dataclass
class EvalConfig:
    """Validation during training and `tinylm eval`."""

    interval: int = 200  # steps between evaluations (0 = only at the end)
    max_batches: int = 20  # bounded, deterministic validation during training
    batch_size: int = 0  # 0 = train.batch_size
    samples: int = 1  # generations printed at each evaluation
    sample_tokens: int = 200
    sample_prompt: str = ""
    temperature: float = 0.8
    top_k: int = 50


@dataclass
class CheckpointConfig:
    """When checkpoints are written and which are kept."""

    interval: int = 500  # steps between checkpoints (also written at the end and on a stop)
    keep_last: int = 2
    keep_best: bool = True  # also keep the checkpoint with the best validation loss
    milestone_interval: int = 0  # keep every checkpoint whose step is a multiple; 0 = none


@dataclass
class LogConfig:
    """What the run reports and where."""

    interval: int = 10  # steps between log lines
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
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: must be one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_section(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
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
            known = ", ".join(types_)
            raise ConfigError(f"unknown config key '{full}'. Known keys here: {known}")
        kwargs[key] = _coerce(value, types_[key], full)
    return cls(**kwargs)


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
        value = yaml.safe_load(raw) if raw.strip() else ""
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
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(
                f"config file '{path}' not found. Presets: {', '.join(list_presets())}"
            )
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"'{name_or_path}' is neither a config file nor a preset. Presets: {', '.join(list_presets())}"
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
            loaded = yaml.safe_load(path.read_text()) or {}
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
    """Read a resolved config written into a run directory."""
    cfg = config_from_dict(yaml.safe_load(Path(path).read_text()) or {})
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Validation: combinations that cannot work
# --------------------------------------------------------------------------------------------


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Raise ConfigError for values or combinations that cannot work."""
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    for key in ("context_length", "n_layer", "n_head", "d_model"):
        _require(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    _require(
        m.d_model % m.n_head == 0,
        f"model.n_head={m.n_head} must divide model.d_model={m.d_model} "
        f"(e.g. n_head={_nearest_divisor(m.d_model, m.n_head)})",
    )
    if m.n_kv_head is not None:
        _require(
            0 < m.n_kv_head <= m.n_head and m.n_head % m.n_kv_head == 0,
            f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head}",
        )
    if m.pos_emb == "rope":
        _require(
            m.head_dim % 2 == 0, f"model.pos_emb=rope needs an even head dim, got {m.head_dim}"
        )
    _require(m.vocab_size >= 0, "model.vocab_size must be >= 0 (0 = from the tokenizer)")
    _require(m.vocab_multiple >= 1, "model.vocab_multiple must be >= 1")
    _require(m.d_ff is None or m.d_ff > 0, "model.d_ff must be positive (or null for the default)")
    for key in ("dropout", "attn_dropout"):
        _require(0.0 <= getattr(m, key) < 1.0, f"model.{key} must be in [0, 1)")
    if m.sliding_window is not None:
        _require(m.sliding_window > 0, "model.sliding_window must be positive (or null for off)")
    _require(m.init_std > 0, "model.init_std must be positive")

    _require(o.lr > 0, "optim.lr must be positive")
    _require(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    _require(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)")
    _require(o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 = off)")
    _require(o.weight_decay >= 0, "optim.weight_decay must be >= 0")

    _require(t.max_steps > 0, "train.max_steps must be positive")
    _require(t.batch_size > 0, "train.batch_size must be positive")
    _require(t.grad_accum > 0, "train.grad_accum must be positive")
    _require(t.max_nonfinite_steps > 0, "train.max_nonfinite_steps must be positive")

    _require(0.0 <= d.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
    _require(d.val_count >= 0, "data.val_count must be >= 0 (0 = use data.val_fraction)")
    _require(bool(d.train) or bool(d.mix), "data.train (or data.mix) must name a source")
    for i, src in enumerate(d.mix):
        _require(bool(src.path), f"data.mix[{i}].path is empty")
        _require(src.weight > 0, f"data.mix[{i}].weight must be positive")
    _require(d.num_workers >= 0, "data.num_workers must be >= 0 (0 = one per core)")

    _require(cfg.eval.interval >= 0, "eval.interval must be >= 0")
    _require(cfg.eval.max_batches > 0, "eval.max_batches must be positive")
    _require(cfg.checkpoint.interval >= 0, "checkpoint.interval must be >= 0")
    _require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1")
    _require(cfg.log.interval > 0, "log.interval must be positive")


def _nearest_divisor(n: int, near: int) -> int:
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: abs(k - near))
