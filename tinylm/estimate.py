"""`tinylm estimate`: parameters, FLOPs per token, memory and training time, from a config alone.

Nothing is allocated: the parameter count and FLOPs come from building the model on the meta
device (so they are the model's own `num_params` / `flops_per_token`, never a second formula);
memory and time are arithmetic on those numbers.

Memory during training, per process (no sharding):
- weights: 4 bytes per parameter (fp32 master weights; autocast casts on the fly),
- gradients: 4 bytes per parameter,
- AdamW state: 8 bytes per parameter (exp_avg and exp_avg_sq in fp32),
- activations saved for the backward pass: `activation_bytes_per_token` below, at
  `train.batch_size` x `context_length` tokens, counted from what each op of tinylm/model.py
  keeps (fused SDPA keeps no T x T scores),
- under bf16/fp16 autocast, the half-precision copies of the matmul weights that autocast
  caches for the backward pass (2 bytes per matmul parameter).
Allocator slack, transient buffers (the logits themselves, the fp32 copy for the loss) and the
CUDA context are not included: leave ~10-20% headroom.

With N devices (`--devices N`, torchrun): each device holds the above under DDP; FSDP shards the
weights, gradients and AdamW state N ways (activations stay per device). The run's default token
budget and the throughput grow N-fold (train.batch_size is per device).

This module imports no torch at import time (it registers a CLI command).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from tinylm.cli_args import float_in, int_in
from tinylm.config import Config, ModelConfig
from tinylm.tpu import slice_arg

# fp8: counted as bf16 (torchao keeps some saved inputs in float8: an upper bound); bf32 keeps
# fp32 activations (only its matmuls read bf16 inputs, converted inside oneDNN)
ACT_BYTES = {"fp32": 4, "bf32": 4, "bf16": 2, "fp16": 2, "fp8": 2}
GPT2_VOCAB = 50257
CHAR_VOCAB_GUESS = 256  # a char tokenizer's size is known only once fitted on the corpus


def activation_bytes_per_token(
    m: ModelConfig, vocab_size: int, precision: str, checkpointing: bool = False
) -> int:
    """Bytes kept for the backward pass per token of a micro-batch (approximate).

    Counted from the tensors autograd saves in tinylm/model.py (checked against
    `torch.autograd.graph.saved_tensors_hooks` in tests/test_estimate.py). With a = bytes of the
    activation dtype, d = d_model, kv = n_kv_head * head_dim, f = ff_dim, per block:
      each norm's input 4d (fp32: the residual stream stays fp32 under autocast), RMSNorm also
      its normalised input 4d; the inputs of the QKV, output and MLP-in matmuls 3ad; the QKV
      output a(d + 2kv) (SDPA keeps q, k, v, views of it); with RoPE the rotated q and k
      a(d + kv); with QK-norm its normalised q and k, in fp32 (and under autocast also their
      fp32 upcast) ; the attention output ad (fused SDPA keeps no T x T scores); the MLP hidden
      2af (GELU, ReLU²: input and output) or 4af (SwiGLU: gate|up, silu(gate), product); dropout
      masks where dropout > 0 (in the activation dtype, as on CPU; CUDA keeps 1 byte); with
      attention dropout SDPA takes the unfused path and keeps T x T probabilities per head.
    Plus the final norm, the head's input ad and the fp32 log-softmax over the vocabulary.
    With activation checkpointing (`train.activation_checkpointing`) a block keeps only its
    input (the fp32 residual stream, 4d) and the backward pass recomputes one block at a time,
    so the blocks cost n_layer x 4d plus one block's activations.
    """
    a = ACT_BYTES[precision]
    d, kv, f = m.d_model, m.kv_heads * m.head_dim, m.ff_dim
    norm = 4 * d * (2 if m.norm == "rmsnorm" else 1)
    block = 2 * norm + 3 * a * d + a * (d + 2 * kv) + a * d
    block += a * (4 * f if m.mlp == "swiglu" else 2 * f)
    if m.pos_emb == "rope":
        block += a * (d + kv)
    if m.qk_norm:
        block += 4 * (d + kv) * (1 if a == 4 else 2)
    if m.dropout > 0:  # masks after the attention and MLP projections
        block += 2 * a * d
    if m.attn_dropout > 0:  # the unfused path, in fp32 on CPU: probabilities, mask, q k v copies
        block += 4 * (2 * m.n_head * m.context_length + d + 2 * kv)
    embedding_dropout = 4 * d if m.dropout > 0 else 0
    blocks = m.n_layer * 4 * d + block if checkpointing else m.n_layer * block
    return blocks + embedding_dropout + norm + a * d + 4 * vocab_size


def _built_counts(m: ModelConfig) -> tuple[int, int, int, int]:
    import torch

    from tinylm.model import GPT

    with torch.device("meta"):
        model = GPT(m)
    matmul_weights = sum(
        mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear)
    )
    return model.num_params(), model.num_params(True), model.flops_per_token(), matmul_weights


_COUNTS: dict[str, tuple[int, int, int, int]] = {}  # by repr(ModelConfig): counts are pure


def model_counts(m: ModelConfig) -> tuple[int, int, int, int]:
    """(parameters, non-embedding parameters, FLOPs per token, matmul weights) of `GPT(m)`.

    The model's own counts, built on the meta device. Blocks are identical and each count is
    linear in n_layer, so a deep model is counted exactly from one and two layers: building
    1,000 meta blocks took ~2 s, which a preflight that must refuse instantly cannot spend.
    """
    key = repr(m)
    if key not in _COUNTS:  # the preflight asks again for the same model (advice, checkpointing)
        _COUNTS[key] = _counts(m)
    return _COUNTS[key]


def _counts(m: ModelConfig) -> tuple[int, int, int, int]:
    if m.n_layer <= 2:
        return _built_counts(m)
    one = _built_counts(dataclasses.replace(m, n_layer=1))
    two = _built_counts(dataclasses.replace(m, n_layer=2))
    a, b, c, d = (x + (y - x) * (m.n_layer - 1) for x, y in zip(one, two, strict=True))
    return a, b, c, d


@dataclass
class Estimate:
    """What `tinylm estimate` prints; all sizes in bytes, times in seconds."""

    vocab_size: int
    vocab_note: str
    params: int
    params_non_embedding: int
    flops_per_token: int
    attention_flops_per_token: int
    precision: str
    precision_note: str
    batch_size: int
    context_length: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    weight_copies: int  # half-precision copies of the matmul weights that autocast keeps
    tokens: int
    seconds_at_throughput: float | None
    seconds_at_peak: float | None
    devices: int = 1
    activation_checkpointing: bool = False

    @property
    def fsdp_memory(self) -> int:
        """Per device under FSDP: parameters, gradients and AdamW state sharded over the devices."""
        sharded = (self.weights + self.gradients + self.optimizer) // self.devices
        return sharded + self.activations + self.weight_copies

    @property
    def total_memory(self) -> int:
        return (
            self.weights + self.gradients + self.optimizer + self.activations + self.weight_copies
        )


def resolve_vocab(cfg: Config) -> tuple[int, str]:
    """The vocabulary size to assume, and a note when it is not given by the config."""
    if cfg.model.vocab_size > 0:
        return cfg.model.vocab_size, ""
    spec = cfg.data.tokenizer
    if spec == "gpt2":
        return GPT2_VOCAB, "from the GPT-2 tokenizer"
    if spec.startswith("bpe:") and spec[4:].isdigit():
        return int(spec[4:]), "the BPE size data.tokenizer asks for"
    if spec == "char":
        return CHAR_VOCAB_GUESS, (
            f"assumed {CHAR_VOCAB_GUESS}: a char tokenizer's size is its corpus's distinct "
            "characters; set model.vocab_size=N for the exact figure"
        )
    if spec.startswith("bpe:") and spec[4:].isdigit():  # trained on the data by the run
        return int(spec[4:]), f"from data.tokenizer={spec}"
    from tinylm.tokenizer import load_tokenizer

    return load_tokenizer(spec).vocab_size, f"from {spec}"


def estimate(
    cfg: Config,
    *,
    tokens: int | None = None,
    tokens_per_second: float | None = None,
    peak_tflops: float | None = None,
    mfu: float = 0.4,
    devices: int = 1,
    activation_checkpointing: bool | None = None,
) -> Estimate:
    """Parameters, FLOPs, memory and time for `cfg` (see the module docstring).

    tokens defaults to the run's budget: max_steps x batch_size x grad_accum x context_length x
    devices. Time is given at `tokens_per_second` and/or `peak_tflops` (per second) x `mfu`,
    both per device, times `devices`. `activation_checkpointing` defaults to the config's
    (its `auto` counts as off: the preflight turns it on only when the run does not fit).
    """
    vocab, vocab_note = resolve_vocab(cfg)
    m = dataclasses.replace(cfg.model, vocab_size=vocab)
    params, body, flops, matmul_weights = model_counts(m)

    precision, precision_note = cfg.train.precision, ""
    if precision == "auto":
        precision, precision_note = "bf16", "auto: bf16 on a GPU; on a CPU a probe decides"
    if activation_checkpointing is None:
        activation_checkpointing = cfg.train.activation_checkpointing is True
    t = cfg.train
    batch_tokens = t.batch_size * m.context_length
    if tokens is None:
        tokens = t.max_steps * t.grad_accum * batch_tokens * devices
    return Estimate(
        vocab_size=vocab,
        vocab_note=vocab_note,
        params=params,
        params_non_embedding=body,
        flops_per_token=flops,
        attention_flops_per_token=12 * m.n_layer * m.d_model * m.context_length,
        precision=precision,
        precision_note=precision_note,
        batch_size=t.batch_size,
        context_length=m.context_length,
        weights=4 * params,
        gradients=4 * params,
        optimizer=8 * params,
        activations=batch_tokens
        * activation_bytes_per_token(m, vocab, precision, activation_checkpointing),
        weight_copies=0 if ACT_BYTES[precision] == 4 else ACT_BYTES[precision] * matmul_weights,
        tokens=tokens,
        seconds_at_throughput=tokens / (tokens_per_second * devices) if tokens_per_second else None,
        seconds_at_peak=(
            tokens * flops / (peak_tflops * 1e12 * mfu * devices) if peak_tflops else None
        ),
        devices=devices,
        activation_checkpointing=activation_checkpointing,
    )


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in (
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def format_bytes(n: float) -> str:
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    if n < 1024**3:
        return f"{n / 1024**2:.1f} MiB"
    if n < 1024**4:
        return f"{n / 1024**3:.2f} GiB"
    return f"{n / 1024**4:.2f} TiB"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def format_estimate(
    e: Estimate,
    *,
    tokens_per_second: float | None = None,
    peak_tflops: float | None = None,
    mfu: float = 0.4,
) -> str:
    """The text `tinylm estimate` prints."""
    note = f" ({e.vocab_note})" if e.vocab_note else ""
    prec = f" ({e.precision_note})" if e.precision_note else ""
    lines = [
        f"vocabulary        {e.vocab_size:,}{note}",
        f"parameters        {e.params:,} ({_si(e.params)}); "
        f"{e.params_non_embedding:,} without embeddings",
        f"FLOPs per token   {_si(e.flops_per_token, 'FLOP')} (training: 6N "
        f"{_si(e.flops_per_token - e.attention_flops_per_token, 'FLOP')} + attention "
        f"{_si(e.attention_flops_per_token, 'FLOP')})",
        f"memory at batch {e.batch_size} x {e.context_length} tokens, {e.precision}{prec}:",
        f"  weights         {format_bytes(e.weights)} (fp32)",
        f"  gradients       {format_bytes(e.gradients)} (fp32)",
        f"  AdamW state     {format_bytes(e.optimizer)} (2 x fp32)",
        f"  activations     {format_bytes(e.activations)} (approximate; see tinylm/estimate.py"
        + ("; with activation checkpointing)" if e.activation_checkpointing else ")"),
        *(
            [f"  autocast copies {format_bytes(e.weight_copies)} ({e.precision} matmul weights)"]
            if e.weight_copies
            else []
        ),
        f"  total           {format_bytes(e.total_memory)} (+10-20% allocator and workspace)"
        + (" per device with DDP" if e.devices > 1 else ""),
        *(
            [
                f"  with FSDP       {format_bytes(e.fsdp_memory)} per device (state sharded {e.devices} ways)"
            ]
            if e.devices > 1
            else []
        ),
        f"time for {_si(e.tokens)} tokens ({_si(e.tokens * e.flops_per_token, 'FLOP')})"
        + (f" on {e.devices} devices:" if e.devices > 1 else ":"),
    ]
    each = " per device" if e.devices > 1 else ""
    if e.seconds_at_throughput is not None:
        lines.append(
            f"  at {tokens_per_second:,.0f} tokens/s{each}: {_duration(e.seconds_at_throughput)}"
        )
    if e.seconds_at_peak is not None:
        lines.append(
            f"  at {peak_tflops:g} TFLOP/s peak{each} x MFU {mfu:g}: {_duration(e.seconds_at_peak)}"
        )
    if e.seconds_at_throughput is None and e.seconds_at_peak is None:
        lines.append("  (give --tokens-per-second X, or --peak-tflops P [--mfu M])")
    return "\n".join(lines)


def cmd_estimate(args: argparse.Namespace) -> int:
    """`tinylm estimate CONFIG [overrides...]`."""
    from tinylm.config import load_config

    cfg = load_config(args.config, args.overrides)
    tokens = int(args.tokens) if args.tokens is not None else None
    tpu = args.device  # a TPU slice (tinylm/tpu.py) sets the devices and their peak
    if tpu is not None:
        args.devices = tpu.devices
        args.peak_tflops = args.peak_tflops or tpu.tflops_per_device
    e = estimate(
        cfg,
        tokens=tokens,
        tokens_per_second=args.tokens_per_second,
        peak_tflops=args.peak_tflops,
        mfu=args.mfu,
        devices=args.devices,
    )
    print(f"tinylm estimate: {args.config}")
    if tpu is not None:
        print(tpu.describe())
    print(
        format_estimate(
            e, tokens_per_second=args.tokens_per_second, peak_tflops=args.peak_tflops, mfu=args.mfu
        )
    )
    if args.gpu_memory is not None:
        print(format_memory_plan(cfg, args.gpu_memory, e.precision))
    if tpu is not None:
        fits = e.total_memory <= tpu.hbm_bytes_per_device
        print(
            f"per XLA device: {format_bytes(e.total_memory)} of {format_bytes(tpu.hbm_bytes_per_device)} "
            f"HBM ({'fits' if fits else 'does not fit: lower train.batch_size or the model size'})"
        )
    return 0


def format_memory_plan(cfg: Config, gib: float, precision: str) -> str:
    """`--gpu-memory G`: micro-batch, accumulation and checkpointing that fit G GiB."""
    from tinylm.preflight import HEADROOM, plan_for_memory

    t = cfg.train
    global_batch = t.batch_size * t.grad_accum
    head = (
        f"fit in {gib:g} GiB ({precision}, global batch {global_batch} x "
        f"{cfg.model.context_length} tokens, +{HEADROOM - 1:.0%} headroom):"
    )
    plan = plan_for_memory(cfg, int(gib * 2**30), precision)
    if plan is None:
        return (
            f"{head}\n  does not fit even at micro-batch 1 with activation checkpointing: use a "
            "smaller model (model.n_layer, model.d_model) or a shorter model.context_length"
        )
    same = (plan.batch_size, plan.grad_accum, plan.activation_checkpointing) == (
        t.batch_size,
        t.grad_accum,
        t.activation_checkpointing is True,
    )
    how = "fits as configured" if same else "proposed"
    alternative = ""
    if not plan.activation_checkpointing and plan.batch_size < global_batch:
        recompute = plan_for_memory(cfg, int(gib * 2**30), precision, checkpointing_only=True)
        if recompute is not None and recompute.batch_size > plan.batch_size:
            alternative = (
                f"\n  or, recomputing each block in the backward pass (~1/3 more compute, "
                f"fewer micro-batches): {recompute.overrides()}"
            )
    return (
        f"{head}\n  {how}: {plan.overrides()}\n"
        f"  estimated {format_bytes(plan.need)} per device"
        + (
            " (recomputing each block in the backward pass: ~1/3 more compute)"
            if plan.activation_checkpointing
            else ""
        )
        + alternative
    )


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `tinylm estimate`."""
    p = subparsers.add_parser(
        "estimate",
        help="parameters, FLOPs/token, training memory and time for a config (no weights built)",
        description="Estimate parameters (with/without embeddings), training FLOPs per token "
        "(6N + attention), memory for weights, gradients, AdamW state and activations at "
        "train.batch_size, and the time for a token budget.",
    )
    p.add_argument("config", help="preset name (tiny, gpt2-124m, ...) or path to a YAML config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument(
        "--tokens",
        type=float_in(gt=0, le=1e18),
        help="token budget (default: the run's max_steps x batch_size x grad_accum x context)",
    )
    p.add_argument(
        "--tokens-per-second", type=float_in(gt=0, le=1e15), help="measured training throughput"
    )
    p.add_argument(
        "--peak-tflops", type=float_in(gt=0, le=1e6), help="hardware peak TFLOP/s for the precision"
    )
    p.add_argument(
        "--mfu",
        type=float_in(gt=0, le=1),
        default=0.4,
        help="model FLOPs utilisation (default 0.4)",
    )
    p.add_argument(
        "--devices",
        type=int_in(1, 2**20),
        default=1,
        help="number of devices (GPUs) training together: time divides, FSDP memory is shown",
    )
    p.add_argument(
        "--gpu-memory",
        type=float_in(gt=0, le=1e6),
        metavar="GIB",
        help="propose train.batch_size / grad_accum / activation_checkpointing that fit a card "
        "with this much memory (GiB) for the same global batch",
    )
    p.add_argument(
        "--device",
        type=slice_arg,
        help="a TPU slice (tpu-v3-8, tpu-v4-8, tpu-v5e-8, ...): its XLA device count, bf16 peak "
        "and HBM from a table (tinylm/tpu.py; overrides --devices)",
    )
    p.set_defaults(func=cmd_estimate)
