"""Precision: what each `train.precision` means, and the measurement behind `auto` on a CPU.

One table, `KINDS`, maps a precision name to how a step runs it: the autocast dtype (None =
plain fp32) and whether it needs a grad scaler. `autocast_context` and `make_grad_scaler` are the
only places that turn a precision into a context manager or a `torch.amp.GradScaler`; another
module adds a kind (fp8) with `register_kind`, giving its own context factory when autocast
alone does not express it.

`train.precision=auto` on a CPU is decided by `probe` (`choose_cpu_precision`): forward +
backward of the run's own model at its micro-batch (fewer rows when one step would blow the
budget), alternating fp32, bf16 autocast and bf32 (fp32 tensors, bf16-input matmuls), within
`PROBE_BUDGET_S` seconds at the thread count the run will use. bf16 or bf32, whichever is
faster, is chosen only when it is at least `BF16_MARGIN` faster than fp32: the choice is never
slower than fp32 (beyond noise), and neither costs precision for nothing when it merely ties.
Which pays depends on the host (native bf16 matrix units: Intel AMX / AVX512-BF16) and on the
shape (measured on an AMX host, 2 threads, notes/issue-18-precision.md: bf16 is about 2x fp32
at nanoGPT's 6L/384 shape and slower than fp32 at the `tiny` shape, where bf32 is ~1.15x), so
it is measured, not assumed. The same probe times Muon's Newton-Schulz on the model's hidden matrices
in float32 and bfloat16 (`optim.muon_ns_dtype=auto`).

bf16 autocast can only win through its matrix multiplies, so the probe first times one
`GATE_SIZE`-cubed matmul in both dtypes (milliseconds): where bf16 is not faster there (no bf16
matrix units: emulated bf16 is ~15x slower on an AVX2 host), the model is never run in bf16, so
the probe does not spend seconds of emulated bf16 to learn that fp32 wins.

Results are cached in `<cache dir>/precision-probe.json`, keyed by the host's CPU model and
bf16 flags (and any `ISA_CAPS` variable that limits them), torch version, thread count, the
model config, micro-batch and the compile setting, so a resumed or repeated run makes the same
choice without probing again.
`TINYLM_PRECISION_AUTO=fp32|bf16|bf32` makes `auto` that precision without a probe (the test suite
pins fp32 this way so exact-numerics tests never depend on a timing).

Compiled runs (`train.compile=true`, or `auto` where the run is long enough to compile): the
eager probe points the wrong way. Compiling the model once per precision costs 15-40 s even at
one layer on a 2-core CPU, far over the probe's budget, so the probe times eager steps, and
eager bf16 pays casts and unfused elementwise kernels that a compiled graph fuses away (and
compiled bf16 takes the model's CPU kernels: `cpu_attention`, the GELU's kept sigmoid). Measured
on the AMX host, 2 threads, 5-step rounds (notes/issue-18-precision.md, session 12), compiled
bf16 / bf32 against compiled fp32: `tiny` 1.42x / 1.21x, nanoGPT's 4L/128 1.49x / 1.18x, its
6L/384 2.82x / 1.84x; the eager probe at the same shapes: 0.86-0.90x / 1.15-1.18x (choosing
bf32), 0.81-0.83x / 1.20-1.23x (bf32), 1.67-1.82x / 1.52-1.64x (bf16, by a margin within the
run-to-run noise: one bench run picked bf32 and ran at 0.6x the speed). So a compiled run on a
CPU whose bf16 matmuls beat fp32 (the gate) takes bf16; the eager figures are still measured and
shown, and still decide eager runs and Muon's Newton-Schulz dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinylm.cpu_attention import Fp32MatmulMode


@dataclass(frozen=True)
class PrecisionKind:
    """How one precision runs: its autocast dtype and whether the step needs a grad scaler.

    `context`, when given, builds the forward pass's context itself (device -> context manager)
    for kinds autocast does not express (fp8 swaps modules instead).
    """

    autocast_dtype: torch.dtype | None
    grad_scaler: bool = False
    context: Callable[[torch.device], contextlib.AbstractContextManager[Any]] | None = None
    # oneDNN's mode for the fp32 matmuls of the forward and backward passes (None: torch's own)
    fp32_matmul: str | None = None


KINDS: dict[str, PrecisionKind] = {
    "fp32": PrecisionKind(None),
    "bf16": PrecisionKind(torch.bfloat16),
    "fp16": PrecisionKind(torch.float16, grad_scaler=True),
    # fp32 tensors whose matmuls take bf16 inputs (fp32 accumulation) on a CPU: oneDNN's
    # counterpart of TF32. Elementwise work, norms, softmax and the loss stay fp32, and there
    # are no casts to pay for: at d_model 128 it is where bf16 autocast loses (its casts cost
    # more than the matmuls gain) and fp32 leaves AMX unused (notes/issue-18-precision.md).
    "bf32": PrecisionKind(None, fp32_matmul="bf16"),
}


def register_kind(name: str, kind: PrecisionKind) -> None:
    """Add a precision (another module's: fp8) to the table the step reads."""
    KINDS[name] = kind


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run and a one-line reason (the run header's `precision:`)."""

    name: str  # a key of KINDS
    reason: str
    muon_ns_dtype: str | None = None  # the probe's Newton-Schulz choice; None = device default

    @property
    def kind(self) -> PrecisionKind:
        return KINDS[self.name]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.kind.autocast_dtype

    @property
    def needs_grad_scaler(self) -> bool:
        return self.kind.grad_scaler


def autocast_context(
    device: torch.device, precision: Precision
) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's context for `precision` (a no-op in fp32)."""
    kind = precision.kind
    if kind.context is not None:
        return kind.context(device)
    if kind.autocast_dtype is None:
        return matmul_context(precision)
    return torch.autocast(device_type=device.type, dtype=kind.autocast_dtype)


def matmul_context(precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """The fp32 matmul mode of `precision` for a block (bf32: a training step's forward and
    backward; the optimizer's own matmuls, Muon's, keep theirs), else a no-op. Reusable."""
    mode = precision.kind.fp32_matmul
    return Fp32MatmulMode(mode) if mode else contextlib.nullcontext()


def make_grad_scaler(device: torch.device, precision: Precision) -> torch.amp.GradScaler | None:
    """A grad scaler for kinds that need one (fp16), else None."""
    return torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None


# ------------------------------------------------------------------------------ the CPU probe

PROBE_BUDGET_S = 3.0
# bf16 must beat fp32 by this much to be chosen: below it the two are within the noise of a
# 3-second probe on a shared machine, and fp32 then keeps full precision at no cost.
BF16_MARGIN = 1.10
# Above this per-step time the probe takes fewer rows of the micro-batch (per-row cost is what
# the precisions differ in; the rows only multiply it).
PROBE_STEP_S = 0.35
# The gate's matmul: 256^3 is 34 MFLOP, ~0.3 ms in fp32 and ~0.05 ms on AMX (notes/issue-18),
# ~30 ms when bf16 is emulated, within GATE_BUDGET_S either way.
GATE_SIZE = 256
GATE_BUDGET_S = 0.1
AUTO_ENV = "TINYLM_PRECISION_AUTO"
CACHE_FILE = "precision-probe.json"
# In the cache key: results of an earlier probe (before bf32 was a candidate) are not reused.
PROBE_VERSION = "probe 2"


@dataclass
class ProbeResult:
    """What the probe measured: seconds per fwd+bwd step in each precision, and the choice."""

    fp32_s: float
    bf16_s: float | None  # None: not timed, the matmul gate ruled bf16 out
    rows: int  # micro-batch rows the probe ran (the run's, or fewer for a large step)
    ns_fp32_s: float | None = None  # Newton-Schulz over the hidden matrices, per dtype
    ns_bf16_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    matmul_speedup: float | None = None  # the gate: fp32 / bf16 seconds of one matmul
    bf32_s: float | None = None  # fp32 with bf16-input matmuls (None: not timed)
    compiled: bool = False  # the run compiles its model (set by the caller, not measured)

    @property
    def gated(self) -> bool:
        """bf16 was ruled out by the matmul alone (the model ran in fp32 only)."""
        return self.bf16_s is None

    def speedup_of(self, name: str) -> float:
        """`name`'s tokens/s over fp32's (0 when it was not timed)."""
        seconds = {"bf16": self.bf16_s, "bf32": self.bf32_s}.get(name)
        return self.fp32_s / seconds if seconds else 0.0

    @property
    def speedup(self) -> float:
        """bf16 tokens/s over fp32 tokens/s (the matmul's ratio when the model was not timed)."""
        if self.bf16_s is None:
            return self.matmul_speedup or 0.0
        return self.speedup_of("bf16")

    @property
    def choice(self) -> str:
        """bf16 for a compiled run past the gate (module docstring); otherwise the fastest of
        bf16 and bf32 where it beats fp32 by `BF16_MARGIN`, else fp32."""
        if self.gated:
            return "fp32"
        if self.compiled:
            return "bf16"
        best = max(("bf32", "bf16"), key=self.speedup_of)  # a tie keeps bf32's precision
        return best if self.speedup_of(best) >= BF16_MARGIN else "fp32"

    @property
    def ns_choice(self) -> str | None:
        if self.ns_fp32_s is None:
            return None  # not a Muon run
        if self.ns_bf16_s is None or self.gated:
            return "float32"
        return "bfloat16" if self.ns_fp32_s >= BF16_MARGIN * self.ns_bf16_s else "float32"


# Environment variables that limit which instruction sets oneDNN, MKL, ATen and inductor use.
ISA_CAPS = (
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "ATEN_CPU_CAPABILITY",
)


def cpu_signature() -> str:
    """The host's CPU model and its bf16-relevant flags (the cache key's host part)."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    native = sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"})
    # These cap the instruction sets torch's kernels use without changing the CPU's flags: a
    # host run under ONEDNN_MAX_CPU_ISA=AVX2 has no AMX for bf16, whatever /proc/cpuinfo says.
    caps = [f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name)]
    return f"{model} [{' '.join(native)}]" + (f" ({' '.join(caps)})" if caps else "")


def _probe_key(model_cfg: Any, rows: int, compile_setting: Any, muon: bool) -> str:
    shape = json.dumps(asdict(model_cfg), sort_keys=True, default=str)
    parts = [
        PROBE_VERSION,
        cpu_signature(),
        f"torch {torch.__version__}",
        f"threads {torch.get_num_threads()}",
        f"rows {rows}",
        f"compile {compile_setting}",
        f"muon {muon}",
        hashlib.sha256(shape.encode()).hexdigest()[:16],
    ]
    return " | ".join(parts)


def _time_alternating(steps: dict[str, Callable[[], None]], budget_s: float) -> dict[str, float]:
    """Median seconds per call of each step, called in alternation until the budget is spent."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    rounds = 0
    while rounds == 0 or time.perf_counter() - start < budget_s:  # at least one round
        order = list(steps) if rounds % 2 == 0 else list(reversed(steps))
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def measure(
    model_cfg: Any, rows: int, seq_len: int, *, muon: bool, budget_s: float = PROBE_BUDGET_S
) -> ProbeResult:
    """Time fwd+bwd of `GPT(model_cfg)` at `rows` x `seq_len` in fp32 and bf16 autocast (CPU)."""
    from tinylm.model import GPT

    deadline = time.perf_counter() + budget_s
    gate = matmul_speedup()
    with torch.random.fork_rng(devices=[]):  # the run's RNG streams stay untouched
        torch.manual_seed(0)
        model = GPT(model_cfg)
        vocab = max(1, model_cfg.vocab_size)
        x = torch.randint(0, vocab, (rows, seq_len))

    def step_fn(name: str, n: int) -> Callable[[], None]:
        kind = KINDS[name]
        dtype = kind.autocast_dtype
        matmuls = matmul_context(Precision(name, "probe"))

        def step() -> None:
            with matmuls:
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=bool(dtype)):
                    _, loss = model(x[:n], x[:n])
                loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    # One row first (warm-up: first-call allocations, oneDNN kernel choice), then as many rows
    # of the micro-batch as keep a step under PROBE_STEP_S: a full-batch warm-up of a large
    # model alone would spend the whole budget.
    step_fn("fp32", 1)()
    t0 = time.perf_counter()
    step_fn("fp32", 1)()
    one_row = time.perf_counter() - t0
    n = max(1, min(rows, int(PROBE_STEP_S / max(one_row, 1e-6))))
    if gate < 1.0:  # bf16 matmuls no faster than fp32: the model cannot gain in bf16
        result = ProbeResult(fp32_s=one_row, bf16_s=None, rows=1, matmul_speedup=gate)
        if muon:
            result.ns_fp32_s, _ = _measure_newton_schulz(model, 0.0, dtypes=(torch.float32,))
        return result
    candidates = ("fp32", "bf16", "bf32")
    for name in candidates:
        step_fn(name, n)()  # warm-up
    ns_share = 0.25 if muon else 0.0
    left = max(0.0, deadline - time.perf_counter())
    timed = _time_alternating(
        {name: step_fn(name, n) for name in candidates}, left * (1 - ns_share)
    )
    result = ProbeResult(
        fp32_s=timed["fp32"],
        bf16_s=timed["bf16"],
        bf32_s=timed["bf32"],
        rows=n,
        matmul_speedup=gate,
    )
    if muon:
        result.ns_fp32_s, result.ns_bf16_s = _measure_newton_schulz(
            model, max(0.0, deadline - time.perf_counter())
        )
    return result


def _measure_newton_schulz(
    model: torch.nn.Module,
    budget_s: float,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
) -> tuple[float | None, float | None]:
    """Seconds to orthogonalize every hidden matrix once, in float32 and in bfloat16 (None for
    a dtype not in `dtypes`)."""
    from tinylm.train.muon import muon_parameters, newton_schulz

    shapes = [tuple(p.shape) for _, p in muon_parameters(model)]
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    coefficients = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults

    def run(dtype: torch.dtype) -> Callable[[], None]:
        return lambda: [newton_schulz(g, coefficients, 5, 1e-7, dtype) for g in grads]

    run(dtypes[-1])()  # warm-up
    timed = _time_alternating({str(dtype): run(dtype) for dtype in dtypes}, budget_s)
    return timed.get(str(torch.float32)), timed.get(str(torch.bfloat16))


def matmul_speedup(budget_s: float = GATE_BUDGET_S) -> float:
    """fp32 seconds over bf16 seconds of one `GATE_SIZE`-cubed matmul (below 1: bf16 is slower)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(GATE_SIZE, GATE_SIZE, generator=gen) for _ in range(2))
    a16, b16 = a.bfloat16(), b.bfloat16()
    a16 @ b16  # warm-up: oneDNN picks its kernel on the first call
    timed = _time_alternating({"fp32": lambda: a @ b, "bf16": lambda: a16 @ b16}, budget_s)
    return timed["fp32"] / max(timed["bf16"], 1e-9)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_probe(
    model_cfg: Any,
    rows: int,
    seq_len: int,
    *,
    compile_setting: Any,
    muon: bool,
    cache: Path,
    measure_fn: Callable[..., ProbeResult] | None = None,
) -> tuple[ProbeResult, bool]:
    """The probe's result for this host and shape, from the cache or measured now (then saved).

    Returns (result, from_cache). `measure_fn` is `measure`; tests inject timings through it.
    """
    from tinylm.fileio import atomic_write_text

    key = _probe_key(model_cfg, rows, compile_setting, muon)
    path = cache / CACHE_FILE
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict):
        with contextlib.suppress(TypeError, ValueError):
            return ProbeResult(**entry), True
    result = (measure_fn or measure)(model_cfg, rows, seq_len, muon=muon)
    with contextlib.suppress(OSError):  # a read-only cache costs a probe next time, nothing else
        cache.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path)  # re-read: another run may have added its shape meanwhile
        entries[key] = asdict(result)
        atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    return result, False


def describe(result: ProbeResult, from_cache: bool) -> str:
    """`auto -> bf16 (probe: 2.2x fp32 on this CPU)`, where the figure came from, and the Muon
    Newton-Schulz choice when the probe made one."""
    source = "cached probe" if from_cache else "probe"
    of = result.extra.get("rows_of")
    timed_rows = of and result.rows < of and not result.gated
    notes = f", timed at {result.rows} of {of} rows" if timed_rows else ""
    if result.ns_choice:
        notes += f"; Muon Newton-Schulz in {result.ns_choice}"
    if result.gated:
        return (
            f"auto -> fp32 ({source}: a bf16 matmul is {result.speedup:.2f}x fp32 on this CPU, "
            f"no bf16 matrix units, so the model was not timed in bf16{notes})"
        )
    if result.compiled:  # past the gate (above): bf16, whatever the eager figures
        return (
            f"auto -> bf16 ({source}: a compiled run, and a bf16 matmul is "
            f"{result.matmul_speedup or 0:.1f}x fp32 on this CPU; eager, bf16 "
            f"{result.speedup_of('bf16'):.2f}x and bf32 {result.speedup_of('bf32'):.2f}x fp32, "
            f"which compiling turns in bf16's favour{notes})"
        )
    other = {"bf16": "bf32", "bf32": "bf16"}
    if result.choice in other:
        also = other[result.choice]
        also_note = f", {also} {result.speedup_of(also):.2f}x" if result.speedup_of(also) else ""
        return (
            f"auto -> {result.choice} ({source}: {result.speedup_of(result.choice):.1f}x fp32 "
            f"on this CPU{also_note}{notes})"
        )
    bf32_note = f", bf32 {result.speedup_of('bf32'):.2f}x" if result.bf32_s else ""
    return (
        f"auto -> fp32 ({source}: bf16 autocast {result.speedup:.2f}x fp32{bf32_note} on this "
        f"CPU, under the {BF16_MARGIN:.2f}x needed{notes})"
    )


def choose_cpu_precision(
    cfg: Any, *, compiled: bool = False, measure_fn: Callable[..., ProbeResult] | None = None
) -> Precision:
    """`train.precision=auto` on a CPU: the env pin, else the (cached) probe's choice for a run
    that is (`compiled`) or is not compiled."""
    from tinylm.paths import cache_dir

    pinned = os.environ.get(AUTO_ENV, "").strip()
    if pinned:
        if pinned not in ("fp32", "bf16", "bf32"):
            from tinylm.config import ConfigError

            raise ConfigError(
                f"{AUTO_ENV}={pinned!r}: use fp32, bf16 or bf32 (or unset it to probe)"
            )
        return Precision(pinned, f"auto -> {pinned} ({AUTO_ENV}={pinned}, no probe)")
    muon = cfg.optim.name == "muon"
    result, from_cache = cached_probe(
        cfg.model,
        cfg.train.batch_size,
        cfg.model.context_length,
        compile_setting=cfg.train.compile,
        muon=muon,
        cache=cache_dir(cfg.data.cache_dir),
        measure_fn=measure_fn,
    )
    result.extra["rows_of"] = cfg.train.batch_size
    result.compiled = compiled  # the run's, whatever run stored the cached entry
    return Precision(result.choice, describe(result, from_cache), result.ns_choice)


def scaler_gave_up(
    scaler: torch.amp.GradScaler, loss: torch.Tensor, grad_norm: torch.Tensor
) -> torch.Tensor:
    """The non-finite guard's flag for a step under a grad scaler (a device tensor, no sync).

    The scaler skips a step whose gradients overflowed and halves its scale: that is its normal
    way of finding the scale, not a diverging run, so such a step does not count towards
    `train.max_nonfinite_steps`. It counts when the loss itself is not finite, or when the
    gradients are not finite at a scale of 1 or less (no scaling is left to back off from).
    """
    scale = scaler._scale  # set by the step's `scale()`; read as a tensor: no host sync
    exhausted = (scale <= 1.0).reshape(()) if scale is not None else torch.tensor(True)
    return ~torch.isfinite(loss) | (~torch.isfinite(grad_norm) & exhausted.to(loss.device))
