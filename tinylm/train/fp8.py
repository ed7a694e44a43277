"""FP8 training (`train.precision=fp8`) through torchao's float8 training.

The attention and MLP projections of the blocks become torchao `Float8Linear`s: each matmul
casts its input, weight and output gradient to float8 with a dynamic per-tensor scale
(tensorwise e4m3 forward, e5m2 gradients) and runs on the GPU's FP8 tensor cores. Everything
else stays under bf16 autocast: the embeddings, the output head (its logits feed the loss, where
FP8 error costs the most), the norms, and any projection whose input or output width is not a
multiple of 16 (`torch._scaled_mm` needs both). The weights themselves stay in fp32 (the module
keeps its `weight` and `bias` parameters, only the matmul is cast), so a checkpoint of an FP8 run
has the same keys and dtypes as a bf16 run's: export, generate, eval and resume are unchanged.

Without torch.compile the casts are separate kernels and FP8 is slower than bf16 (torchao's own
guidance), so `train.compile=auto` turns compile on for fp8.

FP8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada: RTX 40xx, L4, L40;
Hopper: H100, H200; Blackwell). Elsewhere a run is refused before anything is built. For tests
and debugging, `TINYLM_FP8_EMULATE=1` runs torchao's emulation mode on any device: the same
casts and scales, the matmul done in high precision on the dequantized values. It has the
numerics of FP8 and none of its speed, so it is never chosen by itself.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
from torch import nn

from tinylm.config import ConfigError
from tinylm.train.precision import PrecisionKind, register_kind

EMULATE_ENV = "TINYLM_FP8_EMULATE"
MIN_CAPABILITY = (8, 9)
DIM_MULTIPLE = 16  # torch._scaled_mm: both matmul dims of the weight must be multiples of 16
# The projections converted, by their name inside a block (see tinylm/model.py).
PROJECTIONS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
INSTALL_HINT = "pip install 'tinylm[fp8]' (torchao)"

# The layers torchao does not convert (head, embeddings, norms) run under bf16 autocast.
register_kind("fp8", PrecisionKind(torch.bfloat16))


def emulating() -> bool:
    """True when the test/debug switch `TINYLM_FP8_EMULATE=1` is set."""
    return os.environ.get(EMULATE_ENV, "") not in ("", "0")


def check_supported(device: torch.device) -> str:
    """Refuse FP8 where it cannot run (ConfigError, one line); else say how it will run."""
    if emulating():
        how = f"emulated ({EMULATE_ENV}=1: FP8 numerics in high precision, for tests; no speed-up)"
    else:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < MIN_CAPABILITY:
            here = (
                f"{torch.cuda.get_device_name(device)} has compute capability "
                f"{capability[0]}.{capability[1]}"
                if capability
                else f"this run is on {device.type}"
            )
            raise ConfigError(
                "train.precision=fp8 needs an NVIDIA GPU with FP8 matmuls (compute capability "
                f"8.9+: RTX 40xx, L4/L40, H100/H200, B200) and {here}; use train.precision=bf16"
            )
        how = f"FP8 tensor cores ({torch.cuda.get_device_name(device)})"
    _import_torchao()
    return f"train.precision=fp8: torchao float8 on the block projections, {how}; bf16 autocast elsewhere"


@contextmanager
def _quiet_torchao():
    # torchao logs a warning for each CUDA kernel library it cannot load on a CPU-only torch, and
    # torch one for each of torchao's enums registered as pytree constants; the float8 training
    # path used here needs neither.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _import_torchao():
    try:
        with _quiet_torchao():
            import torchao.float8
    except ImportError as e:
        raise ConfigError(f"train.precision=fp8 needs torchao ({e}); {INSTALL_HINT}") from None
    return torchao.float8


def convertible(module: nn.Module, name: str) -> bool:
    """The filter: a block's attention or MLP projection whose dims are multiples of 16."""
    return (
        isinstance(module, nn.Linear)
        and name.startswith("blocks.")
        and name.endswith(PROJECTIONS)
        and module.in_features % DIM_MULTIPLE == 0
        and module.out_features % DIM_MULTIPLE == 0
    )


def convert_model(model: nn.Module) -> str:
    """Swap the convertible projections of `model` for torchao Float8Linears, in place.

    Returns a one-line note for the run's header. Called before torch.compile and before the
    optimizer is built; the parameters are the same objects afterwards.
    """
    float8 = _import_torchao()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = float8.Float8LinearConfig(emulate=emulating())
    with _quiet_torchao():
        from torchao.float8.float8_linear import Float8Linear  # the class (not exported)

        float8.convert_to_float8_training(model, config=config, module_filter_fn=convertible)
    converted = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    kept = len(linears) - len(converted)
    return (
        f"fp8: {len(converted)} of {len(linears)} linear layers in float8 "
        f"({kept} kept in bf16: the output head and dims not divisible by {DIM_MULTIPLE})"
    )


def compile_decision(setting: bool | str) -> tuple[bool, str] | None:
    """`train.compile=auto` under fp8: on (the casts fuse only when compiled), except emulated."""
    if setting != "auto":
        return None
    if emulating():
        return False, "auto: off (fp8 emulated for tests: compiling buys no speed)"
    return True, "auto: on (fp8: torchao's float8 casts are fast only when compiled)"
