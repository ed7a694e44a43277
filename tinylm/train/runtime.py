"""The execution environment of a run: device, precision, seeding, RNG state, and peak FLOPs."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from tinylm.config import Config, ConfigError
from tinylm.train.precision import Precision, autocast_context, choose_cpu_precision


def select_device(spec: str = "auto", local_rank: int = 0) -> tuple[torch.device, str]:
    """The device to train on and a one-line reason; `auto` prefers cuda, then mps, then cpu."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device(
                "cuda", local_rank
            ), f"cuda ({torch.cuda.get_device_name(local_rank)})"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps"), "mps (Apple GPU)"
        return torch.device("cpu"), "cpu: no CUDA or MPS device found"
    if spec == "xla":  # PyTorch/XLA (TPU); refused with the install command without torch_xla
        from tinylm.train import xla

        return xla.select_device()
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"train.device: '{spec}' is not a device (use auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device=cuda but this torch has no CUDA device; use train.device=auto or cpu"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
        return device, f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps but MPS is not available; use train.device=auto or cpu")
    return device, device.type


def select_precision(spec: str, device: torch.device, cfg: Config | None = None) -> Precision:
    """Resolve `train.precision`; `auto` picks bf16 on GPUs that support it, else fp16; on a CPU
    the probe decides (tinylm/train/precision.py) when the run's `cfg` is given, else fp32."""
    if spec == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision(
                    "bf16", "auto -> bf16 (supported by this GPU, no grad scaler needed)"
                )
            return Precision("fp16", "auto -> fp16 with a grad scaler (this GPU has no bf16)")
        if device.type == "cpu" and cfg is not None:
            from tinylm.estimate import model_counts

            # On a CPU the compile decision does not depend on the precision (only fp8's does).
            compiled, _ = decide_run_compile(
                cfg, device, Precision("fp32", "placeholder"), model_counts(cfg.model)[2]
            )
            return choose_cpu_precision(cfg, compiled=compiled)
        if device.type == "xla":
            from tinylm.train import xla

            return xla.auto_precision(device)
        return Precision("fp32", f"auto -> fp32 on {device.type}")
    if spec == "fp8":
        from tinylm.train import fp8

        return Precision("fp8", fp8.check_supported(device))
    if spec == "bf32" and device.type != "cpu":
        raise ConfigError(
            f"train.precision=bf32 is a CPU mode (oneDNN's bf16-input matmuls), not for "
            f"{device.type}; use bf16 there (or fp32)"
        )
    if spec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "train.precision=bf16 is not supported by this GPU; use fp16 (with a grad scaler)"
        )
    return Precision(spec, f"train.precision={spec}")


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for forward passes (a no-op in fp32); see precision.KINDS."""
    return autocast_context(device, precision)


# The host RNGs are process-wide; XLA replica threads (train/xla_replicas.py) share them.
_RNG_LOCK = threading.RLock()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    with _RNG_LOCK:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_build(seed: int) -> Iterator[None]:
    """Draw from torch's host generator as a freshly seeded process would, leaving it as it was:
    XLA replica threads build their models one at a time, each from the run's seed, into the
    weights a single process builds (its generator is seeded with the same seed just before)."""
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, so a resumed run continues bit-identically."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Dense (no sparsity) peak TFLOP/s for bf16/fp16 tensor-core matmuls, from vendor data sheets.
# Matched by substring of torch.cuda.get_device_name(); the first match wins, so order matters.
_PEAK_TFLOPS_BF16 = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 4080", 97.5),
    ("RTX 3090", 71.0),
    ("RTX 3080", 59.5),
    ("V100", 125.0),
    ("T4", 65.0),
]


def peak_flops(device: torch.device, precision: Precision) -> tuple[float | None, str]:
    """Peak FLOP/s used as the MFU denominator, and where it came from (None: unknown device)."""
    override = os.environ.get("TINYLM_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12, "TINYLM_PEAK_TFLOPS"
    if device.type != "cuda":
        return None, f"no peak-FLOPs figure for {device.type}; set TINYLM_PEAK_TFLOPS to get MFU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_TFLOPS_BF16:
        if key in name:
            if precision.name == "fp32":
                tflops /= 2  # TF32 tensor cores run at half the bf16 rate on these parts
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s ({precision.name}, dense)"
    return None, f"unknown GPU '{name}': set TINYLM_PEAK_TFLOPS to get MFU"


# `train.compile=auto`. torch.compile pays a one-off compile cost for a per-step gain, so it is
# worth it only for runs long enough to earn the cost back. Measured on this machine's CPU
# (2 cores, AVX2, torch 2.13; bench/bench_vs_nanogpt.py --compile, notes/issue-10-recipes.md):
# at nanoGPT's 4L/4H/128 shape, compiled steps cost 104.7 CPU-ms against 118.8 eager (12% less;
# 1.13x in wall-clock tokens/s), and the first two compiled steps took 19.4 CPU-s more than
# eager ones in the training process alone (earlier quiet-machine runs, notes/model.md: 24 s of
# warm-up for tiny, 48 s at 10M parameters; with the C++ wrapper, `compile_model`, 53 s at
# nanoGPT's 6L/384 in bf16, session 12). COMPILE_COST_S is the upper end of those, COMPILE_GAIN
# the measured saving (the eager-vs-compiled gain in fp32, far larger in bf16 now).
# EAGER_FLOPS_CPU is the eager step's throughput on this CPU (notes/model.md: 71 GFLOP/s for
# tiny, 109 at 10M, on a quiet machine; taken lower because machines are shared).
# On CUDA the figures are the commonly reported ones (about a minute to compile a GPT, steps
# ~1.3x faster) and the eager throughput a conservative 25% of the device's peak: not measured
# here (no GPU). Compile is chosen when the time it saves exceeds twice its cost, so a misjudged
# estimate still does not make a run slower.
COMPILE_COST_S = {"cpu": 60.0, "cuda": 60.0}
COMPILE_GAIN = {"cpu": 0.12, "cuda": 0.25}
EAGER_FLOPS_CPU = 5e10
CUDA_EAGER_MFU = 0.25


def _have_cpp_compiler() -> bool:
    """Inductor's CPU backend builds C++; without a compiler torch.compile fails at the first step."""
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(name and shutil.which(name) for name in names)


def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`torch.compile(model)`, with inductor's cache kept apart per ATEN_CPU_CAPABILITY on CPU.

    torch 2.13's inductor cache does not key its CPU kernels on ATEN_CPU_CAPABILITY: a graph
    compiled with AVX-512 kernels and loaded again under ATEN_CPU_CAPABILITY=avx2 (or the other
    way) computed wrong values, half of a GELU's outputs zero or NaN, once a crash in free()
    (notes/issue-18-precision.md, session 9). With the variable set and no cache directory of
    the user's own, the cache goes to a directory of that capability's own (inductor itself
    writes its default directory into the variable once it has compiled anything).
    """
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if device.type == "cpu" and capability:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        default = os.path.abspath(default_cache_dir())
        chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if chosen is None or os.path.abspath(chosen) == default:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default}-{capability}"
    if device.type == "cpu":
        # The graph's host code in C++ rather than Python: a step calls a few hundred kernels,
        # and their Python calls were ~3% of nanoGPT's 6L/384 step (bf16, 2 threads, AMX host:
        # 386 / 388 / 398 against 414 / 388 / 409 ms a step, 3 alternated pairs of processes;
        # notes/issue-18-precision.md, session 12). The C++ costs ~14 s more compile time there
        # (53 against 39 s for the first two steps), which `decide_compile` weighs for `auto`.
        return torch.compile(model, options={"cpp_wrapper": True})
    return torch.compile(model)


def decide_run_compile(
    cfg: Config, device: torch.device, precision: Precision, flops_per_token: int
) -> tuple[bool, str]:
    """`decide_compile` for the run `cfg` describes, from its model's training FLOPs per token."""
    t = cfg.train
    tokens_per_step = t.batch_size * cfg.model.context_length * t.grad_accum
    return decide_compile(
        t.compile,
        device,
        precision,
        run_flops=flops_per_token * tokens_per_step * t.max_steps,
        max_seconds=60 * t.max_time_minutes,
    )


def decide_compile(
    setting: bool | str,
    device: torch.device,
    precision: Precision,
    run_flops: float,
    max_seconds: float = 0.0,
) -> tuple[bool, str]:
    """Whether to torch.compile the model, and a one-line reason.

    `setting` is `train.compile` (true / false / "auto"); `run_flops` the training FLOPs still
    to do (FLOPs per token x tokens per step x remaining steps); `max_seconds` the run's time
    limit (0 = none), which caps the time compile can save.
    """
    if precision.name == "fp8":
        from tinylm.train import fp8

        if decision := fp8.compile_decision(setting):
            return decision
    if setting is True or setting is False:
        return setting, f"train.compile={str(setting).lower()}"
    if device.type not in COMPILE_COST_S:
        return False, f"auto: off on {device.type} (torch.compile is not reliable there)"
    if device.type == "cpu" and (sys.platform == "win32" or not _have_cpp_compiler()):
        return False, "auto: off (no C++ compiler found for torch.compile's CPU backend)"
    if device.type == "cpu":
        throughput = EAGER_FLOPS_CPU
    else:
        peak, _ = peak_flops(device, precision)
        throughput = CUDA_EAGER_MFU * (peak or 100e12)
    eager_s = run_flops / throughput
    if max_seconds > 0:
        eager_s = min(eager_s, max_seconds)
    saved, cost = COMPILE_GAIN[device.type] * eager_s, COMPILE_COST_S[device.type]
    verdict = saved > 2 * cost
    return verdict, (
        f"auto: {'on' if verdict else 'off'} (run ~{eager_s / 60:.1f} min eager; compiling "
        f"saves ~{saved:.0f} s for ~{cost:.0f} s of compile time"
        f"{'' if verdict else ', not worth it'})"
    )
