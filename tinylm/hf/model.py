"""Exact mapping between tinylm's model and stock Hugging Face `transformers` classes, both ways.

Each tinylm architecture maps to the one stock class that computes the same function:

- GPT-2 (`GPT2LMHeadModel`): LayerNorm, learned positions, GELU (tanh) MLP, multi-head attention.
  tinylm without biases exports zero biases (the same function); `activation_function` is
  `gelu_pytorch_tanh`, which is `F.gelu(approximate="tanh")` exactly, as tinylm computes it.
- Llama (`LlamaForCausalLM`): RMSNorm, RoPE, SwiGLU, grouped-query attention, biases on every
  linear layer or none (`attention_bias` = `mlp_bias`).
- Qwen3 (`Qwen3ForCausalLM`): Llama plus QK-norm (RMSNorm over the head dimension before RoPE);
  no biases in its MLP, so tinylm's `bias` must be off.
- Mistral (`MistralForCausalLM`): Llama with a sliding window, no biases.

tinylm's RoPE already uses the "split halves" layout of HF's `rotate_half` (pairs
(x[i], x[i + D/2]), frequencies theta^(-2i/D)), so query/key weights are copied as they are; no
permutation (that is only for checkpoints in Meta's interleaved layout). Padded vocabulary rows
are dropped on export: tinylm never uses them (it slices its logits to `vocab_size`), so an HF
model with exactly `vocab_size` rows is the same function; on import they are zero-filled again.

One table (`_plan`) names, per family, which HF tensors make each tinylm tensor (concatenated
along dim 0, transposed for GPT-2's Conv1D), so export and import cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tinylm.config import ConfigError, ModelConfig

FAMILIES = ("gpt2", "llama", "qwen3", "mistral")
CLASS_NAMES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# The ModelConfig fields that define the function the model computes (as opposed to training
# choices such as dropout and initialisation).
ARCH_FIELDS = (
    "vocab_size",
    "n_layer",
    "n_head",
    "n_kv_head",
    "d_model",
    "d_ff",
    "norm",
    "norm_eps",
    "pos_emb",
    "rope_theta",
    "mlp",
    "qk_norm",
    "bias",
    "tie_embeddings",
    "sliding_window",
)


# The two layouts every family builds on: GPT-2's, and Llama's (which Qwen3 and Mistral share).
_LAYOUTS = {
    "gpt2": {"norm": "layernorm", "pos_emb": "learned", "mlp": "gelu"},
    "llama": {"norm": "rmsnorm", "pos_emb": "rope", "mlp": "swiglu"},
}


def _layout_conflicts(m: ModelConfig, layout: str) -> list[str]:
    return [
        f"model.{key}={getattr(m, key)} (it needs {value})"
        for key, value in _LAYOUTS[layout].items()
        if getattr(m, key) != value
    ]


def _family_conflicts(m: ModelConfig) -> dict[str, list[str]]:
    """For each family, the settings of `m` its stock class cannot compute exactly."""
    rope_style = _layout_conflicts(m, "llama")
    gpt2 = _layout_conflicts(m, "gpt2")
    if m.kv_heads != m.n_head:
        gpt2.append(f"model.n_kv_head={m.n_kv_head} (GPT-2 has no grouped-query attention)")
    if m.qk_norm:
        gpt2.append("model.qk_norm=true (GPT-2 has no QK-norm)")
    if m.sliding_window is not None:
        gpt2.append(f"model.sliding_window={m.sliding_window} (GPT-2 has no sliding window)")

    llama = list(rope_style)
    if m.qk_norm:
        llama.append("model.qk_norm=true (Llama has no QK-norm)")
    if m.sliding_window is not None:
        llama.append(f"model.sliding_window={m.sliding_window} (Llama has no sliding window)")

    qwen3 = list(rope_style)
    if not m.qk_norm:
        qwen3.append("model.qk_norm=false (Qwen3 always normalizes q and k)")
    if m.bias:
        qwen3.append("model.bias=true (Qwen3's MLP has no biases)")

    mistral = list(rope_style)
    if m.qk_norm:
        mistral.append("model.qk_norm=true (Mistral has no QK-norm)")
    if m.bias:
        mistral.append("model.bias=true (Mistral has no biases)")
    return {"gpt2": gpt2, "llama": llama, "qwen3": qwen3, "mistral": mistral}


def hf_family(m: ModelConfig) -> str:
    """The stock family computing exactly what `m` computes; ConfigError listing what is in the way.

    Order of preference: GPT-2, Llama, Qwen3 (QK-norm), Mistral (sliding window).
    """
    conflicts = _family_conflicts(m)
    for family in FAMILIES:
        if not conflicts[family]:
            return family
    best = min(FAMILIES, key=lambda f: len(conflicts[f]))
    other = "llama" if best == "gpt2" else "gpt2"  # the closest of the other layout
    lines = "; ".join(f"for {CLASS_NAMES[f]}: {', '.join(conflicts[f])}" for f in (best, other))
    raise ConfigError(
        "no stock transformers class computes this architecture exactly, and tinylm does not "
        f"export approximations. Features in the way {lines}. Train with an exportable "
        "architecture (e.g. model.mlp=swiglu with RMSNorm + RoPE, or the gpt2-124m layout)."
    )


# --------------------------------------------------------------------------------------------
# The tensor plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One tinylm tensor = the HF tensors `hf` concatenated along dim 0 (then transposed)."""

    tinylm: str
    hf: tuple[str, ...]
    transpose: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    vocab: bool = False  # rows are the (padded) vocabulary
    zeros: int = 0  # size of a bias HF has and tinylm lacks (exported as zeros), else 0


def _plan(m: ModelConfig, family: str) -> list[_Entry]:
    C, H = m.d_model, m.ff_dim
    out: list[_Entry] = []
    if family == "gpt2":
        nb = 0 if m.bias else 1  # GPT-2 always has biases: tinylm without them exports zeros

        def lin(t: str, h: str, size: int) -> list[_Entry]:
            bias = _Entry(f"{t}.bias", (f"{h}.bias",), zeros=size * nb)
            return [_Entry(f"{t}.weight", (f"{h}.weight",), transpose=True), bias]

        def ln(t: str, h: str) -> list[_Entry]:
            bias = _Entry(f"{t}.bias", (f"{h}.bias",), zeros=C * nb)
            return [_Entry(f"{t}.weight", (f"{h}.weight",)), bias]

        out += [
            _Entry("tok_emb.weight", ("transformer.wte.weight",), vocab=True),
            _Entry("pos_emb.weight", ("transformer.wpe.weight",)),
        ]
        for i in range(m.n_layer):
            t, h = f"blocks.{i}", f"transformer.h.{i}"
            out += ln(f"{t}.norm1", f"{h}.ln_1")
            out += lin(f"{t}.attn.qkv", f"{h}.attn.c_attn", 3 * C)
            out += lin(f"{t}.attn.proj", f"{h}.attn.c_proj", C)
            out += ln(f"{t}.norm2", f"{h}.ln_2")
            out += lin(f"{t}.mlp.fc", f"{h}.mlp.c_fc", H)
            out += lin(f"{t}.mlp.proj", f"{h}.mlp.c_proj", C)
        out += ln("norm_f", "transformer.ln_f")
    else:
        out.append(_Entry("tok_emb.weight", ("model.embed_tokens.weight",), vocab=True))
        for i in range(m.n_layer):
            t, h = f"blocks.{i}", f"model.layers.{i}"
            a, p = f"{h}.self_attn", f"{h}.mlp"
            kinds = ("weight", "bias") if m.bias else ("weight",)
            for k in kinds:
                out.append(
                    _Entry(
                        f"{t}.attn.qkv.{k}",
                        (f"{a}.q_proj.{k}", f"{a}.k_proj.{k}", f"{a}.v_proj.{k}"),
                    )
                )
                out.append(_Entry(f"{t}.attn.proj.{k}", (f"{a}.o_proj.{k}",)))
                out.append(_Entry(f"{t}.mlp.fc.{k}", (f"{p}.gate_proj.{k}", f"{p}.up_proj.{k}")))
                out.append(_Entry(f"{t}.mlp.proj.{k}", (f"{p}.down_proj.{k}",)))
            out.append(_Entry(f"{t}.norm1.weight", (f"{h}.input_layernorm.weight",)))
            out.append(_Entry(f"{t}.norm2.weight", (f"{h}.post_attention_layernorm.weight",)))
            if m.qk_norm:
                out.append(_Entry(f"{t}.attn.q_norm.weight", (f"{a}.q_norm.weight",)))
                out.append(_Entry(f"{t}.attn.k_norm.weight", (f"{a}.k_norm.weight",)))
        out.append(_Entry("norm_f.weight", ("model.norm.weight",)))
    if not m.tie_embeddings:
        out.append(_Entry("lm_head.weight", ("lm_head.weight",), vocab=True))
    return out


def _split_sizes(entry: _Entry, m: ModelConfig) -> list[int]:
    """Row counts of the HF parts of a concatenated tinylm tensor."""
    if len(entry.hf) == 3:  # q, k, v
        kv = m.kv_heads * m.head_dim
        return [m.d_model, kv, kv]
    if len(entry.hf) == 2:  # gate, up
        return [m.ff_dim, m.ff_dim]
    return []


def to_hf_state(
    m: ModelConfig, state: dict[str, torch.Tensor], family: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """tinylm state dict -> the HF state dict of `family` (contiguous tensors of `dtype`)."""
    out: dict[str, torch.Tensor] = {}
    for e in _plan(m, family):
        if e.zeros:
            out[e.hf[0]] = torch.zeros(e.zeros, dtype=dtype)
            continue
        t = state[e.tinylm]
        if e.vocab:
            t = t[: m.vocab_size]
        if e.transpose:
            t = t.t()
        parts = t.split(_split_sizes(e, m), dim=0) if len(e.hf) > 1 else (t,)
        for name, part in zip(e.hf, parts, strict=True):
            out[name] = part.to(dtype).contiguous().clone()
    return out


def from_hf_state(
    m: ModelConfig, hf_state: dict[str, torch.Tensor], family: str, where: str
) -> dict[str, torch.Tensor]:
    """HF state dict of `family` -> a tinylm state dict for `GPT(m)` (fp32; padded rows zero).

    Checkpoints saved from the bare GPT-2 body (`wte.weight`, `h.0...`) are accepted too.
    """
    from tinylm.errors import CheckpointError
    from tinylm.model import padded_vocab_size

    if family == "gpt2" and not any(k.startswith("transformer.") for k in hf_state):
        hf_state = {f"transformer.{k}": v for k, v in hf_state.items()}
    padded = padded_vocab_size(m)
    out: dict[str, torch.Tensor] = {}
    for e in _plan(m, family):
        missing = [n for n in e.hf if n not in hf_state]
        if missing:
            raise CheckpointError(
                f"{where}: the weights lack {missing[0]} (expected for a {CLASS_NAMES[family]} with "
                "this config.json); the checkpoint is incomplete or does not match its config"
            )
        t = torch.cat([hf_state[n].float() for n in e.hf], dim=0)
        if e.transpose:
            t = t.t()
        if e.vocab and padded > t.shape[0]:
            t = torch.cat([t, t.new_zeros(padded - t.shape[0], t.shape[1])])
        out[e.tinylm] = t.contiguous()
    out["lm_head.weight"] = out.get("lm_head.weight", out["tok_emb.weight"])
    return out


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def to_hf_config(
    m: ModelConfig, family: str, *, eot_id: int | None, dtype_name: str
) -> dict[str, Any]:
    """The `config.json` of the stock class for `m` (HF's key names, nothing custom)."""
    common: dict[str, Any] = {
        "architectures": [CLASS_NAMES[family]],
        "model_type": family,
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "use_cache": True,
        # Both spellings: transformers 5 reads `dtype`, 4.x `torch_dtype`.
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if family == "gpt2":
        return common | {
            "n_embd": m.d_model,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_positions": m.context_length,
            "n_ctx": m.context_length,
            "n_inner": m.ff_dim,
            "activation_function": "gelu_pytorch_tanh",
            "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": m.dropout,
            "embd_pdrop": m.dropout,
            "attn_pdrop": m.attn_dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    cfg = common | {
        "hidden_size": m.d_model,
        "intermediate_size": m.ff_dim,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.context_length,
        "rms_norm_eps": m.norm_eps,
        # transformers 5 reads `rope_parameters`; 4.x reads `rope_theta` and `rope_scaling`.
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_dropout": m.attn_dropout,
    }
    if family == "llama":
        cfg |= {"attention_bias": m.bias, "mlp_bias": m.bias, "pretraining_tp": 1}
    elif family == "qwen3":
        window = m.sliding_window
        cfg |= {
            "attention_bias": False,
            "use_sliding_window": window is not None,
            "sliding_window": window,
            "max_window_layers": 0,  # every layer from layer 0 on uses the window
            "layer_types": ["sliding_attention" if window else "full_attention"] * m.n_layer,
        }
    else:
        cfg |= {"sliding_window": m.sliding_window}
    return cfg


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        from tinylm.errors import CheckpointError

        raise CheckpointError(f"{where}: {message}; tinylm cannot represent this model exactly")


def _rope_theta(d: dict[str, Any], where: str) -> float:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for spec in (params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        _require(kind == "default", where, f"RoPE scaling {kind!r} (tinylm has plain RoPE)")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def from_hf_config(d: dict[str, Any], where: str) -> tuple[str, ModelConfig]:
    """(family, ModelConfig) for an HF `config.json`; CheckpointError for what tinylm cannot hold."""
    from tinylm.errors import CheckpointError

    family = d.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(
            f"{where}: model_type {family!r} is not supported; tinylm imports "
            f"{', '.join(FAMILIES)} models (as their stock transformers classes define them)"
        )
    if family == "gpt2":
        act = d.get("activation_function", "gelu_new")
        _require(act in ("gelu_new", "gelu_pytorch_tanh"), where, f"activation {act!r}")
        _require(not d.get("scale_attn_by_inverse_layer_idx"), where, "per-layer attention scaling")
        _require(d.get("scale_attn_weights", True), where, "unscaled attention")
        _require(not d.get("add_cross_attention"), where, "cross-attention")
        n_embd = d["n_embd"]
        return family, ModelConfig(
            vocab_size=d["vocab_size"],
            vocab_multiple=1,
            context_length=d["n_positions"],
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            d_model=n_embd,
            d_ff=d.get("n_inner") or 4 * n_embd,
            norm="layernorm",
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            pos_emb="learned",
            mlp="gelu",
            bias=True,
            tie_embeddings=d.get("tie_word_embeddings", True),
            init_std=d.get("initializer_range", 0.02),
        )
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim") or hidden // heads
    _require(d.get("hidden_act", "silu") == "silu", where, f"activation {d.get('hidden_act')!r}")
    _require(
        head_dim * heads == hidden,
        where,
        f"head_dim {head_dim} x {heads} heads != hidden_size {hidden} (tinylm's head dim is "
        "d_model / n_head)",
    )
    _require(d.get("pretraining_tp", 1) == 1, where, "pretraining_tp > 1")
    bias = False
    window = None
    if family == "llama":
        attn_bias, mlp_bias = d.get("attention_bias", False), d.get("mlp_bias", False)
        _require(attn_bias == mlp_bias, where, "biases on attention but not the MLP (or back)")
        bias = bool(attn_bias)
    elif family == "qwen3":
        _require(not d.get("attention_bias", False), where, "attention biases without MLP biases")
        if d.get("use_sliding_window"):
            types = d.get("layer_types") or []
            _require(
                d.get("max_window_layers", 0) == 0 or all(t == "sliding_attention" for t in types),
                where,
                "a sliding window on some layers only",
            )
            window = d.get("sliding_window")
    else:
        window = d.get("sliding_window")
    return family, ModelConfig(
        vocab_size=d["vocab_size"],
        vocab_multiple=1,
        context_length=d.get("max_position_embeddings", 2048),
        n_layer=d["num_hidden_layers"],
        n_head=heads,
        n_kv_head=d.get("num_key_value_heads") or heads,
        d_model=hidden,
        d_ff=d["intermediate_size"],
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        pos_emb="rope",
        rope_theta=_rope_theta(d, where),
        mlp="swiglu",
        qk_norm=family == "qwen3",
        bias=bias,
        tie_embeddings=d.get("tie_word_embeddings", False),
        init="normal",
        init_std=d.get("initializer_range", 0.02),
        sliding_window=window,
    )


def arch_values(m: ModelConfig) -> dict[str, Any]:
    """The architecture fields of `m`, resolved (kv heads and MLP width as computed)."""
    values = {k: getattr(m, k) for k in ARCH_FIELDS}
    values["n_kv_head"], values["d_ff"] = m.kv_heads, m.ff_dim
    return values
