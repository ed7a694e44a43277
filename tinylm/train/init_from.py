"""`train.init_from`: a new run that starts from weights that exist already.

A source is one of
- a tinylm run directory (its latest intact checkpoint) or checkpoint directory,
- a Hugging Face model directory of a supported family (GPT-2, Llama, Qwen3, Mistral shapes
  tinylm can represent: see `tinylm.hf.model.from_hf_config`), converted on load, with its tokenizer,
- `hf:NAME`: the same, downloaded from the Hugging Face hub (or found in its local cache).

The new run gets a fresh optimizer and schedule; the architecture and the tokenizer come from the
source. A command-line override that contradicts the source's architecture (a different
`model.d_model`, ...) or an explicitly set `data.tokenizer` that is not the source's is a
ConfigError naming the key, raised before any weights are read. Training choices stay the
run's own: dropout, and a `model.context_length` no longer than the source's (a learned position
table keeps its first rows).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from tinylm.config import Config, ConfigError, ModelConfig, build_section, parse_override, validate
from tinylm.errors import CheckpointError
from tinylm.finite import check_finite
from tinylm.hf.model import ARCH_FIELDS, CLASS_NAMES, arch_values, from_hf_config, from_hf_state
from tinylm.hf.tokenizer import tokenizer_from_hf_dir
from tinylm.tokenizer import Tokenizer

# What the run may choose for itself; every other model field comes from the source.
RUN_FIELDS = ("dropout", "attn_dropout", "init", "init_std", "context_length")

# The files of an HF model repository that an import reads (weights in safetensors form).
HUB_FILES = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
]


@dataclass
class InitSource:
    """What a new run takes from its source: architecture, weights, tokenizer."""

    spec: str
    description: str
    model: ModelConfig
    tokenizer: Tokenizer
    load_weights: Callable[[], dict[str, torch.Tensor]]  # read only once the config is accepted
    model_state: dict[str, torch.Tensor] | None = None


def _hub_download(name: str) -> Path:
    """The local snapshot of hub model `name`: from the HF cache, else downloaded."""
    hint = (
        f"train.init_from=hf:{name}: could not get '{name}' from the Hugging Face hub"
        " ({why}). Without network: download it where there is one "
        f"(`hf download {name} --local-dir DIR`) and pass train.init_from=DIR"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            hint.format(why="huggingface_hub is not installed: pip install 'tinylm[hf]'")
        ) from None
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        pass  # not cached: download
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        raise ConfigError(hint.format(why=why)) from None


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model directory (model.safetensors, or its shards)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        files = [
            path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    else:
        raise CheckpointError(
            f"{path} has no model.safetensors (nor a sharded index): tinylm imports safetensors "
            "weights; re-save the model with `save_pretrained(DIR)` (safetensors is its default)"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except Exception as e:  # safetensors raises its own error type for a damaged header/body
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({type(e).__name__}: "
                f"{str(e)[:120]}); it is damaged or truncated: download or export it again"
            ) from None
    check_finite(state, f"init_from weights {path}", CheckpointError)
    return state


def _checked_hf_config(hf_cfg: object, config_file: Path) -> tuple[str, ModelConfig]:
    """The model an HF config.json describes, checked like a tinylm config (types, domains,
    relations) before anything is built from it: a config.json with 10^12 layers hung the
    weight conversion, which loops over the layers."""
    if not isinstance(hf_cfg, dict):
        raise CheckpointError(f"{config_file}: holds a {type(hf_cfg).__name__}, not an object")
    try:
        family, model = from_hf_config(hf_cfg, str(config_file))
    except KeyError as e:
        raise CheckpointError(
            f"{config_file}: no {e} field; it is not a complete config.json"
        ) from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(
            f"{config_file}: a field has the wrong type or value ({type(e).__name__}: "
            f"{str(e)[:120]})"
        ) from None
    try:
        model = build_section(ModelConfig, dataclasses.asdict(model), "model")
        validate(Config(model=model))
    except ConfigError as e:
        raise CheckpointError(f"{config_file}: as a tinylm model, {e}") from None
    return family, model


def open_hf_dir(path: Path, spec: str) -> InitSource:
    """An HF model directory as an init source (config and tokenizer now, weights later)."""
    config_file = path / "config.json"
    try:
        hf_cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: not a readable config.json ({e})") from None
    family, model = _checked_hf_config(hf_cfg, config_file)
    tokenizer = tokenizer_from_hf_dir(path)
    where = str(path)
    return InitSource(
        spec,
        f"init_from: {CLASS_NAMES[family]} from {path} (converted to tinylm)",
        model,
        tokenizer,
        lambda: from_hf_state(model, read_hf_weights(path), family, where),
    )


def open_source(spec: str) -> InitSource:
    """Resolve `train.init_from` to a source (see the module docstring)."""
    from tinylm.train.checkpoint import load_checkpoint

    if spec.startswith("hf:"):
        return open_hf_dir(_hub_download(spec[3:]), spec)
    path = Path(spec).expanduser()
    if (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        return open_hf_dir(path, spec)
    if not path.exists():
        raise ConfigError(
            f"train.init_from={spec}: no such directory; give a tinylm run or checkpoint "
            "directory, a Hugging Face model directory, or hf:NAME"
        )
    ckpt = load_checkpoint(path, "latest")  # CheckpointError when there is none
    step = ckpt.meta.get("step")
    return InitSource(
        spec,
        f"init_from: {ckpt.path} (step {step})",
        ckpt.config.model,
        ckpt.tokenizer,
        lambda: ckpt.model_state,
    )


def _check_tokenizer(spec: str, source: InitSource) -> None:
    """An explicitly chosen `data.tokenizer` must be the source's tokenizer."""
    from tinylm.tokenizer import load_tokenizer

    tok = source.tokenizer
    if spec == "char" or spec.startswith("bpe:"):
        kind, size = (spec, None) if spec == "char" else ("bpe", spec[4:])
        same = tok.kind == kind and (size is None or str(tok.vocab_size) == size)
    else:
        same = load_tokenizer(spec).fingerprint() == tok.fingerprint()
    if not same:
        raise ConfigError(
            f"data.tokenizer={spec} is not the tokenizer of train.init_from={source.spec} "
            f"({tok.kind}, {tok.vocab_size:,} tokens): a model only works with the tokenizer it "
            "was trained with. Drop data.tokenizer (the source's tokenizer is used)"
        )


def merge_model_config(
    cfg: ModelConfig, source: ModelConfig, explicit: set[str], spec: str
) -> ModelConfig:
    """The source's architecture with the run's own training choices; ConfigError on conflicts."""
    ours, theirs = arch_values(cfg), arch_values(source)
    for key in ARCH_FIELDS:
        if (
            key in explicit
            and not (key == "vocab_size" and ours[key] == 0)
            and ours[key] != theirs[key]
        ):
            raise ConfigError(
                f"model.{key}={ours[key]} contradicts train.init_from={spec}, whose model has "
                f"{key}={theirs[key]}: the architecture comes from the source. Drop model.{key} "
                "(or train from scratch without train.init_from)"
            )
    context = cfg.context_length if "context_length" in explicit else source.context_length
    if context > source.context_length:
        raise ConfigError(
            f"model.context_length={context} is longer than train.init_from={spec}'s "
            f"{source.context_length}; use at most {source.context_length}"
        )
    run_own = {k: getattr(cfg, k) for k in RUN_FIELDS} | {"context_length": context}
    return dataclasses.replace(source, **run_own)


def apply_init_from(
    cfg: Config,
    explicit: Iterable[str] = (),
    preflight: Callable[[Config], None] | None = None,
) -> InitSource:
    """Resolve `cfg.train.init_from`, set `cfg.model` from it, and load its weights.

    `explicit` are the command-line overrides (`model.d_model=256` or just the keys): those are
    the settings a source may not silently replace. `preflight(cfg)` (the memory check) runs
    once `cfg.model` is the source's and before its weights are read. Returns the source with
    `model_state` (a tinylm state dict for `GPT(cfg.model)`) and the tokenizer to train with.
    """
    keys = {".".join(parse_override(e)[0]) if "=" in e else e for e in explicit}
    source = open_source(cfg.train.init_from)
    explicit_model = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    cfg.model = merge_model_config(cfg.model, source.model, explicit_model, source.spec)
    if "data.tokenizer" in keys:
        _check_tokenizer(cfg.data.tokenizer, source)
    if preflight is not None:
        preflight(cfg)
    state = dict(source.load_weights())
    if cfg.model.pos_emb == "learned":
        state["pos_emb.weight"] = state["pos_emb.weight"][: cfg.model.context_length]
    source.model_state = state
    return source
